"""Mixture-of-experts MLPs: gpt-oss's (top-k softmax router with bias, clamped SwiGLU with biases).

Tensor parallel like the dense MLP: every expert's intermediate dimension is split across
the group (gate/up rows column-parallel, down columns row-parallel), the router is
replicated, and one all-reduce per layer sums the partial outputs; the down bias is added
once, after it. Expert parallelism (whole experts per rank) would replace the split by an
assignment of experts to ranks with the same single all-reduce; not built.

Compute: a call with few token-expert pairs (decode) gathers the chosen experts' weights
per token (no host synchronisation, only those experts read); a larger call groups tokens
by expert and runs each expert that received tokens once (HF's loop, without the experts
nobody chose). Quantized experts (`ExpertsMLP.quantize_weights`) run each expert's rows
through the same int8 / int4 products as the linear layers.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..parallel.comm import Group, HeldWeakly, all_reduce_sum, group_rank, group_size
from ..layers.quant import (
    INT4_GROUP,
    WeightFormat,
    int4_dequantize,
    int4_groups,
    int4_kernel_layout,
    int4_product,
    int8_product,
    int8_rows,
    weight_format,
)
from .mlp import GatedMLP


def gpt_oss_glu(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU: (clamp(up, -l, l) + 1) * g * sigmoid(alpha * g), g = clamp(gate, max=l)."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


class ExpertsMLP(nn.Module):
    """What both MoE layers share: a replicated router `[E, hidden]`, every expert's gated MLP with its
    intermediate size I split across `group` (gate_up `[E, 2 * I / tp, hidden]`: this rank's gate rows, then
    its up rows; down `[E, hidden, I / tp]`), and the two ways to run the chosen experts."""

    group = HeldWeakly()  # the tensor-parallel group (torch.distributed owns it)

    def __init__(self, hf_config: Any, group: Group, dtype: torch.dtype) -> None:
        super().__init__()
        experts, hidden, inter = hf_config.num_local_experts, hf_config.hidden_size, hf_config.intermediate_size
        tp = group_size(group)
        if inter % tp:
            raise ValueError(f"intermediate_size={inter} does not divide by the tensor-parallel size {tp}")
        local = inter // tp
        self.group, self.top_k = group, hf_config.num_experts_per_tok
        self.router_weight = nn.Parameter(torch.zeros(experts, hidden, dtype=dtype), requires_grad=False)
        self.gate_up = nn.Parameter(torch.zeros(experts, 2 * local, hidden, dtype=dtype), requires_grad=False)
        self.down = nn.Parameter(torch.zeros(experts, hidden, local, dtype=dtype), requires_grad=False)
        self.weight_format = WeightFormat.DENSE  # INT8 / INT4 once quantize_weights ran

    def int4_error(self, name: str) -> str | None:
        """Why the experts' inputs (down's: this rank's share) are not whole int4 groups, or None."""
        for proj in ("gate_up", "down"):
            width = self.get_parameter(proj).shape[-1]
            if width % INT4_GROUP:
                return f"{name}.{proj}'s experts take {width} inputs on this rank, not whole int4 groups of {INT4_GROUP}"
        return None

    @torch.no_grad()
    def quantize_weights(self, kind: WeightFormat | str) -> None:
        """Hold gate_up and down weight-only quantized as `DecoderLM.quantize_weights` holds the linears: int8 with a
        scale per (expert, output row), down's over the whole row (all ranks); int4 with a (scale, zero) per 32 inputs.
        The router stays in the model's dtype; the weights become placeholders."""
        held = weight_format(kind)
        for proj, scale_group in (("gate_up", None), ("down", self.group)):
            weight = self.get_parameter(proj).detach()
            if held is WeightFormat.INT8:
                codes, scale = int8_rows(weight, scale_group)
                self.register_buffer(f"{proj}_codes", codes)
                self.register_buffer(f"{proj}_scale", scale.to(weight.dtype))
            else:
                parts = [int4_groups(w, INT4_GROUP) for w in weight]
                self.register_buffer(f"{proj}_codes", torch.stack([c for c, _ in parts]))
                self.register_buffer(f"{proj}_scale_zero", torch.stack([z for _, z in parts]))  # [E, groups, out, 2]
                layouts = [int4_kernel_layout(c) for c, _ in parts]
                kernels = [t for t in layouts if t is not None]
                self.register_buffer(f"{proj}_kernel", torch.stack(kernels) if len(kernels) == len(layouts) else None)
            setattr(self, proj, nn.Parameter(torch.zeros((), dtype=weight.dtype, device=weight.device).expand(weight.shape), requires_grad=False))
        self.weight_format = held

    def _project(self, proj: str, e: int, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x `[n, in]` through expert e's `proj` weight (`[n, out]`), in whichever form it is held."""
        if self.weight_format is WeightFormat.INT8:
            return int8_product(x, self._held(proj, "codes")[e], self._held(proj, "scale")[e], bias)
        if self.weight_format is WeightFormat.INT4:
            kernel = self._buffers.get(f"{proj}_kernel")  # None where the int4 layout does not fit (dequantized product)
            codes, scale_zero = self._held(proj, "codes")[e], self._held(proj, "scale_zero")[e]
            return int4_product(x, None if kernel is None else kernel[e], codes, scale_zero, INT4_GROUP, bias)
        return F.linear(x, self.get_parameter(proj)[e], bias)

    def _gathered(self, proj: str, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The chosen experts' `proj` weights `[N, k, out, in]` (dequantized when held quantized)."""
        if self.weight_format is WeightFormat.INT8:
            return self._held(proj, "codes")[ids].to(dtype) * self._held(proj, "scale")[ids].to(dtype).unsqueeze(-1)
        if self.weight_format is WeightFormat.INT4:
            return int4_dequantize(self._held(proj, "codes")[ids], self._held(proj, "scale_zero")[ids], INT4_GROUP, dtype)
        return self.get_parameter(proj)[ids]

    def _held(self, proj: str, role: str) -> torch.Tensor:
        """The buffer `{proj}_{role}` of this layer's weight format ("gate_up" / "down"; "codes", "scale", "scale_zero")."""
        return self.get_buffer(f"{proj}_{role}")

    def activation(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """The experts' gate (gate and up: `[..., I / tp]`)."""
        return F.silu(gate) * up

    def expert_bias(self) -> torch.Tensor | None:
        """gate_up's bias `[E, 2 * I / tp]`, if the experts have one."""
        return None

    def run_experts(
        self, x: torch.Tensor, ids: torch.Tensor, scores: torch.Tensor, *, scale_input: bool, gather: bool | None = None
    ) -> torch.Tensor:
        """This rank's partial sum over each token's chosen experts: x `[N, hidden]`, ids and scores `[N, k]` ->
        `[N, hidden]`; each expert's output is weighted by its score, or (scale_input) its input is.

        gather: read the chosen experts' weights per token (no host sync; default on a GPU when there are fewer
        token-expert pairs than experts), else run each chosen expert once on its tokens.
        """
        local, bias = self.down.shape[-1], self.expert_bias()
        if gather is None:
            gather = ids.numel() <= self.gate_up.shape[0] and x.device.type != "cpu"
        if gather:
            inputs = x.unsqueeze(1) * scores.unsqueeze(-1) if scale_input else x.unsqueeze(1).expand(-1, ids.shape[1], -1)
            h = torch.einsum("nkh,nkoh->nko", inputs, self._gathered("gate_up", ids, x.dtype)) + (0 if bias is None else bias[ids])
            out = torch.einsum("nki,nkhi->nkh", self.activation(h[..., :local], h[..., local:]), self._gathered("down", ids, x.dtype))  # [N, k, hidden]
            return (out if scale_input else out * scores.unsqueeze(-1)).sum(1).to(x.dtype)
        y = torch.zeros_like(x)  # many tokens (or a CPU, where a host sync is cheap): each chosen expert once on its tokens
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)
        start = 0
        for e, count in enumerate(torch.bincount(flat, minlength=self.gate_up.shape[0]).tolist()):
            if count:
                pairs = order[start : start + count]
                rows, weight = pairs // self.top_k, scores.reshape(-1)[pairs].unsqueeze(-1)
                h = self._project("gate_up", e, x[rows] * weight if scale_input else x[rows], None if bias is None else bias[e])
                out = self._project("down", e, self.activation(h[..., :local], h[..., local:]), None)
                y.index_add_(0, rows, (out if scale_input else out * weight).to(x.dtype))
                start += count
        return y


class GptOssMoE(ExpertsMLP):
    """gpt-oss's MLP: x `[B, S, hidden]` -> `[B, S, hidden]` (all-reduced over `group`).

    Router `[E, hidden]` + bias `[E]`, top-k logits softmaxed; experts with gate_up bias
    `[E, 2 * I / tp]` and down bias `[E, hidden]` (added once, after the reduction, weighted
    like the experts' outputs) and the clamped SwiGLU.
    """

    def __init__(self, hf_config: Any, group: Any, dtype: torch.dtype) -> None:
        super().__init__(hf_config, group, dtype)
        experts, hidden, local = self.gate_up.shape[0], self.down.shape[1], self.down.shape[2]
        # older transformers (5.17) fix both in their model code rather than the config
        self.alpha, self.limit = float(getattr(hf_config, "swiglu_alpha", 1.702)), float(getattr(hf_config, "swiglu_limit", 7.0))
        self.router_bias = nn.Parameter(torch.zeros(experts, dtype=dtype), requires_grad=False)
        self.gate_up_bias = nn.Parameter(torch.zeros(experts, 2 * local, dtype=dtype), requires_grad=False)
        self.down_bias = nn.Parameter(torch.zeros(experts, hidden, dtype=dtype), requires_grad=False)

    def activation(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return gpt_oss_glu(gate, up, self.alpha, self.limit)

    def expert_bias(self) -> torch.Tensor | None:
        return self.gate_up_bias

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x `[N, hidden]` -> (expert ids `[N, k]`, weights `[N, k]`): top-k router logits, softmax over those k."""
        logits = F.linear(x, self.router_weight, self.router_bias)
        top, ids = torch.topk(logits, self.top_k, dim=-1)
        return ids, torch.softmax(top, dim=-1, dtype=top.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x `[B, S, hidden]` -> `[B, S, hidden]`."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        ids, weights = self.route(x)  # [N, k]
        y = all_reduce_sum(self.run_experts(x, ids, weights, scale_input=False), self.group)
        bias = (self.down_bias[ids] * weights.unsqueeze(-1)).sum(1).to(x.dtype)  # once, after the reduction
        return (y + bias).reshape(shape)

    @torch.no_grad()
    def load(self, source: Any, prefix: str) -> None:
        """This rank's share of an HF checkpoint's `{prefix}mlp.router.*` and `{prefix}mlp.experts.*`
        (dense tensors, or MXFP4 `*_blocks` + `*_scales` dequantized here); only that share is read."""
        from .mxfp4 import read_experts

        local, rank = self.down.shape[-1], group_rank(self.group)
        self.router_weight.copy_(source.read(prefix + "mlp.router.weight"))
        self.router_bias.copy_(source.read(prefix + "mlp.router.bias"))
        # gate / up columns are interleaved (2j: gate j, 2j + 1: up j): this rank's j are one contiguous run
        gate_up = read_experts(source, prefix + "mlp.experts.gate_up_proj", self.gate_up.dtype, 2, 2 * rank * local, 2 * (rank + 1) * local)
        bias = source.read(prefix + "mlp.experts.gate_up_proj_bias", 1, 2 * rank * local, 2 * (rank + 1) * local)
        self.gate_up.copy_(torch.cat([gate_up[..., 0::2], gate_up[..., 1::2]], dim=-1).transpose(1, 2))  # [E, 2I/tp, hidden]
        self.gate_up_bias.copy_(torch.cat([bias[..., 0::2], bias[..., 1::2]], dim=-1))
        down = read_experts(source, prefix + "mlp.experts.down_proj", self.down.dtype, 1, rank * local, (rank + 1) * local)  # [E, I/tp, hidden]
        self.down.copy_(down.transpose(1, 2))
        self.down_bias.copy_(source.read(prefix + "mlp.experts.down_proj_bias"))


def gpt_oss_expected(hf_config: Any, prefix: str, source_names: Collection[str]) -> dict[str, tuple[int, ...]]:
    """The MoE tensors a gpt-oss checkpoint layer holds and their shapes (dense or MXFP4-packed experts)."""
    e, h, i = hf_config.num_local_experts, hf_config.hidden_size, hf_config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {prefix + "mlp.router.weight": (e, h), prefix + "mlp.router.bias": (e,),
                                          prefix + "mlp.experts.gate_up_proj_bias": (e, 2 * i), prefix + "mlp.experts.down_proj_bias": (e, h)}
    for name, (rows, cols) in (("gate_up_proj", (h, 2 * i)), ("down_proj", (i, h))):
        full = f"{prefix}mlp.experts.{name}"
        if full + "_blocks" in source_names:  # MXFP4: [E, out, in / 32, 16] nibbles + [E, out, in / 32] exponents
            shapes[full + "_blocks"] = (e, cols, rows // 32, 16)
            shapes[full + "_scales"] = (e, cols, rows // 32)
        else:
            shapes[full] = (e, rows, cols)
    return shapes


class Llama4MoE(ExpertsMLP):
    """Llama 4's MoE layer: x `[B, S, hidden]` -> shared expert(x) + sum over the top-k experts e of
    expert_e(x * sigmoid(router_e(x))) (the router's score scales each expert's *input*).

    Experts: SwiGLU without biases; the shared expert is a tensor-parallel gated MLP. The routed and
    shared partial outputs are summed before the layer's one all-reduce.
    """

    def __init__(self, hf_config: Any, group: Any, dtype: torch.dtype) -> None:
        super().__init__(hf_config, group, dtype)
        self.shared_expert = GatedMLP(hf_config.hidden_size, hf_config.intermediate_size, group, dtype, hf_config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x `[B, S, hidden]` -> `[B, S, hidden]`."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        top, ids = torch.topk(F.linear(x, self.router_weight), self.top_k, dim=-1)  # [N, k]
        y = self.run_experts(x, ids, torch.sigmoid(top.float()).to(x.dtype), scale_input=True)
        shared = self.shared_expert
        gate, up = shared.gate_up_proj(x).chunk(2, dim=-1)
        y = y + shared.down_proj.product(shared.act(gate) * up, None)  # this rank's partial, reduced with the experts'
        return all_reduce_sum(y, self.group).reshape(shape)

    @torch.no_grad()
    def load(self, source: Any, prefix: str) -> None:
        """This rank's share of `{prefix}feed_forward.router / experts / shared_expert` (gate_up_proj `[E, hidden, 2I]`:
        gate columns, then up columns; down_proj `[E, I, hidden]`)."""
        local, rank = self.down.shape[-1], group_rank(self.group)
        inter = local * group_size(self.group)
        name = prefix + "feed_forward.experts."
        self.router_weight.copy_(source.read(prefix + "feed_forward.router.weight"))
        gate = source.read(name + "gate_up_proj", 2, rank * local, (rank + 1) * local)
        up = source.read(name + "gate_up_proj", 2, inter + rank * local, inter + (rank + 1) * local)
        self.gate_up.copy_(torch.cat([gate, up], dim=-1).transpose(1, 2))
        self.down.copy_(source.read(name + "down_proj", 1, rank * local, (rank + 1) * local).transpose(1, 2))
        self.shared_expert.load(source, prefix, "feed_forward.shared_expert.")


def llama4_expected(hf_config: Any, prefix: str) -> dict[str, tuple[int, ...]]:
    """The MoE tensors of a Llama 4 MoE layer and their shapes."""
    e, h, i = hf_config.num_local_experts, hf_config.hidden_size, hf_config.intermediate_size
    ff = prefix + "feed_forward."
    return {ff + "router.weight": (e, h), ff + "experts.gate_up_proj": (e, h, 2 * i), ff + "experts.down_proj": (e, i, h),
            ff + "shared_expert.gate_proj.weight": (i, h), ff + "shared_expert.up_proj.weight": (i, h),
            ff + "shared_expert.down_proj.weight": (h, i)}
