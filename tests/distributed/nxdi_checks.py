"""NxDI-ported attention subclasses across processes: every family at tp 2, and cp 2 / dp 2, equals HF.

Each rank builds the same HF model and NxDI config (neuron_config.tp_degree=2: the
layers find their process groups from the degrees, as NxDI model code expects), runs
prefill, decode across the window/chunk boundary and a speculative step, and compares
its (all-reduced) outputs with HF's.
"""

from __future__ import annotations

import torch

from distattn.nxdi.models.config import NeuronConfig


def nxdi_tp_worker(rank: int, world_size: int) -> None:
    from hf_reference import FAMILIES, build_model
    from nxdi_ports import build_port
    from test_nxdi import port_error
    from tolerances import FP32_VS_HF

    _, modules = build_port("gpt_oss", build_model("gpt_oss"), NeuronConfig(torch_dtype=torch.float32, tp_degree=world_size))
    assert modules[0].groups.tp_size == world_size and modules[0].num_heads == 4 // world_size  # really sharded
    assert modules[0].learned_sinks.shape == (4 // world_size,)
    for family in FAMILIES:
        err, scale = port_error(family, NeuronConfig(torch_dtype=torch.float32, tp_degree=world_size))
        assert scale > 0.5
        assert err <= FP32_VS_HF, f"{family} at tp {world_size}: max abs diff {err:.3g}"
    # neuron_config's context-parallel prefill and data-parallel decode degrees
    _, modules = build_port("qwen3", build_model("qwen3"), NeuronConfig(torch_dtype=torch.float32, tp_degree=world_size, cp_degree=2, attention_dp_degree=2))
    assert (modules[0].groups.cp_size, modules[0].groups.dp_size) == (2, 2)
    for family, degrees in (("gpt_oss", {"cp_degree": 2}), ("llama4", {"cp_degree": 2}), ("qwen3", {"attention_dp_degree": 2})):
        err, _ = port_error(family, NeuronConfig(torch_dtype=torch.float32, tp_degree=world_size, **degrees))
        assert err <= FP32_VS_HF, f"{family} with {degrees}: max abs diff {err:.3g}"
