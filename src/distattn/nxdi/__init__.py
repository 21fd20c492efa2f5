"""NxDI's module paths on distattn: port NxDI model code by replacing the import prefix.

`from neuronx_distributed_inference.X import Y` becomes `from distattn.nxdi.X import Y`
for the names attention code needs (listed in `SUPPORTED`). The rest of NxDI (its model
base, MLP and MoE modules, kernels, tracing) is out of scope: importing another module
or name fails at import with a message saying what is supported.
"""

from __future__ import annotations

import importlib.abc
import sys
from typing import Any

SUPPORTED: dict[str, tuple[str, ...]] = {
    "distattn.nxdi.models.config": ("InferenceConfig", "NeuronConfig", "MoENeuronConfig", "to_dict", "to_torch_dtype"),
    "distattn.nxdi.models.llama.modeling_llama": ("get_rmsnorm_cls", "Llama3RotaryEmbedding"),
    "distattn.nxdi.utils.hf_adapter": ("load_pretrained_config",),
    "distattn.nxdi.modules.attention.attention_base": ("NeuronAttentionBase", "NeuronAttentionBaseOutput", "QKNormPlacement"),
    "distattn.nxdi.modules.attention.utils": ("RotaryEmbedding", "apply_rotary_pos_emb", "rotate_half", "repeat_kv"),
    "distattn.nxdi.modules.custom_calls": ("CustomRMSNorm", "get_rmsnorm_cls"),
}


def _supported_text() -> str:
    return "; ".join(f"{m} ({', '.join(names)})" for m, names in SUPPORTED.items())


def missing_name(module: str, name: str) -> Exception:
    """The error for `from <module> import <name>` where distattn.nxdi has no such name."""
    if name.startswith("__"):
        return AttributeError(f"module {module!r} has no attribute {name!r}")
    return ImportError(
        f"cannot import name {name!r} from {module!r}: distattn.nxdi provides only what NxDI attention code needs: "
        f"{', '.join(SUPPORTED.get(module, ()))}. Everything supported: {_supported_text()}",
        name=module,
    )


class _UnsupportedModules(importlib.abc.MetaPathFinder):
    """Last on sys.meta_path: a distattn.nxdi module no other finder found gets a helpful error."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> None:
        if fullname.startswith(__name__ + "."):
            raise ModuleNotFoundError(
                f"No module named {fullname!r}: distattn.nxdi mirrors only the NxDI modules attention code imports: "
                f"{_supported_text()}",
                name=fullname,
            )
        return None


if not any(isinstance(f, _UnsupportedModules) for f in sys.meta_path):
    sys.meta_path.append(_UnsupportedModules())
