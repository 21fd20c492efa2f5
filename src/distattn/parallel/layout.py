"""HeadLayout: which query heads, kv heads and sinks one tensor-parallel rank owns.

Pure math on head counts. Every rank holds the same number of q slots and kv slots;
a slot holds a global head index or None (a zero padding head). Local q slot i reads
local kv slot i // (n_q / n_kv), and the layout guarantees that is the kv head of its
global q head, so attention math on one rank is plain GQA.

Strategies, as NxDI's:
- kv heads divide by tp: kv heads are split, q heads follow their kv head.
- REPLICATE_TO_TP_DEGREE (tp % n_kv_heads == 0): each kv head lives on tp / n_kv_heads
  adjacent ranks, which split its q heads; q heads are padded per kv group when the
  group does not divide evenly.
- CONVERT_TO_MHA (any tp): every q head gets its own copy of its kv head; q heads are
  padded to a multiple of tp. Chosen automatically when tp % n_kv_heads != 0.
"""

from __future__ import annotations

import enum
import logging
import math
from dataclasses import dataclass

import torch

from ..config import AttentionConfig

logger = logging.getLogger("distattn")


class GQAStrategy(str, enum.Enum):
    REPLICATE_TO_TP_DEGREE = "replicate-to-tp-degree"
    CONVERT_TO_MHA = "convert-to-mha"


@dataclass(frozen=True)
class HeadLayout:
    q_heads: tuple[int | None, ...]  # global q head of each local q slot (None = padding)
    kv_heads: tuple[int | None, ...]  # global kv head of each local kv slot (None = padding)
    group: int  # global q heads per kv head
    strategy: GQAStrategy

    @property
    def n_q(self) -> int:
        return len(self.q_heads)

    @property
    def n_kv(self) -> int:
        return len(self.kv_heads)

    @classmethod
    def from_config(
        cls, config: AttentionConfig, tp_size: int = 1, tp_rank: int = 0, strategy: GQAStrategy | str | None = None
    ) -> HeadLayout:
        """This rank's heads for `config` sharded `tp_size` ways."""
        if not isinstance(tp_size, int) or tp_size <= 0 or not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_size={tp_size!r}, tp_rank={tp_rank!r}: need 0 <= tp_rank < tp_size")
        wanted = GQAStrategy(strategy) if strategy is not None else GQAStrategy.REPLICATE_TO_TP_DEGREE
        n_q, n_kv = config.n_heads, config.n_kv_heads
        group = n_q // n_kv
        if n_kv % tp_size == 0:  # kv heads split evenly: no replication, no padding
            per = n_kv // tp_size
            kv_ids = range(tp_rank * per, (tp_rank + 1) * per)
            return cls(tuple(h * group + g for h in kv_ids for g in range(group)), tuple(kv_ids), group, wanted)
        if n_q == n_kv:
            wanted = GQAStrategy.CONVERT_TO_MHA  # MHA: pad heads and kv heads alike
        elif wanted is GQAStrategy.REPLICATE_TO_TP_DEGREE and tp_size % n_kv:
            logger.warning(
                "tp=%d is not a multiple of num_key_value_heads=%d: using GQA strategy convert-to-mha", tp_size, n_kv
            )
            wanted = GQAStrategy.CONVERT_TO_MHA
        if wanted is GQAStrategy.REPLICATE_TO_TP_DEGREE:
            replicas = tp_size // n_kv  # adjacent ranks sharing one kv head
            kv_head, part = divmod(tp_rank, replicas)
            per = math.ceil(group / replicas)  # q heads per rank, padded
            slots = [part * per + i for i in range(per)]
            q = tuple(kv_head * group + s if s < group else None for s in slots)
            return cls(q, (kv_head,), group, wanted)
        per = math.ceil(n_q / tp_size)  # convert to MHA, pad q heads to a multiple of tp
        slots = [tp_rank * per + i for i in range(per)]
        q = tuple(s if s < n_q else None for s in slots)
        kv = tuple(h // group if h is not None else None for h in q)
        return cls(q, kv, group, wanted)

    @classmethod
    def concat(cls, parts: list[HeadLayout]) -> HeadLayout:
        """The heads of several ranks' layouts held by one rank (context/data parallel groups).

        Each part keeps its q-to-kv grouping, so the result is again plain GQA.
        """
        if len({(p.n_q, p.n_kv) for p in parts}) != 1:
            raise ValueError("layouts to concatenate must have the same head counts")
        q = tuple(h for p in parts for h in p.q_heads)
        kv = tuple(h for p in parts for h in p.kv_heads)
        return cls(q, kv, parts[0].group, parts[0].strategy)

    def __post_init__(self) -> None:
        ratio = self.n_q // self.n_kv
        for i, head in enumerate(self.q_heads):
            if head is not None and self.kv_heads[i // ratio] != head // self.group:
                raise AssertionError(f"local q slot {i} (head {head}) would read kv slot {i // ratio} = {self.kv_heads[i // ratio]}")

    def shard_heads(self, full: torch.Tensor, slots: tuple[int | None, ...], head_dim: int, dim: int = 0) -> torch.Tensor:
        """Cut the rows (dim=0) or columns (dim=1) of heads `slots` out of a full tensor.

        `full` holds every global head as consecutive blocks of `head_dim` along `dim`;
        padding slots become zeros. Returns a tensor with `len(slots) * head_dim` there.
        """
        blocks = []
        for head in slots:
            if head is None:
                shape = list(full.shape)
                shape[dim] = head_dim
                blocks.append(full.new_zeros(shape))
            else:
                blocks.append(full.narrow(dim, head * head_dim, head_dim))
        return torch.cat(blocks, dim=dim)

    def shard_per_head(self, full: torch.Tensor) -> torch.Tensor:
        """One value per q head (sinks): this rank's `[n_q]`, zero for padding."""
        return self.shard_heads(full.reshape(-1, 1), self.q_heads, 1).reshape(-1)
