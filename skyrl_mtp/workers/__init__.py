"""Ray actors and the Megatron policy they run: policy/reference workers, the RL objective."""
