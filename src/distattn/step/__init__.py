"""A model call's facts (`StepMetadata`), checked and planned once (`build_step`)."""

from .builder import CallArgs, LayerFacts, bind_layer, build_step
from .metadata import StepMetadata

__all__ = ["CallArgs", "LayerFacts", "StepMetadata", "bind_layer", "build_step"]
