import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from mgmlora.batch import IGNORE_INDEX, IMAGE_TOKEN_INDEX, Batch
from mgmlora.models.convnext import ConvNeXtTrunk
from mgmlora.models.mgm import MGMConfig, MGMForCausalLM
from mgmlora.models.mgm_checkpoint import build_mgm, load_mgm, save_mgm
from mgmlora.models.registry import MGM_PRESETS
from mgmlora.training.lora import LoraArgs, apply_lora, plan_lora


@pytest.fixture(scope="module")
def tiny():
    return build_mgm(MGMConfig.from_dict(MGM_PRESETS["tiny-mgm"]), torch.float32).eval()


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[2, 5, IMAGE_TOKEN_INDEX, 7, 8, 9], [2, 5, 6, 7, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    x = IGNORE_INDEX
    labels = torch.tensor([[x, x, x, 7, 8, 9], [x, x, 6, 7, x, x]])
    return ids, mask, labels, torch.randn(2, 3, 48, 48, generator=g), torch.randn(2, 3, 96, 96, generator=g)


def test_real_mgm_2b_shapes_and_parameter_count_match_the_spec():
    with torch.device("meta"):
        model = MGMForCausalLM(MGMConfig.from_dict(MGM_PRESETS["mgm-2b"]))
        stages = model.vision_tower_aux(torch.empty(1, 3, 768, 768))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert [tuple(s.shape[1:]) for s in stages] == [(192, 192, 192), (384, 96, 96), (768, 48, 48), (1536, 24, 24)]
    assert round(count(model.vision_tower_aux) / 1e6, 2) == 196.23
    assert round(count(model.vision_tower) / 1e6, 2) == 303.51
    assert round(count(model.mm_projector) / 1e6, 2) == 6.30
    mining = sum(count(getattr(model, f"vlm_uni_{n}_projector")) for n in ("query", "aux", "val"))
    assert round(mining / 1e6, 2) == 6.96
    assert round(count(model) / 1e6, 2) == 3019.17  # lm_head tied to the embeddings


def test_mining_attends_only_within_each_tokens_own_window(tiny):
    feats, aux = torch.randn(1, 36, 32), torch.randn(1, 80, 24, 24)
    with torch.no_grad():
        base = tiny.mine(feats, aux)
        changed = aux.clone()
        changed[:, :, 4:8, 8:12] += 1.0  # the window of grid cell (row 1, col 2): token 1 * 6 + 2 = 8
        delta = (tiny.mine(feats, changed) - base).abs().amax(-1)[0]
    assert base.shape == (1, 36, 32)
    assert delta[8] > 0 and torch.all(delta[torch.arange(36) != 8] == 0)


def test_image_tokens_expand_with_ignored_labels_and_scaled_features(tiny):
    ids, mask, labels, images, aux = _batch()
    with torch.no_grad():
        tokens = tiny.encode_images(images, aux)
        embeds, out_mask, out_labels, positions, _, host_labels = tiny.prepare_inputs(ids, mask, labels, tokens)
    assert tokens.shape == (2, 36, 64)
    assert embeds.shape[:2] == (2, 5 + 36) and out_mask.sum(1).tolist() == [41, 4]
    assert out_labels[0].tolist() == [IGNORE_INDEX] * 38 + [7, 8, 9]
    assert out_labels[1, :4].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 6, 7] and (out_labels[1, 4:] == -100).all()
    scale = tiny.llm.get_input_embeddings().embed_scale
    torch.testing.assert_close(embeds[0, 2:38], tokens[0] * scale)  # Gemma's sqrt(hidden) scale, as MGM-2B
    assert positions[0].tolist() == list(range(41)) and positions[1, 4:].eq(0).all()
    assert torch.equal(host_labels, out_labels)  # the CPU copy the loss reads


def test_the_splice_reads_its_layout_from_the_host_copy_and_never_from_the_device(tiny):
    # Every input on the meta device: a data-dependent read there (nonzero, tolist, boolean indexing, item) raises,
    # as on a GPU it would make the host wait. With the batch's CPU copy the splice and the packing need none.
    ids, mask, labels, images, aux = _batch()
    with torch.no_grad():
        reference = tiny.prepare_inputs(ids, mask, labels, tiny.encode_images(images, aux), packed=True)
    meta = copy.deepcopy(tiny).to("meta")
    host = Batch(ids, mask, labels)
    moved = host.to("meta")
    with torch.no_grad():
        tokens = torch.empty(2, 36, 64, device="meta")
        for packed in (False, True):
            out = meta.prepare_inputs(moved.input_ids, moved.attention_mask, moved.labels, tokens, packed,
                                      host=moved.on_host())
            assert out.embeds.is_meta and out.labels.is_meta and not out.host_labels.is_meta
        assert out.lengths == reference.lengths == [41, 4] and torch.equal(out.host_labels, reference.labels)
        with pytest.raises((RuntimeError, NotImplementedError)):  # the same call without the host copy reads the device
            meta.prepare_inputs(moved.input_ids, moved.attention_mask, moved.labels, tokens, True)


def test_rows_whose_real_tokens_are_not_a_prefix_are_spliced_by_their_mask(tiny):
    # row 1 of _batch (real tokens 2, 5, 6, 7) left-padded (a slice from its first real token) and with holes (a
    # gather by position)
    ids, mask, labels, images, aux = _batch()
    x = IGNORE_INDEX
    layouts = [([0, 0, 2, 5, 6, 7], [0, 0, 1, 1, 1, 1], [x, x, x, x, 6, 7]),
               ([2, 0, 5, 6, 0, 7], [1, 0, 1, 1, 0, 1], [x, x, x, 6, x, 7])]
    with torch.no_grad():
        tokens = tiny.encode_images(images, aux)
        reference = tiny.prepare_inputs(ids, mask, labels, tokens)
        for row_ids, row_mask, row_labels in layouts:
            ids[1], mask[1], labels[1] = (torch.tensor(v) for v in (row_ids, row_mask, row_labels))
            out = tiny.prepare_inputs(ids, mask, labels, tokens)
            assert torch.equal(out.embeds, reference.embeds) and torch.equal(out.labels, reference.labels)
            assert torch.equal(out.attention_mask, reference.attention_mask)


def test_expanded_sequences_are_truncated_to_tokenizer_model_max_length():
    config = MGMConfig.from_dict({**MGM_PRESETS["tiny-mgm"], "tokenizer_model_max_length": 20})
    model = build_mgm(config, torch.float32).eval()
    ids, mask, labels, images, aux = _batch()
    with torch.no_grad():
        out = model(ids, mask, labels, images, aux)
    assert out.logits.shape[1] == 20 and out.labels.shape == (2, 20)


def test_save_load_round_trip_in_the_original_layout(tmp_path, tiny):
    save_mgm(tiny, tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight" in index
    assert "model.vision_tower_aux.vision_stages.1.downsample.1.weight" in index
    assert "model.vlm_uni_aux_projector.1.weight" in index and "model.mm_projector.2.bias" in index
    assert "model.layers.1.mlp.down_proj.weight" in index and "lm_head.weight" not in index  # tied, as the original
    assert json.loads((tmp_path / "config.json").read_text())["mm_hidden_size_aux"] == 80
    reloaded = load_mgm(tmp_path, torch.float32).eval()
    with torch.no_grad():
        a, b = tiny(*_batch()), reloaded(*_batch())
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=0)


def test_bin_checkpoint_with_lm_head_loads_and_bad_keys_are_listed(tmp_path, tiny):
    save_mgm(tiny, tmp_path / "st")
    state = {}
    for shard in sorted((tmp_path / "st").glob("*.safetensors")):
        state.update(load_file(shard))
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    assert isinstance(load_mgm(tmp_path / "bin", torch.float32), MGMForCausalLM)

    del state["model.vlm_uni_val_projector.1.bias"]
    state["model.something_new.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"Missing \(1\): \['model.vlm_uni_val_projector.1.bias'\]. Unexpected \(1\): "
                                         r"\['model.something_new.weight'\]"):
        load_mgm(tmp_path / "bin", torch.float32)


def test_unknown_towers_and_non_mgm_configs_are_rejected():
    with pytest.raises(ValueError, match="not an MGM config"):
        MGMConfig.from_dict({"vocab_size": 10})
    config = MGMConfig.from_dict({**MGM_PRESETS["tiny-mgm"], "mm_vision_tower_config": None})
    with pytest.raises(ValueError, match="unknown vision tower 'tiny-clip'"):
        config.clip_config()


def test_exact_gelu_as_the_original(tiny):
    act = tiny.llm.model.layers[0].mlp.act_fn
    x = torch.linspace(-3, 3, 13)
    torch.testing.assert_close(act(x), torch.nn.functional.gelu(x))


def test_lora_lands_only_in_the_language_model(tiny):
    model = build_mgm(MGMConfig.from_dict(MGM_PRESETS["tiny-mgm"]), torch.float32)
    peft_model = apply_lora(model, plan_lora(model, LoraArgs(preset="aggressive"), decoder_layers="llm.model.layers"))
    lora = [n for n, _ in peft_model.named_parameters() if "lora_" in n]
    assert len(lora) == 2 * 7 * 2 and all(".llm.model.layers." in n for n in lora)
    assert not any(k in n for n in lora for k in ("vision_tower", "mm_projector", "vlm_uni"))


def test_frozen_towers_stay_in_eval_mode_and_out_of_the_graph(tiny):
    model = build_mgm(MGMConfig.from_dict(MGM_PRESETS["tiny-mgm"]), torch.float32)
    model.train()
    assert not model.vision_tower.training and not model.vision_tower_aux.training and model.mm_projector.training
    ids, mask, labels, images, aux = _batch()
    out = model(ids, mask, labels, images, aux)
    out.logits.sum().backward()
    assert all(p.grad is None for p in model.vision_tower.parameters())
    assert all(p.grad is None for p in model.vision_tower_aux.parameters())
    assert model.vlm_uni_aux_projector[1].weight.grad is not None and model.mm_projector[0].weight.grad is not None


def test_convnext_trunk_rejects_bad_shapes():
    with pytest.raises(ValueError, match="4 depths and 4 dims"):
        ConvNeXtTrunk(depths=[1, 1], dims=[8, 16])
