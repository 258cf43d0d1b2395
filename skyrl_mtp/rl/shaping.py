"""DAPO's reward shaping and filtering of truncated responses (pure torch): the soft overlong
punishment and overlong filtering."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor



def overlong_penalty(
    response_lengths: Tensor | Sequence[int],
    max_response_length: int,
    overlong_buffer_len: int,
    penalty_factor: float = 1.0,
) -> Tensor:
    """DAPO's soft overlong punishment, a reward term in ``[-penalty_factor, 0]`` per sequence [B].

    With ``L = max_response_length`` and ``C = overlong_buffer_len``::

        0                                  if len <= L - C
        (L - C - len) / C * penalty_factor if L - C < len <= L   (linear in the buffer)
        -penalty_factor                    if len > L

    Add it to the task reward before computing advantages.
    """
    if max_response_length < 1:
        raise ValueError(f"max_response_length must be >= 1, got {max_response_length}")
    if not 0 < overlong_buffer_len <= max_response_length:
        raise ValueError(f"overlong_buffer_len must be in 1..max_response_length ({max_response_length}), "
                         f"got {overlong_buffer_len}")
    if penalty_factor < 0:
        raise ValueError(f"penalty_factor must be >= 0, got {penalty_factor}")
    lengths = torch.as_tensor(response_lengths, dtype=torch.float32)
    excess = (lengths - (max_response_length - overlong_buffer_len)) / overlong_buffer_len
    return -excess.clamp(0.0, 1.0) * penalty_factor


# vLLM's finish reasons: "stop" (eos / stop string), "length" (hit max_tokens), "abort".
_FINISH_REASONS = {"stop": 1.0, "length": 0.0, "abort": 0.0}


def overlong_filter_mask(finish_reasons: Sequence[str]) -> Tensor:
    """Per-sequence loss mask [B]: 0 for truncated (``"length"``) or aborted responses, else 1.

    DAPO's overlong filtering: a truncated response's reward says nothing about its reasoning, so
    its tokens are left out of the loss. Use as ``response_mask * mask[:, None]``.
    """
    try:
        return torch.tensor([_FINISH_REASONS[r] for r in finish_reasons], dtype=torch.float32)
    except KeyError as e:
        raise ValueError(f"unknown finish reason {e.args[0]!r}; expected one of {sorted(_FINISH_REASONS)}") from None


