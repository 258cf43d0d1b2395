"""skyrl_mtp: RL trainer for models with multi-token-prediction heads."""
