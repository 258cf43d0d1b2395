"""The reward registry: names -> reward functions.

This module owns :func:`register_reward`, :func:`get_reward`, :func:`list_rewards` (alias
:func:`known_rewards`) and the built-in rewards' registration. A reward function has the signature
``fn(response_text: str, answer: str, **extra) -> float``: `response_text` is the decoded
response without eos, `answer` the example's reference answer, and `extra` the example's other
fields (functions ignore what they do not use).

Built-ins:

* ``sort`` - the synthetic sort task's partial-credit reward in [0, 1]
  (:func:`skyrl_mtp.data.synthetic.sort_reward`);
* ``math`` - 1.0/0.0 from ``math-verify`` on the last ``\\boxed{}`` / ``Answer:``
  (:func:`skyrl_mtp.rewards.math.math_reward`);
* ``exact_match`` - 1.0 if the response equals the answer after stripping surrounding whitespace;
* ``search_exact`` - 1.0 if a search episode's last ``<answer>...</answer>`` equals the answer after
  stripping (:func:`skyrl_mtp.envs.search.search_exact_reward`; the search environment's own test).
"""

from __future__ import annotations

from typing import Callable, Protocol

from skyrl_mtp.data.synthetic import sort_reward
from skyrl_mtp.envs.search import search_exact_reward
from skyrl_mtp.rewards.math import math_reward


class RewardFn(Protocol):
    def __call__(self, response_text: str, answer: str, **extra) -> float: ...


_REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str, *, override: bool = False) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering a reward under `name`; a second registration of a name is an error
    unless ``override=True`` (so two modules cannot silently shadow each other)."""
    if not name or not isinstance(name, str):
        raise ValueError(f"reward name must be a non-empty string, got {name!r}")

    def decorator(fn: RewardFn) -> RewardFn:
        if not callable(fn):
            raise ValueError(f"register_reward({name!r}) expects a function, got {fn!r}")
        if name in _REWARDS and not override and _REWARDS[name] is not fn:
            raise ValueError(f"reward {name!r} is already registered ({_REWARDS[name]!r}); "
                             "pick another name or pass override=True")
        _REWARDS[name] = fn
        return fn

    return decorator


def get_reward(name: str) -> RewardFn:
    """The reward registered as `name`; ValueError listing the known names otherwise."""
    try:
        return _REWARDS[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; known rewards: {list_rewards()}. "
                         "Register one with @register_reward(name).") from None


def list_rewards() -> list[str]:
    """The registered reward names, sorted."""
    return sorted(_REWARDS)


known_rewards = list_rewards  # the name the config validator uses


def exact_match_reward(response_text: str, answer: str, **extra) -> float:
    """1.0 if the response equals `answer` after stripping surrounding whitespace, else 0.0."""
    return 1.0 if response_text.strip() == str(answer).strip() else 0.0


register_reward("sort")(sort_reward)
register_reward("math")(math_reward)
register_reward("exact_match")(exact_match_reward)
register_reward("search_exact")(search_exact_reward)
