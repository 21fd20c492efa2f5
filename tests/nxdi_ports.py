"""NxDI model code, ported by changing the import prefix `neuronx_distributed_inference` -> `distattn.nxdi`.

Each attention class follows the pattern of NxDI's own model files (Llama, Qwen2, Qwen3,
Mistral, gpt-oss, Gemma 3, Llama 4 text): subclass `NeuronAttentionBase`, compute the
rotary module (sometimes through `self.get_rope(config)` before `super().__init__`), call
`super().__init__` with NxDI's keywords. The decoder layer is NxDI's Llama layer: norm,
attention called with NxDI's arguments and unpacked as a tuple, residual, MLP.
`build_port(family, hf_config, neuron_config)` makes the InferenceConfig the way NxDI's
applications do (`load_pretrained_config`) and returns one attention module per layer.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from torch import nn
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding
from transformers.models.llama.modeling_llama import LlamaMLP

from distattn.nxdi.models.config import InferenceConfig, NeuronConfig
from distattn.nxdi.models.llama.modeling_llama import Llama3RotaryEmbedding
from distattn.nxdi.modules.attention.attention_base import NeuronAttentionBase, QKNormPlacement
from distattn.nxdi.modules.attention.utils import RotaryEmbedding
from distattn.nxdi.modules.custom_calls import CustomRMSNorm
from distattn.nxdi.utils.hf_adapter import load_pretrained_config


def get_rmsnorm_cls() -> type[nn.Module]:
    # NxDI's model files pick the kernel-backed norm on Neuron; distattn's runs everywhere
    return CustomRMSNorm


class LlamaInferenceConfig(InferenceConfig):
    def add_derived_config(self) -> None:
        self.num_cores_per_group = 1

    def get_required_attributes(self) -> list[str]:
        return ["hidden_size", "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "vocab_size",
                "max_position_embeddings", "rope_theta", "rms_norm_eps"]


class NeuronLlamaAttention(NeuronAttentionBase):
    def __init__(self, config: InferenceConfig, tensor_model_parallel_group: Any = None) -> None:
        super().__init__(
            config=config,
            tensor_model_parallel_group=tensor_model_parallel_group,
            hidden_size=config.hidden_size,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads,
            head_dim=getattr(config, "head_dim", config.hidden_size // config.num_attention_heads),
            rotary_emb=self.get_rope(config=config),
            num_cores_per_group=config.num_cores_per_group,
            qkv_bias=getattr(config, "attention_bias", False),
            o_bias=getattr(config, "attention_bias", False),
            rms_norm_eps=config.rms_norm_eps,
            attention_chunk_size=getattr(config, "attention_chunk_size", None),
            sliding_window=getattr(config, "sliding_window", None),
        )

    def get_rope(self, config: InferenceConfig) -> nn.Module:
        head_dim = getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
        if getattr(config, "rope_scaling", None) is None:
            return RotaryEmbedding(head_dim, max_position_embeddings=config.max_position_embeddings, base=config.rope_theta)
        scaling = config.rope_scaling
        return Llama3RotaryEmbedding(
            dim=head_dim,
            max_position_embeddings=config.max_position_embeddings,
            base=config.rope_theta,
            factor=scaling["factor"],
            low_freq_factor=scaling["low_freq_factor"],
            high_freq_factor=scaling["high_freq_factor"],
            original_max_position_embeddings=scaling["original_max_position_embeddings"],
        )


class NeuronQwen2Attention(NeuronAttentionBase):
    def __init__(self, config: InferenceConfig) -> None:
        super().__init__(
            config=config,
            hidden_size=config.hidden_size,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads,
            head_dim=getattr(config, "head_dim", config.hidden_size // config.num_attention_heads),
            rotary_emb=RotaryEmbedding(config.head_dim, max_position_embeddings=config.max_position_embeddings, base=config.rope_theta),
            qkv_bias=True,
            o_bias=False,
        )


class NeuronQwen3Attention(NeuronAttentionBase):
    def __init__(self, config: InferenceConfig) -> None:
        head_dim = getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
        rotary_emb = RotaryEmbedding(dim=head_dim, max_position_embeddings=config.max_position_embeddings, base=config.rope_theta)
        super().__init__(
            config=config,
            hidden_size=config.hidden_size,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads,
            head_dim=head_dim,
            rotary_emb=rotary_emb,
            rms_norm_eps=config.rms_norm_eps,
            qk_norm_placement=QKNormPlacement.PRE_ROPE,
            q_layernorm=get_rmsnorm_cls()(hidden_size=head_dim, eps=config.rms_norm_eps),
            k_layernorm=get_rmsnorm_cls()(hidden_size=head_dim, eps=config.rms_norm_eps),
        )


class NeuronMistralAttention(NeuronAttentionBase):
    def __init__(self, config: InferenceConfig) -> None:
        super().__init__(
            config=config,
            hidden_size=config.hidden_size,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            rotary_emb=RotaryEmbedding(config.head_dim, max_position_embeddings=config.max_position_embeddings, base=config.rope_theta),
            sliding_window=config.sliding_window,
        )


class NeuronGptOssAttention(NeuronAttentionBase):
    def __init__(self, config: InferenceConfig, layer_idx: int) -> None:
        # the YaRN rotary module comes from transformers, as NxDI model files take HF modules
        hf_rope = transformers.GptOssConfig(head_dim=config.head_dim, max_position_embeddings=config.max_position_embeddings,
                                            rope_parameters=config.rope_parameters)
        super().__init__(
            config=config,
            hidden_size=config.hidden_size,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            rotary_emb=GptOssRotaryEmbedding(hf_rope),
            qkv_bias=True,
            o_bias=True,
            learned_sinks_size=1,
            sliding_window=config.sliding_window if config.layer_types[layer_idx] == "sliding_attention" else None,
        )


class NeuronGemma3Attention(NeuronAttentionBase):
    def __init__(self, config: InferenceConfig, layer_idx: int) -> None:
        is_sliding = config.layer_types[layer_idx] == "sliding_attention"
        base = config.rope_local_base_freq if is_sliding else config.rope_theta
        super().__init__(
            config=config,
            hidden_size=config.hidden_size,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            rotary_emb=RotaryEmbedding(config.head_dim, max_position_embeddings=config.max_position_embeddings, base=base),
            softmax_scale=config.query_pre_attn_scalar**0.5,  # NxDI divides q.k by it
            q_layernorm=Gemma3RMSNorm(config.head_dim, eps=config.rms_norm_eps),
            k_layernorm=Gemma3RMSNorm(config.head_dim, eps=config.rms_norm_eps),
            sliding_window=config.sliding_window if is_sliding else None,
        )


class L2Norm(nn.Module):
    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


class NeuronLlama4Attention(NeuronAttentionBase):
    def __init__(self, config: InferenceConfig, tensor_model_parallel_group: Any = None, use_qk_norm: bool = True, is_nope: bool = False) -> None:
        super().__init__(
            config=config,
            hidden_size=config.hidden_size,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads,
            head_dim=getattr(config, "head_dim", config.hidden_size // config.num_attention_heads),
            num_cores_per_group=config.num_cores_per_group,
            rms_norm_eps=config.rms_norm_eps,
            use_qk_norm=use_qk_norm,
            qk_norm_placement=QKNormPlacement.POST_ROPE,
            rope_theta=config.rope_theta,
            use_scaled_rope=getattr(config, "rope_scaling", None) is not None,
            qkv_bias=getattr(config, "attention_bias", False),
            o_bias=getattr(config, "attention_bias", False),
            tensor_model_parallel_group=tensor_model_parallel_group,
            attention_chunk_size=None if is_nope else getattr(config, "attention_chunk_size", None),
        )
        self.qk_norm = L2Norm(config.rms_norm_eps) if use_qk_norm else None  # as NxDI's Llama 4 does after init


def _llama4_layer(config: InferenceConfig, i: int) -> NeuronLlama4Attention:
    is_nope = config.no_rope_layers[i] == 0
    return NeuronLlama4Attention(config, use_qk_norm=getattr(config, "use_qk_norm", False) and not is_nope, is_nope=is_nope)


PORTS = {
    "llama": lambda config, i: NeuronLlamaAttention(config),
    "qwen2": lambda config, i: NeuronQwen2Attention(config),
    "qwen3": lambda config, i: NeuronQwen3Attention(config),
    "mistral": lambda config, i: NeuronMistralAttention(config),
    "gpt_oss": NeuronGptOssAttention,
    "gemma3": NeuronGemma3Attention,
    "llama4": _llama4_layer,
}


def forward_kwargs(family: str, config: InferenceConfig, i: int) -> dict[str, Any]:
    """What the family's NxDI decoder layer passes to its attention besides the standard arguments."""
    if family == "llama4":
        return {"use_polar_compatible_rope": config.no_rope_layers[i] != 0}
    return {}


def inference_config(family: str, hf_config: Any, neuron_config: NeuronConfig) -> InferenceConfig:
    """The InferenceConfig an NxDI application builds from a checkpoint's HF config."""
    cls = LlamaInferenceConfig if family in ("llama", "llama4") else InferenceConfig
    return cls(neuron_config, load_config=load_pretrained_config(hf_config=hf_config))


def build_port(family: str, hf_model: Any, neuron_config: NeuronConfig) -> tuple[InferenceConfig, list[NeuronAttentionBase]]:
    """One ported attention module per layer of `hf_model`, with HF's weights loaded."""
    config = inference_config(family, hf_model.config, neuron_config)
    modules = []
    for i, layer in enumerate(hf_model.model.layers):
        module = PORTS[family](config, i)
        module.load_hf_state_dict(layer.self_attn.state_dict())
        modules.append(module)
    return config, modules


class NeuronLlamaDecoderLayer(nn.Module):
    """NxDI's Llama decoder layer: the attention call and tuple unpacking as NxDI writes them."""

    def __init__(self, config: InferenceConfig) -> None:
        super().__init__()
        self.self_attn = NeuronLlamaAttention(config=config)
        self.mlp = LlamaMLP(transformers.LlamaConfig(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size, hidden_act=config.hidden_act))
        self.input_layernorm = get_rmsnorm_cls()(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = get_rmsnorm_cls()(config.hidden_size, eps=config.rms_norm_eps)
        self.qkv_kernel_enabled = config.neuron_config.qkv_kernel_enabled

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                past_key_value: Any = None, adapter_ids: Any = None, **kwargs: Any) -> tuple:
        residual = hidden_states
        qkv_fused_rmsnorm = None
        if self.qkv_kernel_enabled:
            qkv_fused_rmsnorm = self.input_layernorm
        else:
            hidden_states = self.input_layernorm(hidden_states)
        hidden_states, present_key_value, cos_cache, sin_cache = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_value=past_key_value,
            adapter_ids=adapter_ids,
            rmsnorm=qkv_fused_rmsnorm,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = residual + hidden_states
        return (hidden_states, present_key_value, cos_cache, sin_cache, None)

    def load_hf_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Weights of an HF LlamaDecoderLayer (the attention's go through NeuronAttentionBase)."""
        self.self_attn.load_hf_state_dict({k[len("self_attn."):]: v for k, v in state_dict.items() if k.startswith("self_attn.")})
        rest = {k: v for k, v in state_dict.items() if not k.startswith("self_attn.")}
        missing, unexpected = nn.Module.load_state_dict(self, rest, strict=False)
        assert not unexpected and all(k.startswith("self_attn.") for k in missing), (missing, unexpected)
