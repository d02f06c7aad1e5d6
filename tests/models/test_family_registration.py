"""A new image-text family is one module: registered from this file alone, it trains through the LLaVA DataModule
and the LightningModule with its own template and its own image tensor, and no file in data/, training/ or tools/
knows it."""

import json
import shutil

import lightning as L
import pytest
import torch
from PIL import Image
from torch import nn

from mgmlora.batch import IGNORE_INDEX, IMAGE_TOKEN_INDEX, Batch
from mgmlora.data.llava_datamodule import LlavaDataModule
from mgmlora.models import Family, ModelArgs, ModelInfo, register_family
from mgmlora.models.causal_lm import load_causal_lm
from mgmlora.models.head import output_head
from mgmlora.models.loaded import LoadedModel
from mgmlora.models.processor import IMAGE_PLACEHOLDER, Processor
from mgmlora.training.lora import LoraArgs
from mgmlora.training.module import LoraLitModule
from mgmlora.training.trainable import Trainability
from tests.conftest import ASSETS, ROOT

PATCHES, PATCH = 4, 4  # an image is a 2x2 grid of 4x4 RGB patches: (4, 48) per sample, one tensor
NAME = "tiny-patch-vlm"


class PatchProcessor(Processor):
    """This family's template ("Q: ... A: ..." with the image after the question) and its one patch tensor."""

    image_tokens, max_length = PATCHES, 256

    def render(self, rounds, has_image):
        text, spans = "", []
        for i, (question, answer) in enumerate(rounds):
            image = f" {IMAGE_PLACEHOLDER}" if i == 0 and has_image else ""
            text += f"Q: {question}{image}\nA: "
            start = len(text)
            text += f"{answer}\n"
            spans.append((start, len(text)))
        return text, spans

    def image_inputs(self, image, aspect):
        if image is None:
            return {"patches": torch.zeros(PATCHES, 3 * PATCH * PATCH)}
        pixels = torch.tensor(list(image.resize((2 * PATCH, 2 * PATCH), Image.Resampling.BILINEAR).getdata()))
        grid = pixels.float().div(255).view(2, PATCH, 2, PATCH, 3)  # (rows, y, cols, x, rgb)
        return {"patches": grid.permute(0, 2, 1, 3, 4).reshape(PATCHES, 3 * PATCH * PATCH)}  # (4, 48)


class PatchVlm(nn.Module):
    """A tiny Qwen3 language model and a linear patch encoder whose outputs replace the image placeholder."""

    def __init__(self, llm):
        super().__init__()
        self.llm = llm
        self.patch_encoder = nn.Linear(3 * PATCH * PATCH, llm.config.hidden_size)


class LoadedPatchVlm(LoadedModel):
    components = {"projector": ("patch_encoder.",)}
    seen_patches: list[tuple[int, ...]] = []

    def language_model(self):
        return self.model.llm

    def forward_hidden(self, batch: Batch, packed: bool, pad_to: int = 0):
        assert not packed, "this family does not pack"
        patches = batch.model_inputs["patches"]  # (B, 4, 48)
        LoadedPatchVlm.seen_patches.append(tuple(patches.shape))
        image = self.model.patch_encoder(patches)  # (B, 4, H)
        embed = self.model.llm.get_input_embeddings()
        rows, labels = [], []
        for b in range(len(batch)):
            n = int(batch.attention_mask[b].sum())
            ids, lab = batch.input_ids[b, :n], batch.labels[b, :n]
            where = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
            if where:
                k = where[0]
                parts = [embed(ids[:k]), image[b], embed(ids[k + 1:])]
                lab = torch.cat([lab[:k], torch.full((PATCHES,), IGNORE_INDEX), lab[k + 1:]])
            else:
                parts = [embed(ids)]
            rows.append(torch.cat(parts))  # (n', H)
            labels.append(lab)
        t = max(len(r) for r in rows)
        hidden_in = torch.stack([nn.functional.pad(r, (0, 0, 0, t - len(r))) for r in rows])  # (B, T', H)
        label_out = torch.stack([nn.functional.pad(x, (0, t - len(x)), value=IGNORE_INDEX) for x in labels])
        mask = torch.stack([torch.arange(t) < len(r) for r in rows]).long()  # (B, T')
        out = self.model.llm.model(inputs_embeds=hidden_in, attention_mask=mask, use_cache=False)
        return out.last_hidden_state, label_out, output_head(self.model.llm)


def _recognises(args: ModelArgs) -> bool:
    config = (args.model_path or "") and json.loads((ROOT / args.model_path / "config.json").read_text())
    return bool(config) and config.get("family") == NAME


def _info(args: ModelArgs) -> ModelInfo:
    return ModelInfo(NAME, 512, image_tokens=PATCHES, max_length=PatchProcessor.max_length,
                     processor=PatchProcessor())


def _load(args: ModelArgs, attn, weights) -> LoadedModel:
    llm = load_causal_lm(ModelArgs(preset="tiny-qwen3", dtype="float32", gradient_checkpointing=False,
                                   init_seed=args.init_seed), attn, weights=False)
    torch.manual_seed(args.init_seed)
    return LoadedPatchVlm(PatchVlm(llm), _info(args), "llm.model.layers", moe=False)


@pytest.fixture
def patch_vlm(tmp_path):
    checkpoint = tmp_path / "patch-vlm"
    shutil.copytree(ASSETS / "tokenizer", checkpoint)  # the tiny Qwen3 tokenizer; the family brings its template
    (checkpoint / "config.json").write_text(json.dumps({"family": NAME, "model_type": NAME}))
    unregister = register_family(Family(NAME, _recognises, _info, _load))
    LoadedPatchVlm.seen_patches = []
    yield checkpoint
    unregister()


def test_a_family_registered_from_a_test_file_trains_through_the_llava_datamodule_and_the_lightning_module(patch_vlm):
    module = LoraLitModule(ModelArgs(model_path=str(patch_vlm), dtype="float32", gradient_checkpointing=False),
                           lora=LoraArgs(preset="balanced", lora_dropout=0.0), trainable=Trainability())
    llava = ASSETS / "llava"
    data = LlavaDataModule(str(llava / "llava_demo.json"), str(llava), batch_size=4)
    data.connect(module.tokenizer, module.info)
    data.setup("fit")

    # the family's template and image placeholder, as its processor renders them
    first = data.splits["train"][0]
    prompt = module.tokenizer.decode([t for t in first.input_ids if t != IMAGE_TOKEN_INDEX])
    assert prompt.startswith("Q: What colour is the shape?") and "\nA: A blue circle" in prompt
    assert first.input_ids.count(IMAGE_TOKEN_INDEX) == 1
    supervised = module.tokenizer.decode([t for t in first.labels if t != IGNORE_INDEX])
    assert supervised == "A blue circle on a white background.\n"

    before = {}

    class Snapshot(L.Callback):
        def on_train_start(self, trainer, pl_module):
            before.update({n: p.detach().clone() for n, p in pl_module.loaded.model.named_parameters()})

    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        callbacks=[Snapshot()])
    trainer.fit(module, data)
    assert LoadedPatchVlm.seen_patches and all(s[1:] == (PATCHES, 48) for s in LoadedPatchVlm.seen_patches)
    after = dict(module.loaded.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert any("lora_" in n for n in changed) and any(n.startswith("patch_encoder.") for n in changed)
    assert not any(n.startswith("llm.") and "lora_" not in n for n in changed)  # the base stays frozen


def test_no_file_in_data_training_or_tools_names_the_new_family():
    package = ROOT / "src" / "mgmlora"
    for folder in ("data", "training", "tools"):
        for path in (package / folder).glob("*.py"):
            assert NAME not in path.read_text() and "patch_encoder" not in path.read_text(), path
