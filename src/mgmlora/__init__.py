"""mgmlora: LoRA fine-tuning of MGM-2B and Qwen3 (dense and MoE) with PyTorch Lightning, fast, on small hardware.

Groups, layered top to bottom (a module imports only from its own group or below; docs/design/architecture.md):
`__main__` (the `mgmlora` command), `commands` (each tool's command line over typed settings), `cli` (the
LightningCLI), `tools` (export, generate, leaderboard, memory estimate, reports), `training` (the
LightningModule and everything a step needs), `data` (records to typed batches), `models` (every family behind one
interface), `batch` (the typed micro-batch: the contract between data and step); `errors`, `quiet` and `offline`
serve all.
Importing `mgmlora` itself loads nothing heavy; import the group you need.

Importing `mgmlora` or any of its modules sets no environment variable:
offline mode is `mgmlora.offline.enforce()`, which every entry point and every model / tokenizer loader calls.
"""

__all__ = ["batch", "cli", "commands", "data", "errors", "models", "offline", "quiet", "tools", "training"]
