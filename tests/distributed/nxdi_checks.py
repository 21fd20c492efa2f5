"""NxDI-ported attention subclasses under tensor parallelism: every family at tp 2 equals HF.

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
