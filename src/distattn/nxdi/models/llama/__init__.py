"""distattn.nxdi.models.llama: the helpers other NxDI model files import from `modeling_llama`."""
