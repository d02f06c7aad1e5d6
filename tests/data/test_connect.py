"""DataModules get the model's tokenizer and ModelInfo through `connect`; their own tokenizer loads as the model's."""

import shutil

import pytest

from mgmlora.data.datamodule import ChatDataModule
from mgmlora.data.llava_datamodule import LlavaDataModule
from mgmlora.errors import MgmloraError
from mgmlora.models import model_info
from mgmlora.models.args import ModelArgs
from tests.conftest import ASSETS, TOKENIZER, TRAIN, connect_data


@pytest.mark.parametrize("make", [lambda: ChatDataModule(str(TRAIN), tokenizer_path=str(TOKENIZER)),
                                  lambda: LlavaDataModule(str(ASSETS / "llava" / "llava_demo.json"),
                                                          str(ASSETS / "llava"))], ids=["chat", "llava"])
def test_setup_without_connect_names_the_fix(make):
    with pytest.raises(MgmloraError, match=r"setup\('fit'\) before connect\(\): call "
                                           r"datamodule.connect\(model.tokenizer, model.info\) first"):
        make().setup("fit")


def test_connect_hands_over_the_models_tokenizer_object_and_info(tokenizer):
    info = model_info(ModelArgs(preset="tiny-qwen3"))
    dm = ChatDataModule(str(TRAIN))
    dm.connect(tokenizer, info)
    dm.setup("fit")
    assert dm.tokenizer is tokenizer and dm.info is info and dm.splits["train"]


def test_data_tokenizer_path_is_loaded_with_the_models_checks(tmp_path):
    """No chat template: refused naming the data key; no pad token: eos pads, as on the model side."""
    bare = tmp_path / "no_template"
    shutil.copytree(TOKENIZER, bare)
    (bare / "chat_template.jinja").unlink()
    with pytest.raises(ValueError, match=rf"data.init_args.tokenizer_path: the tokenizer in {bare} has no chat "
                                         "template.*chat_template.jinja"):
        connect_data(ChatDataModule(str(TRAIN), tokenizer_path=str(bare)))

    from transformers import AutoTokenizer

    unpadded = tmp_path / "no_pad"
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    tok.pad_token = None
    tok.save_pretrained(unpadded)
    assert AutoTokenizer.from_pretrained(unpadded).pad_token_id is None  # the fixture really lacks a pad token
    dm = connect_data(ChatDataModule(str(TRAIN), tokenizer_path=str(unpadded)))
    assert dm.tokenizer.pad_token_id == tok.eos_token_id


@pytest.mark.integration
def test_mgm_cli_connects_the_datamodule_to_the_models_tokenizer(tmp_path, in_repo_root):
    from mgmlora.cli import main

    cli = main(["--config", "configs/demo.yaml", "--trainer.logger.init_args.save_dir", str(tmp_path)], run=False)
    assert cli.datamodule.tokenizer is cli.model.tokenizer and cli.datamodule.info is cli.model.info


def test_counts_no_loader_can_run_are_refused_by_key_before_any_file_is_read(tmp_path):
    from types import SimpleNamespace

    from mgmlora.errors import UsageError

    dm = connect_data(ChatDataModule(str(tmp_path / "not_read.jsonl"), batch_size=0, eval_batch_size=0, num_workers=-1,
                                     max_length=0))  # 0 was read as unset: the model's default length
    said = (r"^data.init_args.batch_size must be >= 1 \(got 0\); "
            r"data.init_args.eval_batch_size must be >= 1 \(got 0\); "
            r"data.init_args.max_length must be >= 1 \(got 0\); "
            r"data.init_args.num_workers must be >= 0 \(got -1\)\.$")
    with pytest.raises(UsageError, match=said):
        dm.setup("fit")
    dm = connect_data(ChatDataModule(str(tmp_path / "not_read.jsonl")))
    dm.trainer = SimpleNamespace(accumulate_grad_batches=0)
    with pytest.raises(UsageError, match=r"^trainer.accumulate_grad_batches must be >= 1 \(got 0\)\.$"):
        dm.setup("fit")
