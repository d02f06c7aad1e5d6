import json
import shutil

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from peft import PeftModel
from safetensors.torch import load_file

from mgmlora.batch import Batch
from mgmlora.data.datamodule import ChatDataModule
from mgmlora.models.args import ModelArgs
from mgmlora.training.checkpoint import AdapterCheckpointIO
from mgmlora.training.lora import LoraArgs
from mgmlora.training.module import LoraLitModule
from mgmlora.training.optim import OptimArgs
from tests.conftest import TOKENIZER, TRAIN, VAL, StepLosses, connect_data, tiny_model


def _module(**lora):
    model = ModelArgs(preset="tiny-qwen3", tokenizer_path=str(TOKENIZER), dtype="float32", gradient_checkpointing=False)
    lora = {"lora_dropout": 0.0, **lora}
    return LoraLitModule(model, LoraArgs(preset="balanced", init_lora_weights="gaussian", **lora),
                         OptimArgs(lr=1e-2, warmup_ratio=0.0))


def _subset(tmp_path, n):
    path = tmp_path / f"train{n}.jsonl"
    path.write_text("".join(TRAIN.read_text().splitlines(keepends=True)[:n]))
    return str(path)


class _GradCapture(L.Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads = {n: p.grad.clone() for n, p in pl_module.model.named_parameters() if p.grad is not None}


def _grads(train_path, batch_size, accumulate, **data_args):
    torch.manual_seed(0)
    module, capture = _module(), _GradCapture()
    data = connect_data(ChatDataModule(train_path, batch_size=batch_size, shuffle=False, **data_args), module)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, accumulate_grad_batches=accumulate, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, callbacks=[capture], plugins=[AdapterCheckpointIO()])
    trainer.fit(module, data)
    return capture.grads, module, data


def test_accumulation_gives_the_same_gradient_as_one_big_batch(tmp_path):
    path = _subset(tmp_path, 4)
    big, module, data = _grads(path, batch_size=4, accumulate=1)
    accumulated, _, _ = _grads(path, batch_size=1, accumulate=4)
    assert big.keys() == accumulated.keys() and len(big) > 0
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], rtol=1e-5, atol=1e-7, msg=name)

    # The test can fail: a mean of per-sample means (what per-micro-batch averaging gives) is a different gradient,
    # because the samples' supervised-token counts differ.
    counts = [s.num_supervised for s in data.splits["train"]]
    assert len(set(counts)) > 1
    fresh = _module()
    fresh.configure_model()
    fresh.model.load_state_dict(module.model.state_dict())
    fresh.model.zero_grad()
    for sample in data.splits["train"]:
        batch = Batch(torch.tensor([sample.input_ids]), torch.ones(1, len(sample.input_ids), dtype=torch.long),
                      torch.tensor([sample.labels]))
        out = fresh._loss_sum(batch)
        (out.loss_sum / out.n_tokens / 4).backward()
    naive = {n: p.grad for n, p in fresh.model.named_parameters() if p.grad is not None}
    assert any(not torch.allclose(naive[n], big[n], rtol=1e-3) for n in big)


def _fit(tmp_path, name, max_steps, ckpt_path=None, every=2, dropout=0.0, val=False, num_workers=0):
    torch.manual_seed(0)
    module, record = _module(lora_dropout=dropout), StepLosses()
    data = ChatDataModule(_subset(tmp_path, 16), val_path=str(VAL) if val else None, batch_size=2, shuffle=True,
                          seed=3, num_workers=num_workers)
    data.connect(module.tokenizer, module.info)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / name, filename="{step:06d}", every_n_train_steps=every,
                                 save_top_k=-1)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, accumulate_grad_batches=2, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        callbacks=[checkpoint, record], plugins=[AdapterCheckpointIO()], default_root_dir=tmp_path,
                        val_check_interval=2 if val else None, limit_val_batches=1, num_sanity_val_steps=int(val))
    trainer.fit(module, data, ckpt_path=ckpt_path)
    module.step_losses = record.losses
    return module


def test_checkpoint_is_adapter_only_and_loads_with_plain_peft(tmp_path):
    module = _fit(tmp_path, "a", max_steps=2)
    ckpt = tmp_path / "a" / "step=000002.ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                       "trainer_state.pt"]
    weights = load_file(ckpt / "adapter_model.safetensors")
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    assert state["state_dict"] == {} and state["global_step"] == 2 and state["optimizer_states"]
    assert json.loads((ckpt / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-qwen3"

    reloaded = PeftModel.from_pretrained(tiny_model(), ckpt).eval()
    ids = torch.randint(0, 512, (2, 16))
    module.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, module.model(input_ids=ids).logits)


@pytest.mark.integration  # about 1 s or more: keeps the fast tier under CI's 2 minutes
def test_resume_with_dropout_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path):
    # Dropout draws random numbers: the checkpoint must carry them. Validation every 2 steps and the DataLoader's
    # iterator creation draw from the same generators between training steps, differently in the two runs.
    straight = _fit(tmp_path, "straight", max_steps=7, dropout=0.1, val=True)  # 4 steps per epoch
    assert sorted(straight.step_losses) == list(range(1, 8))
    before = _module()
    before.configure_model()
    trained = dict(straight.model.named_parameters())
    assert any(not torch.allclose(before.model.state_dict()[n], p) for n, p in trained.items() if p.requires_grad)
    for stop in (2, 4):  # mid-epoch, and at the end of the first epoch
        resumed = _fit(tmp_path, f"resumed{stop}", max_steps=7, dropout=0.1, val=True,
                       ckpt_path=tmp_path / "straight" / f"step={stop:06d}.ckpt")
        later = {s: v for s, v in straight.step_losses.items() if s > stop}
        assert {s: resumed.step_losses[s] for s in later} == later, stop  # bit-identical, not approximately
        a, b = dict(straight.model.named_parameters()), dict(resumed.model.named_parameters())
        assert all(torch.equal(a[n], b[n]) for n in a if a[n].requires_grad), stop

    # The test can fail: the same checkpoint without its random-number state resumes with other dropout masks.
    ckpt = tmp_path / "norng" / "step=000002.ckpt"
    shutil.copytree(tmp_path / "straight" / "step=000002.ckpt", ckpt)
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    del state["rng_states"]
    torch.save(state, ckpt / "trainer_state.pt")
    other = _fit(tmp_path, "other", max_steps=3, dropout=0.1, val=True, ckpt_path=ckpt)  # step 3: no update yet
    assert other.step_losses[3] != straight.step_losses[3]


@pytest.mark.integration  # worker processes: kept out of the fast tier's 2 minutes
def test_resume_with_dataloader_workers_reproduces_the_uninterrupted_run(tmp_path):
    # Workers only collate here, but they prefetch: the resumed position must be what was trained on, not what the
    # workers had fetched ahead. 4 optimizer steps per epoch; resumed mid-epoch, then across the epoch end.
    in_process = _fit(tmp_path, "in_process", max_steps=6, dropout=0.1)
    straight = _fit(tmp_path, "straight", max_steps=6, dropout=0.1, num_workers=2)
    assert sorted(straight.step_losses) == list(range(1, 7))
    assert straight.step_losses == in_process.step_losses  # workers change no batch
    resumed = _fit(tmp_path, "resumed", max_steps=6, dropout=0.1, num_workers=2,
                   ckpt_path=tmp_path / "straight" / "step=000002.ckpt")
    later = {s: v for s, v in straight.step_losses.items() if s > 2}
    assert {s: resumed.step_losses[s] for s in later} == later  # bit-identical
    a, b = dict(straight.model.named_parameters()), dict(resumed.model.named_parameters())
    assert all(torch.equal(a[n], b[n]) for n in a if a[n].requires_grad)


def test_resume_rejects_a_checkpoint_of_another_lora_config(tmp_path):
    _fit(tmp_path, "a", max_steps=2)
    module = _module(r=4)
    data = connect_data(ChatDataModule(_subset(tmp_path, 16), batch_size=2), module)
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False,
                        use_distributed_sampler=False, plugins=[AdapterCheckpointIO()], default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="r: checkpoint 16 vs config 4"):
        trainer.fit(module, data, ckpt_path=tmp_path / "a" / "step=000002.ckpt")


def test_plain_loader_without_window_counts_averages_micro_batch_means(tmp_path):
    from torch.utils.data import DataLoader

    from mgmlora.data.collate import pad_collate

    data = connect_data(ChatDataModule(_subset(tmp_path, 1), tokenizer_path=str(TOKENIZER)))
    data.setup("fit")
    batch = pad_collate(data.splits["train"][:1], data.tokenizer.pad_token_id)  # no window_tokens

    def grads(copies, accumulate):
        torch.manual_seed(0)
        module, capture = _module(), _GradCapture()
        trainer = L.Trainer(accelerator="cpu", max_steps=1, accumulate_grad_batches=accumulate, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[capture], plugins=[AdapterCheckpointIO()])
        trainer.fit(module, DataLoader([batch] * copies, batch_size=None))
        return capture.grads

    once, twice = grads(1, 1), grads(2, 2)  # the same micro-batch twice: the mean of means equals one of them
    for name in once:
        torch.testing.assert_close(twice[name], once[name], rtol=1e-5, atol=1e-7, msg=name)


def _fit_mgm(tmp_path, projector, max_steps, ckpt_path=None, fn="fit"):
    from mgmlora.data.llava_datamodule import LlavaDataModule
    from mgmlora.training.trainable import Trainability
    from tests.conftest import ASSETS

    torch.manual_seed(0)
    model = ModelArgs(preset="tiny-mgm", tokenizer_path=str(ASSETS / "gemma_tokenizer"), dtype="float32",
                      gradient_checkpointing=False)
    module = LoraLitModule(model, LoraArgs(preset="balanced", lora_dropout=0.0), OptimArgs(warmup_ratio=0.0),
                           Trainability(projector=projector))
    data = LlavaDataModule(str(ASSETS / "llava" / "llava_demo.json"), str(ASSETS / "llava"), batch_size=2,
                           val_path=str(ASSETS / "llava" / "llava_demo_val.json"))
    data.connect(module.tokenizer, module.info)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, limit_val_batches=0,
                        plugins=[AdapterCheckpointIO()], default_root_dir=tmp_path,
                        callbacks=[ModelCheckpoint(tmp_path / "ckpt", filename="{step}", every_n_train_steps=1)])
    getattr(trainer, fn)(module, data, ckpt_path=ckpt_path)


@pytest.mark.integration  # about 1 s or more: keeps the fast tier under CI's 2 minutes
def test_a_checkpoint_that_lost_its_trainables_file_says_so(tmp_path):
    _fit_mgm(tmp_path, "full", max_steps=1)
    ckpt = tmp_path / "ckpt" / "step=1.ckpt"
    (ckpt / "non_lora_trainables.safetensors").unlink()
    with pytest.raises(ValueError, match=r"the checkpoint holds no non-LoRA trainables, but model.trainable trains "
                                         r"\d+ tensors here .*its non_lora_trainables.safetensors is missing"):
        _fit_mgm(tmp_path, "full", max_steps=1, ckpt_path=ckpt, fn="validate")


def test_resume_with_other_trainable_settings_names_the_keys_that_differ(tmp_path):
    _fit_mgm(tmp_path, "full", max_steps=1)
    ckpt = tmp_path / "ckpt" / "step=1.ckpt"
    with pytest.raises(ValueError, match=r"model.trainable.projector: checkpoint 'full' vs config 'frozen'.*Set these "
                                         r"keys back to the checkpoint's values"):
        _fit_mgm(tmp_path, "frozen", max_steps=2, ckpt_path=ckpt)
    _fit_mgm(tmp_path, "frozen", max_steps=2, ckpt_path=ckpt, fn="validate")  # no optimizer state: evaluates


def test_training_with_flex_attention_on_the_cpu_is_refused_before_the_model_loads(tmp_path):
    from mgmlora.errors import UsageError
    from mgmlora.models.attention import check_trains_on

    check_trains_on("flex_attention", torch.device("cuda"))  # a GPU trains it; sdpa trains anywhere
    check_trains_on("sdpa", torch.device("cpu"))
    model = ModelArgs(preset="tiny-qwen3", tokenizer_path=str(TOKENIZER), dtype="float32",
                      attn_implementation="flex_attention")
    module = LoraLitModule(model, LoraArgs(preset="balanced"))
    data = ChatDataModule(_subset(tmp_path, 4), batch_size=2)
    data.connect(module.tokenizer, module.info)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, default_root_dir=tmp_path)
    with pytest.raises(UsageError, match="flex_attention trains on a GPU only.*set it to sdpa"):
        trainer.fit(module, data)
    assert module.model is None  # refused from the settings, nothing loaded
