"""The head the fast losses call gives the logits the model's own forward returns (mgmlora.models.output_head).

Gemma-2 soft-caps its logits, Cohere multiplies them by `logit_scale`, Granite divides them by `logits_scaling`:
each tiny model's `forward` logits are the reference.
"""

import pytest
import torch
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
)

from mgmlora.models.head import PostProcessedHead, output_head
from tests.conftest import forward_hidden, tiny_model

SIZES = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, use_cache=False)


def _gemma2():
    return Gemma2ForCausalLM(Gemma2Config(**SIZES, final_logit_softcapping=5.0))


def _cohere():
    return CohereForCausalLM(CohereConfig(**SIZES, logit_scale=0.25))


def _granite():
    return GraniteForCausalLM(GraniteConfig(**SIZES, logits_scaling=4.0))


@pytest.mark.parametrize("build", [_gemma2, _cohere, _granite],
                         ids=["gemma2-softcap", "cohere-scale", "granite-scaling"])
def test_output_head_gives_the_models_forward_logits(build):
    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)  # logits large enough for a soft cap to bend them
    ids = torch.randint(0, 128, (2, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
        hidden, _, head, _ = forward_hidden(model, "causal_lm", batch, packed=False)
        got = head(hidden)
        plain = model.get_output_embeddings()(hidden)
    assert isinstance(head, PostProcessedHead)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain, expected, rtol=1e-2, atol=1e-2)  # the transform matters here


def test_a_plain_head_is_returned_unwrapped():
    model = tiny_model()
    assert output_head(model) is model.lm_head
