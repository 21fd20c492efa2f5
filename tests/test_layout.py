"""HeadLayout: which heads each tensor-parallel rank owns (pure math, NxDI's examples)."""

from __future__ import annotations

import pytest
import torch

from distattn import AttentionConfig
from distattn.parallel import ColumnParallelLinear, GQAStrategy, HeadLayout
from distattn.parallel.groups import attention_group_ranks
from distattn.parallel.sequence import cp_row_indices, dp_local_rows, dp_rows_per_replica


def layouts(n_heads: int, n_kv: int, tp: int, strategy=None) -> list[HeadLayout]:
    cfg = AttentionConfig(hidden_size=n_heads * 4, num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=4)
    return [HeadLayout.from_config(cfg, tp, r, strategy) for r in range(tp)]


def test_replicate_to_tp_degree_pads_interleaved() -> None:
    """NxDI's example: 56 q / 8 kv heads at tp 32: 4 ranks per kv head, 2 q slots each, one padded."""
    ranks = layouts(56, 8, 32)
    assert all(r.strategy is GQAStrategy.REPLICATE_TO_TP_DEGREE for r in ranks)
    assert [r.kv_heads for r in ranks[:5]] == [(0,), (0,), (0,), (0,), (1,)]
    assert [r.q_heads for r in ranks[:5]] == [(0, 1), (2, 3), (4, 5), (6, None), (7, 8)]
    owned = [h for r in ranks for h in r.q_heads if h is not None]
    assert sorted(owned) == list(range(56))  # every q head exactly once


def test_convert_to_mha_when_tp_is_not_a_multiple_of_kv_heads() -> None:
    ranks = layouts(6, 3, 4)
    assert all(r.strategy is GQAStrategy.CONVERT_TO_MHA for r in ranks)
    assert [r.q_heads for r in ranks] == [(0, 1), (2, 3), (4, 5), (None, None)]
    assert [r.kv_heads for r in ranks] == [(0, 0), (1, 1), (2, 2), (None, None)]


def test_kv_heads_that_divide_by_tp_are_split() -> None:
    ranks = layouts(16, 8, 2, GQAStrategy.CONVERT_TO_MHA)  # no conversion needed: NxDI keeps the kv heads
    assert [r.kv_heads for r in ranks] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert ranks[1].q_heads == tuple(range(8, 16))


def test_explicit_convert_to_mha_and_mha_padding() -> None:
    assert [r.q_heads for r in layouts(8, 2, 4, "convert-to-mha")] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert [r.kv_heads for r in layouts(8, 2, 4, "convert-to-mha")] == [(0, 0), (0, 0), (1, 1), (1, 1)]
    assert [r.q_heads for r in layouts(6, 6, 4)] == [(0, 1), (2, 3), (4, 5), (None, None)]


def test_fused_qkv_with_gathered_output_is_refused() -> None:
    with pytest.raises(ValueError, match="Gathering states followed by fused qkv is not allowed as it has a different weight sharding scheme"):
        ColumnParallelLinear(8, 24, gather_output=True, fused_qkv=True)


def test_nxdi_group_layout() -> None:
    """tp=8, cp=4: attention-TP [[0,1],[2,3],[4,5],[6,7]] and CP [[0,2,4,6],[1,3,5,7]]."""
    blocks, cross = attention_group_ranks(8, 4)
    assert blocks == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert cross == [[0, 2, 4, 6], [1, 3, 5, 7]]
    with pytest.raises(ValueError, match="degree 3 must divide the tensor-parallel size 8"):
        attention_group_ranks(8, 3)


@pytest.mark.parametrize("split", ["contiguous", "head_tail", "strided"])
@pytest.mark.parametrize("seq_len,cp", [(11, 2), (9, 4), (3, 4), (16, 2)])
def test_cp_splits_cover_every_row_once(split: str, seq_len: int, cp: int) -> None:
    parts = [cp_row_indices(seq_len, cp, r, split) for r in range(cp)]
    assert len({p.numel() for p in parts}) == 1  # every rank gets the same number of rows
    rows = torch.cat(parts)
    assert sorted(rows[rows >= 0].tolist()) == list(range(seq_len))


def test_head_tail_balances_causal_work() -> None:
    """Causal work of a row is its position + 1; head-tail gives every rank the same total."""
    work = [int((cp_row_indices(16, 4, r, "head_tail") + 1).sum()) for r in range(4)]
    assert len(set(work)) == 1
    contiguous = [int((cp_row_indices(16, 4, r, "contiguous") + 1).sum()) for r in range(4)]
    assert contiguous[-1] > 3 * contiguous[0]


def test_dp_rows_map_misrouted_ids_to_garbage() -> None:
    rows, mine = dp_local_rows(torch.tensor([2, 3, 0, 7, -1]), replica=1, rows_per_replica=2)
    assert rows.tolist() == [0, 1, 2, 2, 2] and mine.tolist() == [True, True, False, False, False]
    with pytest.raises(ValueError, match="max_batch_size=5 must divide by the data-parallel degree 2"):
        dp_rows_per_replica(5, 2)
