"""NxDI's `attention_base` names: the layer, its output and `QKNormPlacement`.

`NeuronAttentionBase` here is `distattn.NeuronAttentionBase`: built with NxDI's
keywords and an `InferenceConfig` it behaves as NxDI's (see its docstring).
"""

from __future__ import annotations

from ....attention import NeuronAttentionBase
from ....output import NeuronAttentionBaseOutput
from ...form import QKNormPlacement

__all__ = ["NeuronAttentionBase", "NeuronAttentionBaseOutput", "QKNormPlacement"]


def __getattr__(name: str) -> object:
    from distattn.nxdi import missing_name

    raise missing_name(__name__, name)
