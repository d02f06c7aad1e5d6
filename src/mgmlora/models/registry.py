"""Model presets as data: one entry per model, no subclasses.

A preset pins what a family loader needs to know about a model: its transformers `model_type`, the architecture
(for random-init runs at real shapes and for building tiny test models) and where its decoder layers sit. Whether its
MLPs are mixture-of-experts is read from the built model (`mgmlora.models.causal_lm.is_moe`), not declared here.
Adding a model means adding an entry here.
The real-size architectures are copied from each model's `config.json` on the Hugging Face Hub (linked per entry);
nothing is downloaded: real weights come from a local `model_path`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelPreset:
    """What mgmlora knows about one model.

    Attributes:
        name: registry key, used as `model.preset` in configs.
        model_type: transformers `model_type` (`qwen3`, `qwen3_moe`, ...).
        architecture: config kwargs for `AutoConfig.for_model(model_type, **architecture)`.
        source: where the architecture numbers come from (Hub page), or "test" for tiny models.
        decoder_layers: dotted path of the decoder layer list inside the causal LM; LoRA targets are anchored here.
    """

    name: str
    model_type: str
    architecture: dict[str, Any]
    source: str
    decoder_layers: str = "model.layers"


_QWEN3_COMMON = dict(vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position_embeddings=40960)

PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in [
        # Tiny models: random weights, built from these numbers, used by the demo and the tests. The vocabulary (512)
        # matches the tokenizer committed under tests/assets/tokenizer. initializer_range is 0.3, not transformers'
        # 0.02: with hidden size 64 the frozen random lm_head would otherwise give logits of std ~0.16 (near-uniform
        # predictions that LoRA alone can hardly sharpen), and the demo's loss would barely move.
        ModelPreset(
            name="tiny-qwen3",
            model_type="qwen3",
            source="test",
            architecture=dict(
                vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, tie_word_embeddings=False,
                initializer_range=0.3,
            ),
        ),
        ModelPreset(
            name="tiny-qwen3-moe",
            model_type="qwen3_moe",
            source="test",
            architecture=dict(
                vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
                max_position_embeddings=1024, tie_word_embeddings=False, initializer_range=0.3,
            ),
        ),
        ModelPreset(
            name="qwen3-0.6b",
            model_type="qwen3",
            source="https://huggingface.co/Qwen/Qwen3-0.6B/blob/main/config.json",
            architecture=dict(
                **_QWEN3_COMMON, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
            ),
        ),
        ModelPreset(
            name="qwen3-8b",
            model_type="qwen3",
            source="https://huggingface.co/Qwen/Qwen3-8B/blob/main/config.json",
            architecture=dict(
                **_QWEN3_COMMON, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
            ),
        ),
        ModelPreset(  # 30.5 B parameters, 3.3 B active per token; 56.9 GiB of bf16 weights
            name="qwen3-30b-a3b",
            model_type="qwen3_moe",
            source="https://huggingface.co/Qwen/Qwen3-30B-A3B/blob/main/config.json",
            architecture=dict(
                **_QWEN3_COMMON, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                tie_word_embeddings=False,
            ),
        ),
    ]
}

MOE_MODEL_TYPES = {"qwen3_moe", "qwen2_moe", "mixtral", "olmoe"}


def get_preset(name: str) -> ModelPreset:
    """Returns the preset called `name`.

    Raises:
        KeyError: with the list of known presets, when `name` is not one of them.
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"Unknown model preset {name!r}. Known presets: {', '.join(sorted(PRESETS))}.") from None


# MGM presets: complete config.json contents (Gemma keys + mm_* keys), as an original MGM checkpoint carries them.
# The real one is MGM-2B (docs/design/mgm.md, config.json); the tiny one uses the same code paths with
# tower architectures given inline (`mm_vision_tower_config`, `mm_vision_tower_aux_config`), as test checkpoints do.
MGM_PRESETS: dict[str, dict[str, Any]] = {
    "mgm-2b": dict(
        vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18, num_attention_heads=8,
        num_key_value_heads=1, head_dim=256, max_position_embeddings=8192, rope_theta=10000.0, rms_norm_eps=1e-6,
        hidden_act="gelu", tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        mm_vision_tower="model_zoo/OpenAI/clip-vit-large-patch14-336",
        mm_vision_tower_aux="model_zoo/OpenAI/openclip-convnext-large-d-320-laion2B-s29B-b131K-ft-soup",
        mm_hidden_size=1024, mm_hidden_size_aux=2880, mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
        mm_vision_select_feature="patch", image_size_aux=768, tokenizer_model_max_length=2048,
    ),
    # CLIP 48 px / patch 8 -> a 6x6 grid of 36 image tokens; ConvNeXt at 96 px -> stage 0 is 24x24 -> 4x4 windows.
    "tiny-mgm": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=1024, hidden_act="gelu", tie_word_embeddings=True,
        initializer_range=0.3, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        mm_vision_tower="tiny-clip", mm_vision_tower_aux="tiny-convnext", mm_hidden_size=32, mm_hidden_size_aux=80,
        mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        image_size_aux=96, tokenizer_model_max_length=512,
        mm_vision_tower_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                    image_size=48, patch_size=8),
        mm_vision_tower_aux_config=dict(depths=[1, 1, 2, 1], dims=[8, 16, 24, 32]),
    ),
}
