"""mgmlora: LoRA fine-tuning on Lightning, transformers and PEFT.

Layers, top to bottom (each imports only from its own layer or below; pyproject.toml's import contract): cli >
tools > training > data > models > batch > errors > quiet.
"""
