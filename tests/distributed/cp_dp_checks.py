"""Context-parallel prefill and data-parallel decode checks run inside each rank.

Every rank builds the same weights and inputs, runs the one-process module itself as
the reference, and compares outputs after every call and, at the end, the KV caches
of the whole world (each rank's decode heads, each replica's sequences) with the
one-process cache.
"""

from __future__ import annotations

import torch

from distattn import KVCacheManager, NeuronAttentionBase
from distattn.parallel import ParallelGroups
from distattn.parallel.comm import all_gather
from distattn.parallel.plans import gather_prompt, split_prompt

from distributed.tp_checks import HIDDEN, TOLERANCE, Case, full_state_dict, lora_adapter

FP32 = TOLERANCE[torch.float32]
PROMPTS = (11, 6, 9, 3)  # none divides by 2 * cp evenly; the longest spans several windows / chunks
MAX_BATCH = 4
MAX_LEN = 40
ADAPTER_OF_SEQ = torch.tensor([0, -1, 1, 0])  # LoRA adapter of each sequence: mixed batches in every call


def build(case: Case, groups: ParallelGroups | None, seed: int, **module_kw) -> tuple[NeuronAttentionBase, KVCacheManager]:
    cfg = case.config()
    module = NeuronAttentionBase(cfg, groups=groups, dtype=case.dtype, **module_kw)
    module.load_hf_state_dict({k: v.to(case.dtype) for k, v in full_state_dict(cfg, seed).items()})
    module.load_lora_adapters([lora_adapter(cfg, 3, ("q_proj", "k_proj", "v_proj", "o_proj"), seed), lora_adapter(cfg, 2, ("k_proj", "o_proj"), seed + 1)])
    cache = KVCacheManager.for_modules([module], max_batch_size=MAX_BATCH, max_seq_len=MAX_LEN, speculation_width=3)
    return module, cache


class Pair:
    """The parallel module and the one-process reference, driven with the same calls."""

    def __init__(self, case: Case, groups: ParallelGroups, seed: int, label: str, **module_kw) -> None:
        self.parallel, self.parallel_cache = build(case, groups, seed, **module_kw)
        self.reference, self.reference_cache = build(case, None, seed)
        self.groups, self.label, self.failures = groups, label, []
        self.tables = torch.randn(MAX_BATCH, MAX_LEN, HIDDEN, generator=torch.Generator().manual_seed(seed + 7), dtype=torch.float64).to(case.dtype)

    def call(self, seq_ids: list[int], starts: list[int], widths: list[int], what: str) -> None:
        """One forward of both modules: row b is sequence seq_ids[b] at positions starts[b] + 0..widths[b]-1."""
        batch, seq = len(seq_ids), max(widths)
        pos = torch.tensor(starts).unsqueeze(1) + torch.arange(seq)  # [B, S]
        valid = torch.arange(seq).expand(batch, seq) < torch.tensor(widths).unsqueeze(1)
        x = torch.stack([self.tables[s, pos[b].clamp(max=MAX_LEN - 1)] for b, s in enumerate(seq_ids)])
        kw = dict(attention_mask=valid, position_ids=pos, idx=0, seq_ids=torch.tensor(seq_ids), adapter_ids=ADAPTER_OF_SEQ[seq_ids])
        if self.parallel.sequence_parallel and max(starts) == 0 and self.groups.cp_size > 1:  # CP prefill of local rows
            split = self.parallel.cp_split
            x_local, pos_local, mask_local = split_prompt(x, pos, valid, self.groups, split)
            local = self.parallel(x_local, attention_mask=mask_local, position_ids=pos_local, kv_mgr=self.parallel_cache, idx=0,
                                  seq_ids=kw["seq_ids"], adapter_ids=kw["adapter_ids"])
            got = gather_prompt(local.hidden_states, seq, self.groups, split)
        else:
            got = self.parallel(x, kv_mgr=self.parallel_cache, **kw).hidden_states
        expected = self.reference(x, kv_mgr=self.reference_cache, **kw).hidden_states
        err = ((got - expected) * valid.unsqueeze(-1)).abs().max().item()
        scale = max(1.0, expected.abs().max().item())  # fp32 rounding grows with the outputs (LoRA deltas enlarge them)
        if not err <= FP32 * scale:
            self.failures.append(f"{self.label}: {what} differs by {err:.3g}")

    def compare_caches(self) -> None:
        """Reassemble the world's caches (decode heads, replica rows) and compare with one process."""
        layer, ref = self.parallel_cache[0], self.reference_cache[0]
        rows = self.parallel_cache.rows_per_replica
        replica = self.groups.dp_rank
        for name, local, full in (("K", layer.k, ref.k), ("V", layer.v, ref.v), ("positions", layer.positions, ref.positions)):
            heads = self.parallel.layout.kv_heads
            parts = all_gather(local.contiguous(), self.groups.tp)
            meta = all_gather(torch.tensor([replica, *[-1 if h is None else h for h in heads]]), self.groups.tp)
            for part, info in zip(parts, meta):
                first = int(info[0]) * rows
                if name == "positions":
                    ok = torch.equal(part[:rows], full[first : first + rows])
                else:
                    ok = all(h < 0 or (part[:rows, slot] - full[first : first + rows, h]).abs().max() <= FP32 for slot, h in enumerate(info[1:].tolist()))
                if not ok:
                    self.failures.append(f"{self.label}: gathered {name} cache differs (replica {int(info[0])})")


    def misrouted_ids_are_refused_unless_padding(self) -> None:
        """A decode row whose seq_id belongs to another replica is an error (before any cache changes),
        unless the row is padding (NxDI's garbage-row filler), which nobody's sequence sees."""
        layer, rows = self.parallel_cache[0], self.parallel_cache.rows_per_replica
        replica, per = self.groups.dp_rank, MAX_BATCH // self.groups.dp_size
        ids = [2, 0, 1, 3]  # rows 0 and 2 are misrouted: sequence 2 lives in replica 1, sequence 1 in replica 0
        before = layer.positions.clone(), layer.k.clone()
        x = self.tables[:MAX_BATCH, :1]
        try:
            self.parallel(x, position_ids=torch.full((MAX_BATCH, 1), 30), kv_mgr=self.parallel_cache, idx=0, seq_ids=torch.tensor(ids))
            self.failures.append(f"{self.label}: misrouted seq_ids were accepted")
        except ValueError as err:
            if "belongs to replica" not in str(err):
                self.failures.append(f"{self.label}: unclear error {err}")
        if not (torch.equal(layer.positions, before[0]) and torch.equal(layer.k, before[1])):
            self.failures.append(f"{self.label}: a refused call changed the cache")
        filler = torch.tensor([[False], [True], [False], [True]])  # the misrouted rows as padding
        self.parallel(x, attention_mask=filler, position_ids=torch.full((MAX_BATCH, 1), 30), kv_mgr=self.parallel_cache, idx=0,
                      seq_ids=torch.tensor(ids))
        mine = [ids[b] for b in range(replica * per, (replica + 1) * per) if filler[b, 0]]  # this replica's real rows
        legit = {s - replica * rows for s in mine if replica * rows <= s < (replica + 1) * rows}
        for row in range(rows):
            unchanged = torch.equal(layer.positions[row], before[0][row]) and torch.equal(layer.k[row], before[1][row])
            if (row in legit) == unchanged:
                self.failures.append(f"{self.label}: cache row {row} of replica {replica} {'unchanged' if unchanged else 'changed'}")

    def batch_must_divide_by_dp(self) -> None:
        layer = self.parallel_cache[0]
        before = layer.positions.clone()
        try:
            self.parallel(self.tables[:3, :1], position_ids=torch.full((3, 1), 31), kv_mgr=self.parallel_cache, idx=0)
            self.failures.append(f"{self.label}: a batch of 3 under dp=2 was accepted")
        except ValueError as err:
            if "batch 3 must divide by the data-parallel degree 2" not in str(err):
                self.failures.append(f"{self.label}: unclear error {err}")
        if not torch.equal(before, layer.positions):
            self.failures.append(f"{self.label}: the refused call changed the cache")


def check_group_errors() -> list[str]:
    """Inconsistent degrees are refused with the argument named (every rank raises alike)."""
    failures = []
    for kwargs, message in [
        ({"tp_degree": 4, "cp_degree": 3}, "cp_degree=3 must be a positive divisor of tp_degree=4"),
        ({"tp_degree": 4, "dp_degree": 8}, "dp_degree=8 must be a positive divisor of tp_degree=4"),
        ({"tp_degree": 3}, "tp_degree=3 must be a positive divisor of the world size 4"),
    ]:
        try:
            ParallelGroups.from_world(**kwargs)
            failures.append(f"{kwargs} was accepted")
        except ValueError as err:
            if message not in str(err):
                failures.append(f"{kwargs}: unclear error {err}")
    return failures


def prefill_decode_flow(pair: Pair, decode_steps: int) -> None:
    """Prefill four prompts, decode with seq_ids permuted inside each replica's range, speculate, restart one row."""
    seq_ids = list(range(MAX_BATCH))
    pair.call(seq_ids, [0] * MAX_BATCH, list(PROMPTS), "prefill")
    lengths = list(PROMPTS)
    order = [1, 0, 3, 2]  # continuous batching: rows come in any order within a replica's range
    for step in range(decode_steps):
        if step == decode_steps // 2:  # sequence 1 ends; a new prompt takes its cache row
            pair.call([1], [0], [5], "prefill of a new sequence into a used row")
            lengths[1] = 5
        pair.call(order, [lengths[s] for s in order], [1] * MAX_BATCH, f"decode step {step}")
        for s in order:
            lengths[s] += 1
    pair.call(order, [lengths[s] for s in order], [3] * MAX_BATCH, "speculative step")
    pair.compare_caches()


class PagedPair(Pair):
    """The parallel module over a paged cache (blocks reserved before each call), the reference over a static one."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from distattn.paged import PagedKVCacheManager

        self.parallel_cache = PagedKVCacheManager.for_modules([self.parallel], num_blocks=64, block_size=3, max_batch_size=MAX_BATCH, max_seq_len=MAX_LEN)

    def call(self, seq_ids: list[int], starts: list[int], widths: list[int], what: str) -> None:
        pos = torch.tensor(starts).unsqueeze(1) + torch.arange(max(widths))
        valid = torch.arange(max(widths)).expand(len(seq_ids), -1) < torch.tensor(widths).unsqueeze(1)
        self.parallel_cache.reserve(seq_ids, pos, valid)  # every rank reserves the whole call's positions
        super().call(seq_ids, starts, widths, what)


def paged_flow(pair: Pair, decode_steps: int) -> None:
    """Prefill four prompts (CP), decode and speculate over the paged cache, restart one sequence."""
    seq_ids = list(range(MAX_BATCH))
    pair.call(seq_ids, [0] * MAX_BATCH, list(PROMPTS), "prefill")
    lengths = list(PROMPTS)
    for step in range(decode_steps):
        if step == decode_steps // 2:
            pair.call([2], [0], [7], "prefill of a new sequence into a used row")
            lengths[2] = 7
        pair.call(seq_ids, lengths, [1] * MAX_BATCH, f"decode step {step}")
        lengths = [n + 1 for n in lengths]
    pair.call(seq_ids, lengths, [3] * MAX_BATCH, "speculative step")


def cp_dp_worker(rank: int, world_size: int) -> None:
    """cp 2 and 4 at attention tp 1 and 2, dp 2, and both together; every route; sinks throughout."""
    import torch.distributed as dist

    configs = [  # (tp, cp, dp)
        (2, 2, 1),  # cp 2, attention tp 1 (two models of 2 ranks side by side)
        (4, 2, 1),  # cp 2, attention tp 2
        (4, 4, 1),  # cp 4, attention tp 1
        (2, 1, 2),  # dp 2, attention tp 1
        (4, 2, 2),  # cp 2 prefill, dp 2 decode
        (4, 4, 2),  # cp 4 prefill, dp 2 decode (different head layouts)
    ]
    routes = [  # (route, split, ring, sequence-parallel input)
        ({"sliding_window": 4}, "head_tail", False, False),
        ({"attention_chunk_size": 2}, "strided", False, True),  # chunk smaller than a rank's slice
        ({"attention_chunk_size": 8}, "head_tail", True, False),  # chunk larger than a rank's slice, ring
        ({}, "contiguous", True, True),
    ]
    failures = check_group_errors()
    for n, (tp, cp, dp) in enumerate(configs):
        groups = ParallelGroups.from_world(tp, cp_degree=cp, dp_degree=dp)
        for m, (route, split, ring, sp) in enumerate(routes):
            case = Case(8, 2 if m % 2 else 4, route)
            label = f"tp={tp} cp={cp} dp={dp} {route} {split}{' ring' if ring else ''}{' sequence-parallel' if sp else ''}"
            pair = Pair(case, groups, seed=10 * n + m, label=label, cp_split=split, cp_ring=ring, sequence_parallel=sp)
            prefill_decode_flow(pair, decode_steps=4)
            failures += pair.failures
    for cp, route, ring, sp in ((2, {"sliding_window": 4}, False, False), (4, {}, True, True), (2, {"attention_chunk_size": 4}, True, False)):
        label = f"paged cache tp=4 cp={cp} {route}{' ring' if ring else ''}{' sequence-parallel' if sp else ''}"
        paged = PagedPair(Case(8, 2, route), ParallelGroups.from_world(4, cp_degree=cp), seed=50 + cp, label=label, cp_ring=ring, sequence_parallel=sp)
        paged_flow(paged, decode_steps=4)
        failures += paged.failures
    whole = Pair(Case(8, 2, {"sliding_window": 5}), ParallelGroups.from_world(4, cp_degree=2, dp_degree=2), seed=99, label="whole flow")
    prefill_decode_flow(whole, decode_steps=16)
    whole.misrouted_ids_are_refused_unless_padding()
    whole.batch_must_divide_by_dp()
    failures += whole.failures
    dist.barrier()
    if failures:
        raise AssertionError("\n".join(failures))
