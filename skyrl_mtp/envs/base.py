"""The text-environment interface of multi-turn rollouts, and the registry of environments.

An environment sees text only. The rollout loop (skyrl_mtp.trainer) drives it like this::

    env = get_env(cfg.env.name)(cfg.env, resources)   # one env per episode (cheap)
    env.reset(example)                                # {"prompt", "answer", "extra"}
    while True:
        text = <generate until EOS or one of env.stop, the stop string kept in the text>
        step = env.step(text)
        if step.done: reward = step.reward; break
        <append step.observation; the engine prefills it, it gets no policy or draft loss>
    env.close()

Running out of turns or tokens before ``done`` is the loop's business (the episode's reward is
then 0). ``EnvStep.info`` holds the step's counters, floats, always the same keys for a given
environment (the search environment: ``tool_calls``, ``tool_errors``, ``parse_errors``), so the
loop can sum them per turn and per batch.

Environments are registered like rewards (skyrl_mtp.rewards.registry): a *factory*
``factory(config: EnvConfig, resources) -> TextEnv`` under a name, looked up by ``env.name``.
``resources`` is the one object shared by all environments of a run (e.g. the retrieval client);
each factory's docstring says what it takes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # the config tree imports torch; the interface does not need it at run time
    from skyrl_mtp.config.schema import EnvConfig


@dataclass
class EnvStep:
    """What the environment answers to one model turn."""

    observation: str  # text appended after the model's turn (the engine prefills it); "" when done
    reward: float  # the episode's task reward; meaningful when done (0.0 otherwise)
    done: bool
    info: dict[str, float] = field(default_factory=dict)  # this step's counters


class TextEnv(ABC):
    """A text-in, text-out environment of one episode at a time.

    ``stop``: the strings that end a model turn (passed to vLLM as stop strings; the loop keeps
    them in the turn's text, so :meth:`step` sees them).
    """

    stop: tuple[str, ...] = ()

    @abstractmethod
    def reset(self, example: dict) -> None:
        """Starts an episode on `example` = ``{"prompt", "answer", "extra"}`` (skyrl_mtp.data.datasets)."""

    @abstractmethod
    def step(self, model_text: str) -> EnvStep:
        """Consumes one model turn (its generated text, stop string included) and answers it."""

    def close(self) -> None:
        """Releases what the environment holds for itself (not the shared resources)."""


EnvFactory = Callable[["EnvConfig", Any], TextEnv]

_ENVS: dict[str, EnvFactory] = {}


def register_env(name: str, *, override: bool = False) -> Callable[[EnvFactory], EnvFactory]:
    """Decorator registering ``factory(config: EnvConfig, resources) -> TextEnv`` under `name`; a
    second registration of a name is an error unless ``override=True``."""
    if not name or not isinstance(name, str):
        raise ValueError(f"env name must be a non-empty string, got {name!r}")

    def decorator(factory: EnvFactory) -> EnvFactory:
        if not callable(factory):
            raise ValueError(f"register_env({name!r}) expects a factory function "
                             f"(config, resources) -> TextEnv, got {factory!r}")
        if name in _ENVS and not override and _ENVS[name] is not factory:
            raise ValueError(f"env {name!r} is already registered ({_ENVS[name]!r}); "
                             "pick another name or pass override=True")
        _ENVS[name] = factory
        return factory

    return decorator


def get_env(name: str) -> EnvFactory:
    """The factory registered as `name`; ValueError naming the value and the known names otherwise."""
    try:
        return _ENVS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown env {name!r} (env.name); known envs: {known_envs()}. Set env.name to "
                         "one of them, or null for single-turn rollouts; register a new one with "
                         "@register_env(name).") from None


def known_envs() -> list[str]:
    """The registered environment names, sorted."""
    return sorted(_ENVS)
