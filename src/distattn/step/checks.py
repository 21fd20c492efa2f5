"""Checks of one call's arguments, each before any KV cache changes.

Each failure is a ValueError (TypeError for a wrong kind of object) that names the
argument and says how to fix it.
"""

from __future__ import annotations

from typing import Any

import torch

from ..cache.store import KVStore
from ..config import AttentionConfig


def check_key_mask_shape(mask: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """An NxDI 4-D attention mask `[B, 1, S, L]` (bool or 0/1, True = may attend) as bool."""
    if mask.shape[0] != batch or mask.shape[1] != 1 or mask.shape[2] != seq:
        raise ValueError(
            f"attention_mask has shape {shape_of(mask)}; a 4-D mask must be [batch, 1, seq, keys] = [{batch}, 1, {seq}, keys] "
            "(NxDI's [B, 1, S, S] in context encoding, [B, 1, S, cache length] in token generation), or pass [batch, seq]"
        )
    if mask.dtype != torch.bool:
        if mask.dtype.is_floating_point or bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(
                "attention_mask must be bool or hold only 0 and 1 (True = the query may attend); "
                "additive float masks (0 / -inf) are not accepted: pass mask == 0"
            )
        mask = mask != 0
    return mask


def shape_of(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def check_hidden_states(
    config: AttentionConfig, hidden_states: torch.Tensor, dtype: torch.dtype, device: torch.device
) -> None:
    if not isinstance(hidden_states, torch.Tensor):
        raise TypeError(f"hidden_states must be a tensor [batch, seq, {config.hidden_size}], got {type(hidden_states).__name__}")
    if hidden_states.dim() != 3 or hidden_states.shape[-1] != config.hidden_size:
        raise ValueError(
            f"hidden_states has shape {shape_of(hidden_states)}, expected [batch, seq, {config.hidden_size}] "
            f"(hidden_size of this layer)"
        )
    if hidden_states.shape[0] == 0 or hidden_states.shape[1] == 0:
        raise ValueError(f"hidden_states has shape {shape_of(hidden_states)}: batch and seq must be non-empty")
    if hidden_states.dtype != dtype:
        raise ValueError(
            f"hidden_states dtype {hidden_states.dtype} differs from the module's {dtype}; "
            f"cast with hidden_states.to({dtype}) or the module with .to(dtype)"
        )
    if hidden_states.device != device:
        raise ValueError(f"hidden_states is on {hidden_states.device}, the module on {device}; move one of them")


def check_position_ids(position_ids: torch.Tensor, batch: int, seq: int, valid: torch.Tensor) -> None:
    """position_ids `[B, S]`, integer, non-negative, unique among a row's valid tokens."""
    if not isinstance(position_ids, torch.Tensor) or position_ids.shape != (batch, seq):
        got = shape_of(position_ids) if isinstance(position_ids, torch.Tensor) else type(position_ids).__name__
        raise ValueError(f"position_ids has shape {got}, expected [batch, seq] = [{batch}, {seq}]")
    if position_ids.dtype.is_floating_point or position_ids.dtype == torch.bool:
        raise ValueError(f"position_ids dtype {position_ids.dtype} must be an integer type (torch.long)")
    if bool((position_ids[valid] < 0).any()):
        raise ValueError(f"position_ids has negative values {position_ids.tolist()}; positions start at 0")
    if seq > 1:
        ordered = torch.sort(torch.where(valid, position_ids, -1 - torch.arange(seq, device=position_ids.device)), dim=1).values
        if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
            raise ValueError(
                f"position_ids repeats a position within a row: {position_ids.tolist()}; "
                "each token of a sequence needs its own position"
            )


def check_token_mask(
    name: str, mask: torch.Tensor | None, batch: int, seq: int, device: torch.device
) -> torch.Tensor:
    """A `[B, S]` padding mask (bool or 0/1) as bool; all True when None."""
    if mask is None:
        return torch.ones(batch, seq, dtype=torch.bool, device=device)
    if not isinstance(mask, torch.Tensor) or mask.shape != (batch, seq):
        got = shape_of(mask) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(
            f"{name} has shape {got}, expected [batch, seq] = [{batch}, {seq}] "
            "(True/1 for real tokens, False/0 for padding); masks over keys come from positions"
        )
    if mask.dtype != torch.bool:
        if mask.dtype.is_complex or bool(((mask != 0) & (mask != 1)).any()):  # NaN fails both tests
            bad = mask[(mask != 0) & (mask != 1)].flatten()[:4].tolist()
            raise ValueError(f"{name} holds {bad}: a padding mask is bool, or integers / floats that are only 0 (padding) "
                             "and 1 (a real token), as HF builds it")
        mask = mask != 0
    return mask


def check_active_mask(active_mask: torch.Tensor | None, batch: int, seq: int) -> torch.Tensor | None:
    """Optional restriction among the new tokens: `[B, 1, S, S]` or `[B, S, S]` -> bool `[B, 1, S, S]`."""
    if active_mask is None:
        return None
    if not isinstance(active_mask, torch.Tensor) or active_mask.dim() not in (3, 4):
        raise ValueError("active_mask must be a tensor [batch, 1, seq, seq] (True = the query may see that new token)")
    if active_mask.dim() == 3:
        active_mask = active_mask.unsqueeze(1)
    if active_mask.shape != (batch, 1, seq, seq):
        raise ValueError(f"active_mask has shape {shape_of(active_mask)}, expected [{batch}, 1, {seq}, {seq}]")
    if active_mask.dtype != torch.bool and (active_mask.dtype.is_floating_point or bool(((active_mask != 0) & (active_mask != 1)).any())):
        raise ValueError(
            f"active_mask must be bool or hold only 0 and 1 (True / 1 = may attend), got {active_mask.dtype}; "
            "an additive float mask (0 / -inf) reads inverted: pass (mask == 0) instead"
        )
    return active_mask != 0


def check_adapter_ids(adapter_ids: Any, batch: int, n_adapters: int, device: torch.device) -> torch.Tensor | None:
    """adapter_ids `[B]` (or `[B, 1]`) integers in [-1, n_adapters) -> long `[B]`; None when no row uses an adapter."""
    if adapter_ids is None:
        return None
    if not isinstance(adapter_ids, torch.Tensor):
        adapter_ids = torch.as_tensor(adapter_ids)
    if adapter_ids.dim() == 2 and adapter_ids.shape[1] == 1:
        adapter_ids = adapter_ids.reshape(-1)
    if adapter_ids.shape != (batch,) or adapter_ids.dtype.is_floating_point or adapter_ids.dtype == torch.bool:
        raise ValueError(
            f"adapter_ids must be an integer tensor [batch] = [{batch}] (index of each row's LoRA adapter, -1 for none), "
            f"got {shape_of(adapter_ids)} {adapter_ids.dtype}"
        )
    if adapter_ids.device != device:
        raise ValueError(f"adapter_ids is on {adapter_ids.device} but hidden_states on {device}; move it with .to({str(device)!r})")
    if adapter_ids.numel() and (int(adapter_ids.min()) < -1 or int(adapter_ids.max()) >= n_adapters):
        if n_adapters == 0:
            raise ValueError(
                f"adapter_ids {adapter_ids.tolist()} selects LoRA adapters but none are loaded; "
                "call load_lora_adapters first or pass -1 / None"
            )
        raise ValueError(f"adapter_ids {adapter_ids.tolist()} has an id outside [-1, {n_adapters}): {n_adapters} adapters are loaded, -1 means none")
    return adapter_ids.long()


def check_seq_ids(seq_ids: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    if seq_ids is None:
        return None
    if not isinstance(seq_ids, torch.Tensor):
        seq_ids = torch.as_tensor(seq_ids)
    seq_ids = seq_ids.reshape(-1) if seq_ids.dim() == 2 and seq_ids.shape[1] == 1 else seq_ids
    if seq_ids.shape != (batch,) or seq_ids.dtype.is_floating_point or seq_ids.dtype == torch.bool:
        raise ValueError(f"seq_ids must be an integer tensor [batch] = [{batch}], got {shape_of(seq_ids)} {seq_ids.dtype}")
    if seq_ids.unique().numel() != batch:
        raise ValueError(f"seq_ids {seq_ids.tolist()} has duplicates; each batch row needs its own cache row")
    return seq_ids.long()


def check_layer_cache(config: AttentionConfig, n_kv_heads: int, cache: KVStore, hidden: torch.Tensor) -> None:
    """The cache holds this layer's kv heads and head_dim, on the module's device."""
    _, heads, _, head_dim = cache.k.shape
    if heads != n_kv_heads or head_dim != config.head_dim:
        raise ValueError(
            f"kv_mgr layer cache is [*, {heads}, *, {head_dim}] but this layer needs "
            f"[*, {n_kv_heads}, *, {config.head_dim}] (n_kv_heads, head_dim); build the KVCacheManager "
            "from this layer's AttentionConfig"
        )
    if cache.dtype != hidden.dtype:
        raise ValueError(
            f"kv_mgr caches are {cache.dtype} but this layer computes in {hidden.dtype}; "
            f"build the KVCacheManager with dtype={hidden.dtype}"
        )
    if cache.k.device != hidden.device:
        raise ValueError(f"kv_mgr caches are on {cache.k.device}, hidden_states on {hidden.device}; move one of them")


def check_past_key_value(
    past_key_value: object, batch: int, n_kv_heads: int, head_dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """NxDI-style prior cache: (K, V), each `[B, n_kv_heads, L, head_dim]`, slot j = position j."""
    if not isinstance(past_key_value, (tuple, list)) or len(past_key_value) != 2:
        raise ValueError("past_key_value must be a pair (K, V) of tensors [batch, n_kv_heads, len, head_dim]")
    k, v = past_key_value
    for name, t in (("K", k), ("V", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[0] != batch or t.shape[1] != n_kv_heads or t.shape[3] != head_dim:
            got = shape_of(t) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"past_key_value {name} has shape {got}, expected [{batch}, {n_kv_heads}, len, {head_dim}]"
            )
    if k.shape != v.shape:
        raise ValueError(f"past_key_value K {shape_of(k)} and V {shape_of(v)} differ in shape")
    if k.device != device or v.device != device:
        raise ValueError(f"past_key_value is on {k.device} but hidden_states on {device}; move it with .to({str(device)!r})")
    return k, v


def check_rope_tables(cos_cache: torch.Tensor | None, sin_cache: torch.Tensor | None, batch: int, seq: int) -> None:
    if (cos_cache is None) != (sin_cache is None):
        raise ValueError("cos_cache and sin_cache go together: pass both or neither")
    if cos_cache is None:
        return
    for name, t in (("cos_cache", cos_cache), ("sin_cache", sin_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} is a {type(t).__name__}; pass a tensor [batch or 1, {seq}, rotary width] (torch.tensor(...))")
        if t.dim() != 3 or t.shape[0] not in (1, batch) or t.shape[1] != seq:
            raise ValueError(f"{name} has shape {shape_of(t)}, expected [batch or 1, {seq}, rotary width]")
