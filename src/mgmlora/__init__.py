"""mgmlora: LoRA fine-tuning of MGM-2B and Qwen3 (dense and MoE) with PyTorch Lightning, fast, on small hardware.

Groups, layered top to bottom (a module imports only from its own group or below; docs/design/architecture.md):
`cli` (the LightningCLI), `tools` (export, generate, leaderboard, memory estimate, reports), `training` (the
LightningModule and everything a step needs), `data` (records to typed batches), `models` (every family behind one
interface), `batch` (the typed micro-batch: the contract between data and step); `errors` and `quiet` serve all.
Importing `mgmlora` itself loads nothing heavy; import the group you need.
"""

__all__ = ["batch", "cli", "data", "errors", "models", "quiet", "tools", "training"]
