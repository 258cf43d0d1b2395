"""Driver-side plumbing for calls into engine actors: the engine handle, the errors that name the
engine, and ``gather`` which waits for one call per engine and turns Ray failures into those errors.

Every remote call to an engine goes through ``gather`` so that a failure always says which engine
(index, pid) failed and why, and so that one failing engine never leaves the other engines' calls
un-awaited.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Sequence


class RolloutEngineError(RuntimeError):
    """A call into rollout engine ``engine_index`` failed; ``cause`` is the engine-side exception."""

    def __init__(self, engine_index: int, message: str, cause: BaseException | None = None):
        super().__init__(message)
        self.engine_index = engine_index
        self.cause = cause


class EngineDiedError(RolloutEngineError):
    """The engine's actor process is gone (killed, crashed, out of memory)."""


class EngineTimeoutError(RolloutEngineError):
    """The engine did not answer within the configured timeout."""


class WeightCommitError(RolloutEngineError):
    """A weight sync failed while engines applied it (after every engine had staged and validated
    it), after the rollback: ``states`` maps each engine index to its weight version afterwards,
    None where the engine's weights are inconsistent (or unknown). When all agree (every engine was
    rolled back) the group generates from that version; otherwise it refuses until a sync succeeds."""

    def __init__(self, engine_index: int, message: str, cause: BaseException | None, states: dict[int, int | None]):
        super().__init__(engine_index, message, cause)
        self.states = states


class MixedWeightVersionsError(RuntimeError):
    """The engines do not all serve one complete weight version (a weight sync failed while they
    applied it); ``states`` as in ``WeightCommitError``."""

    def __init__(self, message: str, states: dict[int, int | None]):
        super().__init__(message)
        self.states = states


@dataclass
class EngineHandle:
    """One engine actor as the driver sees it. ``index`` is stable for the group's lifetime."""

    index: int
    actor: Any
    pid: int | None = None
    alive: bool = True
    death_cause: str | None = field(default=None, repr=False)
    # The weight version the engine serves, as the last weight sync left it; None: inconsistent
    # (its apply failed) or unknown (it did not answer). Kept by the transports' push.
    weight_version: int | None = 0

    def describe(self) -> str:
        return f"rollout engine {self.index}" + (f" (pid {self.pid})" if self.pid is not None else "")


def describe_states(states: dict[int, int | None]) -> str:
    """'engine 0: version 3, engine 1: inconsistent' for error messages."""
    return ", ".join(f"engine {i}: " + ("inconsistent" if v is None else f"version {v}") for i, v in sorted(states.items()))


def gather(calls: Sequence[tuple[EngineHandle, Any]], what: str, timeout_s: float | None = None) -> list[Any]:
    """Waits for every ``(engine, ObjectRef)`` and returns the results in order.

    All calls are awaited even when some fail (so no call is left running unobserved); then the
    first failure is raised as a ``RolloutEngineError`` naming its engine, with the other failed
    engines listed in the message. Engines whose actor died are marked ``alive = False``.
    """
    outcomes = gather_outcomes(calls, what, timeout_s)
    errors = [o for o in outcomes if isinstance(o, RolloutEngineError)]
    if errors:
        first = errors[0]
        if len(errors) > 1:
            others = ", ".join(f"engine {e.engine_index}" for e in errors[1:])
            first.args = (f"{first.args[0]} (also failed: {others})",)
        raise first
    return outcomes


def gather_outcomes(calls: Sequence[tuple[EngineHandle, Any]], what: str,
                    timeout_s: float | None = None) -> list[Any]:
    """Like ``gather`` but returns, per call, its result or the ``RolloutEngineError`` naming its
    engine, for callers that must know which engines succeeded (the commit phase of a sync)."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    outcomes: list[Any] = [None] * len(calls)
    for i, (engine, ref) in enumerate(calls):
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            outcomes[i] = ray.get(ref, timeout=remaining)
        except GetTimeoutError as exc:
            try:
                ray.cancel(ref, force=False)  # best effort: a running actor call may not be interruptible
            except Exception:  # noqa: BLE001 - the timeout is the error to report
                pass
            outcomes[i] = EngineTimeoutError(
                engine.index, f"{engine.describe()} did not finish {what} within {timeout_s} s", exc)
        except RayActorError as exc:
            engine.alive = False
            engine.death_cause = _short(exc)
            outcomes[i] = EngineDiedError(
                engine.index, f"{engine.describe()} died during {what}: {engine.death_cause}", exc)
        except RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            outcomes[i] = RolloutEngineError(
                engine.index, f"{engine.describe()} failed in {what}: {type(cause).__name__}: {_short(cause)}", cause)
    return outcomes


def _short(exc: BaseException, limit: int = 800) -> str:
    """A one-line summary of an exception: Ray's messages embed the remote traceback, whose first
    line says where it happened and whose last line says what happened (e.g. an actor whose
    ``__init__`` raised)."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # Ray colours the actor name
    lines = [line.strip() for line in plain.strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[0] if len(lines) == 1 or lines[-1] == lines[0] else f"{lines[0]} ... {lines[-1]}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
