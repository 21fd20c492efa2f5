"""distattn.nxdi.modules: `attention.attention_base`, `attention.utils`, `custom_calls`."""
