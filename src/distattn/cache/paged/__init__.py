"""Block (paged) KV cache: fixed-size blocks shared by all sequences, prefix caching, copy on write.

Seen from attention, a paged layer cache keeps the static cache's contract: `read`
returns a row's keys as K, V `[B, Hkv, L, D]` with positions `[B, L]` (-1: empty) and
`write` stores new tokens at their positions. Storage differs:

- Each layer holds a pool of blocks, K and V `[num_blocks + 1, Hkv, block_size, D]`
  and positions `[num_blocks + 1, block_size]`; the last block is always empty and
  stands in for blocks a sequence does not hold.
- A sequence's block table lists its blocks: position p lives in block
  `table[p // block_size]` at offset `p % block_size`. Layers of the same kind
  (full, sliding window W, chunk C) share block tables and a pool of block ids.
- Sliding-window and chunked layers release blocks whose keys no query can see any
  more (before `p - W + 1`, or before the chunk of `p`), so their memory stays
  bounded by the window, not the sequence.
- Prefix caching: after a prompt is prefilled, `commit` records each full block
  under a hash of all tokens up to its end (and a `cache_key`, e.g. the LoRA
  adapter, since K/V depend on it). A new sequence whose prompt starts with cached
  blocks shares them (reference counted) and prefills only the rest. Released
  blocks stay cached until their memory is reused (least recently released first).
- Copy on write: a block shared by several sequences (`fork`, or a prefix hit), or
  recorded in the prefix cache, is copied before a sequence writes into it, so
  cached prefixes never change.

Blocks are reserved outside the model, once per step, by `reserve(seq_ids,
position_ids, attention_mask)`, which raises before anything changes when the pool
is exhausted; a forward whose positions were not reserved raises, naming `reserve`.
"""

from .blocks import BlockGroup, BlockPool, PoolExhausted
from .layer import PagedLayerCache
from .manager import PagedKVCacheManager

__all__ = ["BlockGroup", "BlockPool", "PagedKVCacheManager", "PagedLayerCache", "PoolExhausted"]
