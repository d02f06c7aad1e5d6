import lightning as L
import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file

from mgmlora.data.llava_datamodule import LlavaDataModule
from mgmlora.models import load_model
from mgmlora.models.args import ModelArgs
from mgmlora.models.loaded import PROJECTOR_PREFIXES
from mgmlora.models.mgm import MGMConfig
from mgmlora.models.mgm_checkpoint import build_mgm
from mgmlora.models.registry import MGM_PRESETS
from mgmlora.training.checkpoint import AdapterCheckpointIO
from mgmlora.training.lora import LoraArgs
from mgmlora.training.module import LoraLitModule
from mgmlora.training.optim import OptimArgs
from mgmlora.training.trainable import Trainability, apply_trainability, load_trainables, trains_language_model
from tests.conftest import ASSETS

TINY_MGM = ModelArgs(preset="tiny-mgm", tokenizer_path=str(ASSETS / "gemma_tokenizer"), dtype="float32",
                     gradient_checkpointing=False)


def _trainable_groups(model):
    names = [n.removeprefix("base_model.model.") for n, p in model.named_parameters() if p.requires_grad]
    return {("lora" if "lora_" in n else "projector" if n.startswith(PROJECTOR_PREFIXES) else n.split(".")[0])
            for n in names}


@pytest.mark.parametrize("llm,projector,expected", [
    ("lora", "full", {"lora", "projector"}),  # MGM's LoRA path (stage 2)
    ("lora", "frozen", {"lora"}),
    ("frozen", "full", {"projector"}),  # stage 1
    ("full", "full", {"llm", "projector"}),  # full fine-tune
])
def test_trainability_per_component(llm, projector, expected):
    model, plan = apply_trainability(load_model(TINY_MGM), LoraArgs(), Trainability(llm=llm, projector=projector))
    assert _trainable_groups(model) == expected
    assert (plan is not None) == (llm == "lora")
    assert not any(p.requires_grad for n, p in model.named_parameters() if "vision_tower" in n)


@pytest.mark.parametrize("llm,projector", [("lora", "full"), ("lora", "frozen"), ("frozen", "full"),
                                           ("full", "frozen")])
def test_trains_language_model_unless_the_llm_is_frozen(llm, projector):
    loaded = load_model(TINY_MGM)
    model, _ = apply_trainability(loaded, LoraArgs(), Trainability(llm=llm, projector=projector))
    assert trains_language_model(model, loaded.components) is (llm != "frozen")
    text = load_model(ModelArgs(preset="tiny-qwen3", dtype="float32"))
    assert trains_language_model(apply_trainability(text, LoraArgs(), Trainability())[0], text.components)


@pytest.mark.parametrize("with_image", [False, True])
def test_only_a_batch_with_an_image_reaches_the_projector_of_a_stage_1_run(with_image):
    # autograd is the second method: a text-only batch leaves the projector's gradients exactly zero
    from mgmlora.batch import IGNORE_INDEX as X
    from mgmlora.batch import IMAGE_TOKEN_INDEX, Batch

    torch.manual_seed(0)
    loaded = load_model(TINY_MGM)
    model, _ = apply_trainability(loaded, LoraArgs(), Trainability(llm="frozen", projector="full"))
    g = torch.Generator().manual_seed(1)
    ids = [[2, 5, IMAGE_TOKEN_INDEX if with_image else 6, 7, 8, 9], [2, 5, 6, 7, 8, 9]]
    batch = Batch(torch.tensor(ids), torch.ones(2, 6, dtype=torch.long), torch.tensor([[X, X, X, 7, 8, 9]] * 2),
                  model_inputs={"images": torch.randn(2, 3, 48, 48, generator=g),
                                "images_aux": torch.randn(2, 3, 96, 96, generator=g)})
    fwd = loaded.forward_hidden(batch, packed=False)
    fwd.head(fwd.hidden).float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert any(bool(g.any()) for g in grads) is with_image
    assert loaded.reaches_components(batch) is with_image
    assert loaded.reaches_components(batch.to("meta")) is with_image  # from the CPU copy, as on a GPU


def test_nothing_to_train_is_an_error():
    with pytest.raises(ValueError, match="nothing would train"):
        apply_trainability(load_model(ModelArgs(preset="tiny-qwen3", dtype="float32")), LoraArgs(),
                           Trainability(llm="frozen"))


def test_mgm_checkpoint_restores_lora_and_projector_and_loads_with_plain_peft(tmp_path):
    def module():
        torch.manual_seed(0)
        return LoraLitModule(TINY_MGM, LoraArgs(lora_dropout=0.0), OptimArgs(lr=1e-2, warmup_ratio=0))

    def data(module):
        dm = LlavaDataModule(str(ASSETS / "llava" / "llava_demo.json"), image_folder=str(ASSETS / "llava"),
                             val_path=str(ASSETS / "llava" / "llava_demo_val.json"), batch_size=4)
        dm.connect(module.tokenizer, module.info)
        return dm

    trained = module()
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False,
                        use_distributed_sampler=False, plugins=[AdapterCheckpointIO()], default_root_dir=tmp_path,
                        limit_val_batches=0)
    trainer.fit(trained, data(trained))
    trainer.save_checkpoint(tmp_path / "mgm.ckpt")
    files = sorted(p.name for p in (tmp_path / "mgm.ckpt").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.safetensors",
                     "trainer_state.pt"]

    restored = module()
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, use_distributed_sampler=False,
              plugins=[AdapterCheckpointIO()]).validate(restored, data(restored), ckpt_path=tmp_path / "mgm.ckpt")
    before = module()
    before.configure_model()
    trained_state, restored_state = trained.model.state_dict(), restored.model.state_dict()
    for name in ("base_model.model.mm_projector.0.weight", "base_model.model.vlm_uni_aux_projector.1.weight",
                 "base_model.model.llm.model.layers.0.self_attn.q_proj.lora_B.default.weight"):
        torch.testing.assert_close(restored_state[name], trained_state[name], msg=name)
        assert not torch.equal(before.model.state_dict()[name], trained_state[name]), name

    # the adapter directory loads onto a fresh MGM with plain PEFT: every adapter tensor, and the projector/mining
    # weights beside it, are the trained ones
    base = build_mgm(MGMConfig.from_dict(MGM_PRESETS["tiny-mgm"]), torch.float32)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "mgm.ckpt")
    saved = load_file(tmp_path / "mgm.ckpt" / "adapter_model.safetensors")
    trained_adapter = get_peft_model_state_dict(trained.model)
    reloaded_adapter = get_peft_model_state_dict(reloaded)
    assert len(saved) == 2 * 6 * 2  # 2 layers x balanced's 6 projections x (A, B)
    assert set(saved) == set(trained_adapter) == set(reloaded_adapter)
    for key in saved:
        torch.testing.assert_close(reloaded_adapter[key], trained_adapter[key], rtol=0, atol=0, msg=key)
        torch.testing.assert_close(saved[key], trained_adapter[key], rtol=0, atol=0, msg=key)
    trainables = load_file(tmp_path / "mgm.ckpt" / "non_lora_trainables.safetensors")
    assert trainables and set(trainables) == set(trained.non_lora_trainables())
    for key, tensor in trainables.items():
        torch.testing.assert_close(tensor, trained_state["base_model.model." + key], rtol=0, atol=0, msg=key)


def test_load_trainables_casts_by_name_and_refuses_unknown_names_before_copying():
    model = load_model(TINY_MGM).model
    name, param = next((n, p) for n, p in model.named_parameters() if n.startswith("mm_projector"))
    saved = torch.full_like(param, 0.5, dtype=torch.bfloat16)
    load_trainables(model, {name: saved}, "ckpt")
    assert param.dtype == torch.float32 and torch.equal(param, saved.float())
    with pytest.raises(ValueError, match=r"ckpt: trained weights \['vision_tower.nope'\] do not exist"):
        load_trainables(model, {name: torch.zeros_like(param), "vision_tower.nope": torch.zeros(1)}, "ckpt")
    assert torch.equal(param, saved.float())  # nothing copied
    with pytest.raises(ValueError, match="other shapes"):  # copy_ would broadcast a row into the matrix
        load_trainables(model, {name: torch.zeros(param.shape[-1])}, "ckpt")
    assert torch.equal(param, saved.float())
