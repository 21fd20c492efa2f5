"""Under torchrun: rank 1 passes a position beyond its KV cache; rank 0 is then left in o_proj's all-reduce."""

from datetime import timedelta

import torch
import torch.distributed as dist

import distattn
from distattn.parallel import ParallelGroups

dist.init_process_group("gloo", timeout=timedelta(seconds=30))
groups = ParallelGroups.from_world()
cfg = distattn.AttentionConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2)
attn = distattn.NeuronAttentionBase(cfg, groups=groups, layer_idx=0)
cache = distattn.KVCacheManager.for_modules([attn], max_batch_size=1, max_seq_len=8)
position = 100 if dist.get_rank() == 1 else 0
attn(torch.randn(1, 1, 32), position_ids=torch.tensor([[position]]), kv_mgr=cache)
dist.destroy_process_group()
