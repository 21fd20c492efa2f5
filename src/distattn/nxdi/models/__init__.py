"""distattn.nxdi.models: `config` (InferenceConfig, NeuronConfig, MoENeuronConfig) and `llama.modeling_llama`'s helpers."""
