"""mgmlora: LoRA fine-tuning of MGM-2B and Qwen3 (dense and MoE) with PyTorch Lightning, fast, on small hardware.

Groups, layered top to bottom (a module imports only from its own group or below; docs/design/architecture.md):
`cli` (the LightningCLI), `tools` (export, generate, leaderboard, memory estimate, reports), `training` (the
LightningModule and everything a step needs), `data` (records to typed batches), `models` (every family behind one
interface), `batch` (the typed micro-batch: the contract between data and step); `errors` and `quiet` serve all.
Importing `mgmlora` itself loads nothing heavy; import the group you need.

Importing it also switches Hugging Face's hub and transformers to offline mode for the whole process, whichever entry
point (a `bin/` tool, a notebook, a test) imports it first and whatever a saved run or the environment says: mgmlora
never downloads at run time (every loader also passes `local_files_only=True`). It must be imported before
`transformers` / `huggingface_hub`, which read these variables once, at their own import; the `bin/` tools do.
"""

import os as _os

_os.environ["HF_HUB_OFFLINE"] = "1"
_os.environ["TRANSFORMERS_OFFLINE"] = "1"

__all__ = ["batch", "cli", "data", "errors", "models", "quiet", "tools", "training"]
