"""Model families (dataclass configs, presets, tokenizers) shared by Megatron and vLLM."""
