"""Math answer checking: extract a response's final answer and compare it with `math-verify`.

This module owns :func:`extract_final_answer` and :func:`math_reward` (registered as ``"math"``).

Final answer: the content of the *last* ``\\boxed{...}`` (or ``\\fbox{...}``) in the response,
braces balanced; if there is none, the text after the last ``Answer:`` (the format DAPO-Math-17k's
prompts ask for: "The last line of your response should be of the form Answer: $Answer"). A
response with neither scores 0. Equivalence is decided by ``math_verify.verify`` on sympy parses,
so ``\\frac{1}{2}``, ``0.5`` and ``1/2`` are all the same answer.

Timeouts: math-verify guards parsing with ``signal.alarm``, which only works in the main thread.
Off the main thread (a thread pool, some actor runtimes) the checks run without a timeout.
"""

from __future__ import annotations

import re
import threading

_BOX_OPENERS = ("\\boxed{", "\\fbox{")
_ANSWER_LINE = re.compile(r"Answer\s*:\s*(.+)", re.IGNORECASE)
TIMEOUT_SECONDS = 5


def extract_final_answer(text: str) -> str | None:
    """The last boxed answer of `text`, else the text after its last ``Answer:``; None if neither."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    matches = _ANSWER_LINE.findall(text)
    if matches:
        answer = matches[-1].strip()
        return answer or None
    return None


def math_reward(response_text: str, answer: str, **extra) -> float:
    """1.0 if the response's final answer is mathematically equal to `answer`, else 0.0."""
    from math_verify import parse, verify

    predicted = extract_final_answer(response_text)
    if predicted is None:
        return 0.0
    timeout = TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None
    try:
        gold = parse(_as_latex(str(answer)), parsing_timeout=timeout)
        pred = parse(_as_latex(predicted), parsing_timeout=timeout)
        if not gold or not pred:
            return 0.0
        return 1.0 if verify(gold, pred, timeout_seconds=timeout) else 0.0
    except Exception:  # noqa: BLE001 - a malformed answer is a wrong answer, never a crashed step
        return 0.0


def _as_latex(answer: str) -> str:
    """Wraps a bare answer in ``\\boxed{}`` so math-verify reads it as one LaTeX expression."""
    answer = answer.strip()
    if "\\boxed" in answer or "$" in answer:
        return answer
    return "\\boxed{" + answer + "}"


def _last_boxed(text: str) -> str | None:
    start = max(text.rfind(opener) for opener in _BOX_OPENERS)
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                content = text[begin:i].strip()
                return content or None
        i += 1
    return None  # unbalanced: the response was cut off inside the box
