"""Data: records -> tokenised samples -> typed `Batch`es, behind LightningDataModules.

- `chat`, `chameleons`, `llava`: the three formats (chat JSONL, Chameleons persona JSON, LLaVA image-text JSON).
- `prompts`, `images`, `textfile`: persona prompts and ablations; image decoding to RGB (what an image becomes for
  a model is its family's `Processor`, mgmlora.models.processor); UTF-8 reading.
- `sampling`, `collate`: accumulation-window batch samplers (window token counts and ends, rank shards, resume); the
  padding collate that builds `mgmlora.batch.Batch`.
- `datamodule` (TokenizedDataModule, ChatDataModule), `chameleons_datamodule`, `llava_datamodule`: what a config's
  `data.class_path` names. Each gets the model's tokenizer and ModelInfo through `connect(tokenizer, info)`.
"""

from mgmlora.data.chameleons_datamodule import ChameleonsDataModule
from mgmlora.data.datamodule import ChatDataModule, TokenizedDataModule
from mgmlora.data.llava_datamodule import LlavaDataModule

__all__ = ["ChameleonsDataModule", "ChatDataModule", "LlavaDataModule", "TokenizedDataModule"]
