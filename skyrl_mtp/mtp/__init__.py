"""Multi-token-prediction (draft head) training pieces: losses and masks."""
