import os
import re
from pathlib import Path

import lightning as L
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


def load_script(path: Path, name: str | None = None):
    """A script that is not a package module (bench/, bin/, tests/scripts/) imported from its file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
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


# A config header's launch command: its --config files in order (a variant overlay comes after its base).
LAUNCH = re.compile(r"^#\s+python bin/main\.py fit((?: --config configs/\S+\.yaml)+)(?: \\| --|$)", re.M)


def launch_files(path: Path) -> list[Path]:
    """The config files of the first `python bin/main.py fit` command in `path`'s header, in order (overrides that
    follow them, such as a model path, are the user's)."""
    header = re.match(r"(?:#.*\n)*", path.read_text())[0]
    match = LAUNCH.search(header)
    assert match, f"{path.name}: no `python bin/main.py fit --config configs/...` line in the header"
    return [ROOT / f for f in match[1].split()[1::2]]


def launch_args(path: Path) -> list[str]:
    return [arg for f in launch_files(path) for arg in ("--config", str(f.relative_to(ROOT)))]



@pytest.fixture(autouse=True)
def _environment_as_found():
    """Each test leaves os.environ as it found it.

    An in-process DeepSpeed or DDP fit sets MASTER_ADDR, MASTER_PORT, LOCAL_RANK and NODE_RANK; processes a later test
    launches inherit them and their ranks wait on that stale rendezvous until the test's timeout.
    """
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


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
    from mgmlora.models.args import ModelArgs
    from mgmlora.models.causal_lm import load_causal_lm

    return load_causal_lm(ModelArgs(preset=preset, dtype="float32", gradient_checkpointing=False, init_seed=seed))


def connect_data(datamodule, module=None, preset="tiny-qwen3"):
    """Connects a DataModule as MgmCLI does: to `module`'s tokenizer and info, else to a tiny preset's (no weights).

    Without a module, a DataModule with `tokenizer_path` loads its own tokenizer in `connect`; otherwise the preset's
    bundled test tokenizer is handed over.
    """
    if module is not None:
        datamodule.connect(module.tokenizer, module.info)
        return datamodule
    from mgmlora.models import model_info
    from mgmlora.models.args import ModelArgs
    from mgmlora.models.causal_lm import load_tokenizer

    tokenizer_dir = ASSETS / ("gemma_tokenizer" if "mgm" in preset else "tokenizer")
    args = ModelArgs(preset=preset, tokenizer_path=str(tokenizer_dir))
    datamodule.connect(None if datamodule.hparams.get("tokenizer_path") else load_tokenizer(args), model_info(args))
    return datamodule


def forward_hidden(model, family, batch, packed, pad_to=0):
    """`LoadedModel.forward_hidden` of a bare model (tests build models directly) on a dict or `Batch`.

    A dict's keys other than input_ids, attention_mask and labels are the family's model inputs (MGM's images).
    """
    from mgmlora.batch import Batch
    from mgmlora.models.loaded import LoadedCausalLM, LoadedMgm, ModelInfo

    cls = LoadedMgm if family == "mgm" else LoadedCausalLM
    if isinstance(batch, dict):
        text = ("input_ids", "attention_mask", "labels")
        batch = Batch(**{k: batch[k] for k in text},
                      model_inputs={k: v for k, v in batch.items() if k not in text})
    return cls(model, ModelInfo(family, 0), "", False).forward_hidden(batch, packed, pad_to)


class StepLosses(L.Callback):
    """The logged train/loss of each optimizer step, by global step (resume tests compare runs with it)."""

    def __init__(self):
        self.losses = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if "train/loss" in trainer.callback_metrics:
            self.losses[trainer.global_step] = trainer.callback_metrics["train/loss"].item()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A 2-step tiny-qwen3 LoRA run (random init, seed 0): `<root>/ckpt/step=2.ckpt` and `<root>/run/version_0/adapter`.

    Shared, read-only: tests that damage or re-export it work on copies.
    """
    from tests.training.test_outcome import _fit

    root = tmp_path_factory.mktemp("tiny_run")
    _fit(root, max_steps=2)
    return root / "ckpt" / "step=2.ckpt"
