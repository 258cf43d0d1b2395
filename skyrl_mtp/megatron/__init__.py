"""Megatron-Core integration: model building, the output-processor hook, CPU support, HF bridge."""
