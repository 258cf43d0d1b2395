"""Multi-turn text environments (reset / step, text in, text and reward out), their registry,
the Search-R1-style search environment and its local retrieval server (BM25)."""

from skyrl_mtp.envs.base import EnvStep, TextEnv, get_env, known_envs, register_env
from skyrl_mtp.envs.search import SearchEnv, make_search_env, search_exact_reward  # registers "search"

__all__ = [
    "EnvStep",
    "SearchEnv",
    "TextEnv",
    "get_env",
    "known_envs",
    "make_search_env",
    "register_env",
    "search_exact_reward",
]
