"""The training core: LoraLitModule, window normalisation, loss, LoRA, optimizer, checkpoints, callbacks."""
