"""The flex backend (compiled FlexAttention, sinks as an extra key) against the specification.

One shape throughout, so the suite pays torch.compile once.
"""

from __future__ import annotations

import pytest
import torch

from distattn import NeuronAttentionBase
from distattn.hf import attention_config_from_hf
from distattn.kernels import AttentionSpec, get_backend, select_backend
from distattn.ops.reference import attention_reference

from hf_reference import attention_layers, build_model, trace

flex = get_backend("flex")
with torch.no_grad():
    _UNAVAILABLE = flex.supports(torch.empty(1, 1, 1, 8), torch.empty(1, 1, 1, 8), AttentionSpec(1.0))
pytestmark = pytest.mark.skipif(_UNAVAILABLE is not None, reason=f"compiled FlexAttention is unavailable here: {_UNAVAILABLE}")
FLEX_TOLERANCE = 2e-5  # fp32, a different blocking of the same sums (exp in fp32 either way)


@pytest.mark.parametrize("spec", [AttentionSpec(0.25, sliding_window=5), AttentionSpec(0.25, chunk_size=6), AttentionSpec(0.25)])
@pytest.mark.parametrize("with_sinks", [True, False])
@torch.no_grad()
def test_flex_equals_the_specification(spec: AttentionSpec, with_sinks: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 40, 16, generator=gen)
    k, v = torch.randn(2, 2, 40, 16, generator=gen), torch.randn(2, 2, 40, 16, generator=gen)
    pos = torch.arange(40).expand(2, 40).clone()
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, 30:] = False  # padding at the end of row 1
    k_pos = pos.masked_fill(~valid, -1)
    sinks = torch.randn(8, generator=gen) if with_sinks else None
    out, lse = flex.attend(q, k, v, q_pos=pos, k_pos=k_pos, spec=spec, mask=valid.view(2, 1, 40, 1), sinks=sinks)
    assert lse is None
    expected, _ = attention_reference(q, k, v, q_pos=pos, k_pos=k_pos, scale=spec.scale, sliding_window=spec.sliding_window,
                                      chunk_size=spec.chunk_size, mask=valid.view(2, 1, 40, 1), sinks=sinks)
    assert (out - expected).abs().max().item() <= FLEX_TOLERANCE


def test_flex_prefill_matches_hf_and_refuses_merging() -> None:
    """gpt-oss's sliding layer (sinks, bias, YaRN): a 40-token prefill through flex equals HF's module."""
    model = build_model("gpt_oss")
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(3))
    reference = trace(model, ids)
    module = NeuronAttentionBase(attention_config_from_hf(model.config, 0), kernel="flex")
    module.load_hf_state_dict(attention_layers(model)[0].state_dict())
    with torch.no_grad():
        got = module(reference.inputs[0]).hidden_states
        assert (got - reference.outputs[0]).abs().max().item() <= 1e-4  # fp32 against HF, as the parity suite
        with pytest.raises(ValueError, match="kernel='flex' cannot run this call: it returns no log-sum-exp"):
            select_backend("flex", torch.empty(1, 8, 1, 16), torch.empty(1, 2, 9, 16), AttentionSpec(1.0))
    with pytest.raises(ValueError, match="kernel='flex' cannot run this call: compiled FlexAttention on the CPU is inference only"):
        module(reference.inputs[0])
