"""Tensor-parallel checks run inside each rank: sharded module == one-process module.

Every rank builds the same full weights and inputs (fixed seeds), runs the
one-process module itself as the reference, and compares its tensor-parallel
outputs and its group's gathered KV caches with it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from distattn import AttentionConfig, KVCacheManager, NeuronAttentionBase
from distattn.hf import hf_attention_shapes
from distattn.lora import LoraWeights
from distattn.parallel import ColumnParallelLinear, GQAStrategy, HeadLayout, ParallelGroups, RowParallelLinear
from distattn.parallel.comm import all_gather

HIDDEN, HEAD_DIM = 32, 8
PROMPTS = (7, 4)  # longer than the window / chunk (4): decode crosses their boundaries
DECODE_STEPS = 5
SPEC_WIDTH = 3
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}  # fp32/fp64: same math, other summation order


@dataclass(frozen=True)
class Case:
    n_heads: int
    n_kv_heads: int
    fields: dict = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    strategy: GQAStrategy | None = None  # None: NxDI's default choice

    def config(self) -> AttentionConfig:
        return AttentionConfig(
            hidden_size=HIDDEN,
            num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads,
            head_dim=HEAD_DIM,
            qkv_bias=True,
            o_bias=True,
            learned_sinks_size=1,
            **self.fields,
        )


ROUTES = [{}, {"sliding_window": 4}, {"attention_chunk_size": 4}]
CASES = [
    # n_kv_heads in {1, 2, 4, 8}; n_heads 6 and 12 do not divide by tp 4 (padding)
    Case(n, kv, {**route, "fused_qkv": fused}, dtype)
    for (n, kv), (route, fused, dtype) in zip(
        [(8, 1), (8, 2), (8, 4), (8, 8), (6, 2), (6, 3), (12, 4), (6, 1), (6, 6)],
        itertools.cycle(
            [
                (ROUTES[0], False, torch.float32),
                (ROUTES[1], True, torch.float64),
                (ROUTES[2], False, torch.float64),
                (ROUTES[1], False, torch.float32),
                (ROUTES[2], True, torch.float32),
            ]
        ),
    )
] + [Case(8, 2, {"sliding_window": 4}, torch.float64, GQAStrategy.CONVERT_TO_MHA)]  # explicit choice


def full_state_dict(config: AttentionConfig, seed: int) -> dict[str, torch.Tensor]:
    """Random HF-layout weights, the same on every rank."""
    gen = torch.Generator().manual_seed(seed)
    return {name: 0.3 * torch.randn(shape, generator=gen, dtype=torch.float64) for name, shape in hf_attention_shapes(config).items()}


def drive(module: NeuronAttentionBase, cache: KVCacheManager, x: torch.Tensor, adapter_ids: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Prefill (right-padded prompts), decode steps, one speculative step; the outputs of each call."""
    batch = x.shape[0]
    outputs = []
    width = max(PROMPTS)
    valid = torch.arange(width).expand(batch, width) < torch.tensor(PROMPTS).unsqueeze(1)
    out = module(x[:, :width], attention_mask=valid, position_ids=torch.arange(width).expand(batch, width), kv_mgr=cache, idx=0,
                 adapter_ids=adapter_ids)
    outputs.append(out.hidden_states.masked_fill(~valid.unsqueeze(-1), 0))
    starts = torch.tensor(PROMPTS)
    for step in range(DECODE_STEPS + 1):
        width = 1 if step < DECODE_STEPS else SPEC_WIDTH
        pos = starts.unsqueeze(1) + torch.arange(width)  # [B, width]
        hidden = torch.stack([x[b, pos[b]] for b in range(batch)])
        outputs.append(module(hidden, position_ids=pos, kv_mgr=cache, idx=0, adapter_ids=adapter_ids).hidden_states)
        starts = starts + width
    return outputs


def gathered_cache(cache: KVCacheManager, config: AttentionConfig, groups: ParallelGroups, strategy, tol: float) -> list[torch.Tensor]:
    """The group's K and V caches as one-process tensors `[B, n_kv_heads, L, D]`; replicas must agree to `tol`.

    (Replicas are computed by different rows of one matmul, so they may differ in the last bit.)
    """
    layer = cache[0]
    layouts = [HeadLayout.from_config(config, groups.tp_size, r, strategy) for r in range(groups.tp_size)]
    result = []
    for local in (layer.k, layer.v):
        parts = all_gather(local, groups.tp)
        full = torch.full((local.shape[0], config.n_kv_heads, *local.shape[2:]), float("nan"), dtype=local.dtype)
        for rank, layout in enumerate(layouts):
            for slot, head in enumerate(layout.kv_heads):
                if head is None:
                    continue
                if not torch.isnan(full[:, head]).all() and not (full[:, head] - parts[rank][:, slot]).abs().max() <= tol:
                    raise AssertionError(f"replicas of kv head {head} differ")
                full[:, head] = parts[rank][:, slot]
        result.append(full)
    return result


def check_case(case: Case, groups: ParallelGroups, seed: int) -> list[str]:
    """Compare one case; return failure messages (empty when it matches)."""
    cfg = case.config()
    weights = full_state_dict(cfg, seed)
    x = torch.randn(len(PROMPTS), 20, HIDDEN, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(case.dtype)
    reference = NeuronAttentionBase(cfg, dtype=case.dtype)
    reference.load_hf_state_dict({k: v.to(case.dtype) for k, v in weights.items()})
    sharded = NeuronAttentionBase(cfg, groups=groups, gqa_strategy=case.strategy, dtype=case.dtype)
    sharded.load_hf_state_dict({k: v.to(case.dtype) for k, v in weights.items()})
    kw = dict(max_batch_size=len(PROMPTS), max_seq_len=24, speculation_width=SPEC_WIDTH)
    ref_cache, tp_cache = KVCacheManager.for_modules([reference], **kw), KVCacheManager.for_modules([sharded], **kw)
    expected, got = drive(reference, ref_cache, x), drive(sharded, tp_cache, x)
    tol = TOLERANCE[case.dtype]
    failures = []
    label = f"tp={groups.tp_size} heads={case.n_heads}/{case.n_kv_heads} {case.fields} {case.dtype} {case.strategy}"
    for step, (e, g) in enumerate(zip(expected, got)):
        err = (e - g).abs().max().item()
        if not err <= tol:
            failures.append(f"{label}: step {step} output differs by {err:.3g}")
    for name, e, g in zip("KV", (ref_cache[0].k, ref_cache[0].v), gathered_cache(tp_cache, cfg, groups, case.strategy, tol)):
        err = (e - g).abs().max().item()
        if not err <= tol:
            failures.append(f"{label}: gathered {name} cache differs by {err:.3g}")
    if not torch.equal(ref_cache[0].positions, tp_cache[0].positions):
        failures.append(f"{label}: cache positions differ")
    return failures


def lora_adapter(config: AttentionConfig, rank: int, targets: tuple[str, ...], seed: int) -> LoraWeights:
    gen = torch.Generator().manual_seed(seed)
    shapes = hf_attention_shapes(config)
    tensors = {}
    for proj in targets:
        out, width = shapes[f"{proj}.weight"]
        tensors[f"{proj}.lora_A.weight"] = 0.3 * torch.randn(rank, width, generator=gen, dtype=torch.float64)
        tensors[f"{proj}.lora_B.weight"] = 0.3 * torch.randn(out, rank, generator=gen, dtype=torch.float64)
    return LoraWeights.from_tensors(tensors, 1.5, name=f"lora{seed}")


def check_lora(groups: ParallelGroups) -> list[str]:
    """Sharded LoRA (B by output rows for q/k/v, A by input columns for o, fused or not) on a batch
    mixing adapters equals, row by row, the one-process module with that adapter merged into W."""
    failures = []
    for fused in (False, True):
        case = Case(6, 2, {"fused_qkv": fused, "sliding_window": 4}, torch.float64)  # 6 heads: padded at tp 4
        cfg = case.config()
        weights = full_state_dict(cfg, 7)
        adapters = [lora_adapter(cfg, 3, ("q_proj", "k_proj", "v_proj", "o_proj"), 1), lora_adapter(cfg, 2, ("v_proj", "o_proj"), 2)]
        ids = torch.tensor([1, -1] if fused else [0, 1])  # two rows: both adapters and a base row over the two cases
        x = torch.randn(len(PROMPTS), 20, HIDDEN, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
        sharded = NeuronAttentionBase(cfg, groups=groups, dtype=torch.float64)
        sharded.load_hf_state_dict(weights)
        sharded.load_lora_adapters(adapters)
        kw = dict(max_batch_size=len(PROMPTS), max_seq_len=24, speculation_width=SPEC_WIDTH)
        got = drive(sharded, KVCacheManager.for_modules([sharded], **kw), x, ids)
        for adapter_id in set(ids.tolist()):
            merged = dict(weights)
            if adapter_id >= 0:
                tensors = adapters[adapter_id].source.tensors
                for name in tensors:
                    if name.endswith("lora_A.weight"):
                        proj = name.split(".")[0]
                        merged[f"{proj}.weight"] = weights[f"{proj}.weight"] + 1.5 * tensors[f"{proj}.lora_B.weight"] @ tensors[name]
            reference = NeuronAttentionBase(cfg, dtype=torch.float64)
            reference.load_hf_state_dict(merged)
            expected = drive(reference, KVCacheManager.for_modules([reference], **kw), x)
            rows = (ids == adapter_id).nonzero().flatten()
            for step, (e, g) in enumerate(zip(expected, got)):
                err = (e[rows] - g[rows]).abs().max().item()
                if not err <= TOLERANCE[torch.float64]:
                    failures.append(f"tp={groups.tp_size} fused={fused} adapter {adapter_id}: call {step} differs by {err:.3g}")
    return failures


def check_paged(groups: ParallelGroups) -> list[str]:
    """A sharded module over the paged cache (local kv heads, block size 3) equals it over the static cache."""
    from distattn.paged import PagedKVCacheManager

    failures = []
    for fields in ({}, {"sliding_window": 4}):
        cfg = Case(6, 2, fields).config()
        module = NeuronAttentionBase(cfg, groups=groups, dtype=torch.float64)
        module.load_hf_state_dict(full_state_dict(cfg, 11))
        x = torch.randn(len(PROMPTS), 20, HIDDEN, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
        static = drive(module, KVCacheManager.for_modules([module], max_batch_size=len(PROMPTS), max_seq_len=24, speculation_width=SPEC_WIDTH), x)
        paged = PagedKVCacheManager.for_modules([module], num_blocks=32, block_size=3, max_batch_size=len(PROMPTS), max_seq_len=24)
        original = module.forward

        def reserving(hidden, *, position_ids, attention_mask=None, **kw):
            paged.reserve(None, position_ids, attention_mask)
            return original(hidden, position_ids=position_ids, attention_mask=attention_mask, **kw)

        module.forward = reserving  # drive's calls, each preceded by its reservation
        got = drive(module, paged, x)
        for step, (e, g) in enumerate(zip(static, got)):
            err = (e - g).abs().max().item()
            if not err <= TOLERANCE[torch.float64]:
                failures.append(f"tp={groups.tp_size} paged {fields}: call {step} differs by {err:.3g}")
    return failures


def check_state_dict_round_trip(groups: ParallelGroups) -> list[str]:
    """A per-rank checkpoint (state_dict) loads into a fresh module and gives the same output."""
    cfg = Case(6, 2).config()
    module = NeuronAttentionBase(cfg, groups=groups)
    module.load_hf_state_dict({k: v.float() for k, v in full_state_dict(cfg, 5).items()})
    fresh = NeuronAttentionBase(cfg, groups=groups)
    fresh.load_state_dict(module.state_dict())
    x = torch.randn(1, 5, HIDDEN, generator=torch.Generator().manual_seed(9))
    if not torch.equal(module(x).hidden_states, fresh(x).hidden_states):
        return [f"tp={groups.tp_size}: state_dict round trip changed the output"]
    return []


def check_parallel_linear(groups: ParallelGroups) -> list[str]:
    """Column (gathered output) and row (full input) parallel layers equal nn.Linear; bias added once."""
    gen = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(12, 8, generator=gen, dtype=torch.float64), torch.randn(12, generator=gen, dtype=torch.float64)
    x = torch.randn(2, 3, 8, generator=gen, dtype=torch.float64)
    expected = torch.nn.functional.linear(x, weight, bias)
    column = ColumnParallelLinear(8, 12, gather_output=True, group=groups.tp, dtype=torch.float64)
    column.load_full(weight, bias)
    row = RowParallelLinear(8, 12, input_is_parallel=False, group=groups.tp, dtype=torch.float64)
    row.load_full(weight, bias)
    failures = []
    for name, layer in (("column", column), ("row", row)):
        err = (layer(x) - expected).abs().max().item()
        if not err <= TOLERANCE[torch.float64]:
            failures.append(f"tp={groups.tp_size}: {name}-parallel linear differs by {err:.3g}")
    return failures


def tp_worker(rank: int, world_size: int) -> None:
    """Every case at tp 1, 2 and 4 (consecutive ranks form a group)."""
    groups_by_tp = {}
    for tp in (1, 2, 4):
        for start in range(0, world_size, tp):
            group = dist.new_group(list(range(start, start + tp)))  # collective: every rank creates every group
            if start <= rank < start + tp:
                groups_by_tp[tp] = ParallelGroups(tp=group if tp > 1 else None)
    failures = []
    for tp, groups in groups_by_tp.items():
        for i, case in enumerate(CASES):
            failures += check_case(case, groups, seed=100 + i)
        failures += check_state_dict_round_trip(groups)
        failures += check_lora(groups)
        failures += check_paged(groups)
        failures += check_parallel_linear(groups)
    if failures:
        raise AssertionError("\n".join(failures))
