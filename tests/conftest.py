import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "tests" / "assets"
TOKENIZER = ASSETS / "tokenizer"
TRAIN = ASSETS / "persona_chat_train.jsonl"
VAL = ASSETS / "persona_chat_val.jsonl"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def in_repo_root(monkeypatch):
    """Configs use paths relative to the repository root, as the README's commands do."""
    monkeypatch.chdir(ROOT)
    return ROOT


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER)


def tiny_model(preset="tiny-qwen3", seed=0):
    from mgmlora.models.causal_lm import ModelArgs, load_causal_lm

    return load_causal_lm(ModelArgs(preset=preset, dtype="float32", gradient_checkpointing=False, init_seed=seed))
