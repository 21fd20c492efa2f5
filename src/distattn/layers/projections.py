"""The q/k/v and o projections of one head layout, and their HF weight loading.

A module that owns projections (NeuronAttentionBase for its prefill heads, a
`HeadShard` for decode heads that differ under context / data parallelism) holds
`q_proj`, `k_proj`, `v_proj` (or `qkv_proj`) and `o_proj` built by
`build_projections`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..config import AttentionConfig
from ..parallel.comm import Group, group_size
from ..parallel.layout import HeadLayout
from .linear import ColumnParallelLinear, RowParallelLinear
from .lora import LoraWeights


class Projections(nn.Module):
    """A module holding one head layout's projections (`build_projections`): `qkv_proj` (fused) or
    `q_proj` / `k_proj` / `v_proj`, and `o_proj`."""

    qkv_proj: ColumnParallelLinear
    q_proj: ColumnParallelLinear
    k_proj: ColumnParallelLinear
    v_proj: ColumnParallelLinear
    o_proj: RowParallelLinear

    def projection(self, name: str) -> ColumnParallelLinear | RowParallelLinear:
        """The projection called `name` ("q_proj", ..., "o_proj")."""
        module = self.get_submodule(name)
        assert isinstance(module, (ColumnParallelLinear, RowParallelLinear))  # built by build_projections
        return module


def build_projections(owner: Projections, config: AttentionConfig, layout: HeadLayout, group: Group, **kw: Any) -> None:
    """Give `owner` the projections of `layout`'s heads, sharded over `group`."""
    dim, ranks = config.head_dim, group_size(group)
    q_width, kv_width = ranks * layout.n_q * dim, ranks * layout.n_kv * dim  # global, padded/replicated
    proj_kw = dict(bias=config.qkv_bias, group=group, **kw)
    if config.fused_qkv:
        owner.qkv_proj = ColumnParallelLinear(config.hidden_size, q_width + 2 * kv_width, fused_qkv=True, **proj_kw)
    else:
        owner.q_proj = ColumnParallelLinear(config.hidden_size, q_width, **proj_kw)
        owner.k_proj = ColumnParallelLinear(config.hidden_size, kv_width, **proj_kw)
        owner.v_proj = ColumnParallelLinear(config.hidden_size, kv_width, **proj_kw)
    owner.o_proj = RowParallelLinear(q_width, config.hidden_size, bias=config.o_bias, group=group, **kw)


def project(
    owner: Projections, config: AttentionConfig, layout: HeadLayout, x: torch.Tensor, adapter_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x `[B, S, hidden]` -> q `[B, S, n_q, D]`, k and v `[B, S, n_kv, D]` (clipped).

    adapter_ids `[B]`: each row's LoRA adapter (-1: none), when adapters are loaded.
    """
    dim = config.head_dim
    if config.fused_qkv:
        q, k, v = owner.qkv_proj(x, adapter_ids).split([layout.n_q * dim, layout.n_kv * dim, layout.n_kv * dim], dim=-1)
    else:
        q, k, v = owner.q_proj(x, adapter_ids), owner.k_proj(x, adapter_ids), owner.v_proj(x, adapter_ids)
    if config.clip_qkv is not None:
        q, k, v = (t.clamp(-config.clip_qkv, config.clip_qkv) for t in (q, k, v))
    batch, seq, _ = x.shape
    return (
        q.view(batch, seq, layout.n_q, dim),
        k.view(batch, seq, layout.n_kv, dim),
        v.view(batch, seq, layout.n_kv, dim),
    )


def cut_heads(source: Any, name: str, slots: tuple[int | None, ...], head_dim: int, dim: int = 0) -> torch.Tensor:
    """Heads `slots` of a tensor holding every head as blocks of `head_dim` along `dim`.

    Reads only those blocks from `source` (a StateDictSource or CheckpointSource);
    padding slots (None) become zeros.
    """
    shape = list(source.shape(name))
    runs: list[tuple[int | None, int]] = []  # (first head or None for padding, how many): consecutive heads read at once
    for head in slots:
        last = runs[-1] if runs else None
        if last is not None and ((head is None and last[0] is None) or (head is not None and last[0] is not None and head == last[0] + last[1])):
            runs[-1] = (last[0], last[1] + 1)
        else:
            runs.append((head, 1))
    if len(runs) == 1 and runs[0][0] is not None:  # one range (every head of a layer at tp 1): no copy
        return source.read(name, dim, runs[0][0] * head_dim, (runs[0][0] + runs[0][1]) * head_dim)
    dtype = source.read(name, dim, 0, 0).dtype  # an empty slice: the stored dtype, no data
    blocks = []
    for first, count in runs:
        if first is None:
            blocks.append(torch.zeros(shape[:dim] + [count * head_dim] + shape[dim + 1 :], dtype=dtype))
        else:
            blocks.append(source.read(name, dim, first * head_dim, (first + count) * head_dim))
    return torch.cat(blocks, dim=dim)


@torch.no_grad()
def load_projections(owner: Projections, config: AttentionConfig, layout: HeadLayout, source: Any, names: set[str]) -> None:
    """Copy `layout`'s rows / columns (checked by the caller) from `source` into owner's projections."""
    dim = config.head_dim

    def rows(proj: str, slots: tuple[int | None, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight rows, bias rows or None) of `slots`' heads."""
        bias = cut_heads(source, f"{proj}.bias", slots, dim) if f"{proj}.bias" in names else None
        return cut_heads(source, f"{proj}.weight", slots, dim), bias

    q, k, v = rows("q_proj", layout.q_heads), rows("k_proj", layout.kv_heads), rows("v_proj", layout.kv_heads)
    if config.fused_qkv:
        biases = [b for _, b in (q, k, v) if b is not None]
        owner.qkv_proj.load_shard(torch.cat([q[0], k[0], v[0]]), torch.cat(biases) if config.qkv_bias and biases else None)
    else:
        owner.q_proj.load_shard(*q)
        owner.k_proj.load_shard(*k)
        owner.v_proj.load_shard(*v)
    o_bias = source.read("o_proj.bias") if "o_proj.bias" in names else None
    owner.o_proj.load_shard(cut_heads(source, "o_proj.weight", layout.q_heads, dim, dim=1), o_bias)


@torch.no_grad()
def load_lora(owner: Projections, config: AttentionConfig, layout: HeadLayout, adapters: Sequence[LoraWeights]) -> None:
    """Give owner's projections the stacked LoRA halves of `adapters` for `layout`'s heads.

    Shapes were checked by the caller. Column-parallel q/k/v keep A whole and B's rows
    of their heads (padding heads: zero rows); o_proj keeps A's columns of its q heads
    and B whole. Ranks are zero-padded to the largest; scales are folded into B; one
    zero slot after the adapters serves rows without an adapter. Fused QKV stacks the
    three A and puts the three B on a block diagonal. A projection no adapter touches
    keeps no LoRA tensors and does no LoRA work.
    """
    dim = config.head_dim
    rank = max((a.rank for a in adapters), default=0)
    weight = owner.o_proj.weight
    slots = {"q_proj": layout.q_heads, "k_proj": layout.kv_heads, "v_proj": layout.kv_heads, "o_proj": layout.q_heads}

    def halves(adapter: LoraWeights, proj: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A `[rank, in_local]`, scale * B `[out_local, rank]`) of one adapter, zeros where it has none."""
        column = proj != "o_proj"
        names = adapter.shapes()
        if f"{proj}.lora_A.weight" not in names:
            width = config.hidden_size if column else len(slots[proj]) * dim
            out = len(slots[proj]) * dim if column else config.hidden_size
            return torch.zeros(rank, width, dtype=torch.float64), torch.zeros(out, rank, dtype=torch.float64)
        src = adapter.source
        if column:
            a, b = src.read(f"{proj}.lora_A.weight"), cut_heads(src, f"{proj}.lora_B.weight", slots[proj], dim)
        else:
            a, b = cut_heads(src, "o_proj.lora_A.weight", slots[proj], dim, dim=1), src.read("o_proj.lora_B.weight")
        a, b = a.double(), b.double() * adapter.scale
        pad = rank - a.shape[0]
        return torch.nn.functional.pad(a, (0, 0, 0, pad)), torch.nn.functional.pad(b, (0, pad))

    def stack(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.stack([p[0] for p in pairs] + [torch.zeros_like(pairs[0][0])])  # slot N: no adapter
        b = torch.stack([p[1] for p in pairs] + [torch.zeros_like(pairs[0][1])])
        return a.to(weight), b.to(weight)

    def adapted(*projs: str) -> list[str]:
        """Those of projs that some adapter adapts (the others skip LoRA work entirely)."""
        return [p for p in projs if any(f"{p}.lora_A.weight" in a.shapes() for a in adapters)]

    for name in (("qkv_proj",) if config.fused_qkv else ("q_proj", "k_proj", "v_proj")) + ("o_proj",):
        owner.projection(name).set_lora(None, None)
    if config.fused_qkv:
        if adapted("q_proj", "k_proj", "v_proj"):
            fused = []
            for adapter in adapters:
                parts = [halves(adapter, proj) for proj in ("q_proj", "k_proj", "v_proj")]
                fused.append((torch.cat([p[0] for p in parts]), torch.block_diag(*[p[1] for p in parts])))
            owner.qkv_proj.set_lora(*stack(fused))
    else:
        for proj in adapted("q_proj", "k_proj", "v_proj"):
            owner.projection(proj).set_lora(*stack([halves(a, proj) for a in adapters]))
    if adapted("o_proj"):
        owner.o_proj.set_lora(*stack([halves(a, "o_proj") for a in adapters]))


class HeadShard(Projections):
    """Projections of a second head layout (decode heads under context / data parallelism)."""

    def __init__(self, config: AttentionConfig, layout: HeadLayout, group: Group, **kw: Any) -> None:
        super().__init__()
        build_projections(self, config, layout, group, **kw)
