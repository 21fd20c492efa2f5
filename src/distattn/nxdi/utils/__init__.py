"""distattn.nxdi.utils: `hf_adapter.load_pretrained_config`."""
