"""Reward functions (response text, reference answer) -> float, looked up by name."""

from skyrl_mtp.rewards.math import extract_final_answer, math_reward
from skyrl_mtp.rewards.registry import (
    RewardFn,
    exact_match_reward,
    get_reward,
    known_rewards,
    list_rewards,
    register_reward,
)

__all__ = [
    "RewardFn",
    "exact_match_reward",
    "extract_final_answer",
    "get_reward",
    "known_rewards",
    "list_rewards",
    "math_reward",
    "register_reward",
]
