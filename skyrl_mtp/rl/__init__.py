"""The RL math, pure torch, no Ray / Megatron / vLLM: advantages (``advantages``), policy losses
(``policy_loss``: PPO/DAPO clip, dual clip, GSPO, SFT), KL and entropy (``kl``), truncated
importance sampling against the rollout engine's log-probs (``tis``), DAPO's overlong shaping
(``shaping``) and dynamic-sampling filter (``dynamic_sampling``). The trainer and the workers both
import from here; nothing here imports them."""
