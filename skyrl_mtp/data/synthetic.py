"""The built-in synthetic task: sort a string of digits.

This module owns the task's text format, its deterministic train/eval splits, the reference
(SFT) responses and the reward with partial credit. It needs no files: every example is generated
from a seed, so the tiny model has a verifiable task out of the box.

Format (chosen for the tiny Qwen2-style tokenizer, which splits digits one per token and makes a
space before a digit its own token)::

    prompt:   "sort 83194027351... :"     -> "sort", "Ġ", "8", "3", ..., "Ġ", ":"
    response: " 01123345789..."            -> "Ġ", "0", "1", ..., then eos

so a response of ``n`` digits is ``n + 1`` tokens plus eos, and tokenizing prompt and response
separately gives the same tokens as tokenizing their concatenation. With the default 24-28 digits
the response is 25-29 tokens: long enough that multi-token drafting matters, short enough for a
2-layer model on a CPU. Sorted output is highly predictable once the digit counts are known,
which is what makes an MTP draft head useful on it.

Reward (:func:`sort_reward`): the response is stripped of surrounding whitespace and compared
position by position with the sorted digits; the score is ``matches / max(len(pred), len(answer))``.
Exact match scores 1.0; a missing or extra character both costs a position and lowers the
score through the longer denominator, so wrong lengths are penalised; an empty response scores 0.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Literal

Split = Literal["train", "eval"]

TASK_NAME = "sort"
PROMPT_PREFIX = "sort "
PROMPT_SUFFIX = " :"
_PROMPT_RE = re.compile(r"^sort ([0-9]+) :$")


@dataclass(frozen=True)
class SyntheticTask:
    """Digit sorting with ``min_digits..max_digits`` digits (inclusive) per prompt.

    ``eval_buckets`` of 100 hash buckets belong to the eval split; the split of a digit string is
    a function of the string alone, so train and eval never overlap, whatever the seeds.
    """

    min_digits: int = 24
    max_digits: int = 28
    eval_buckets: int = 10

    def __post_init__(self) -> None:
        if self.min_digits < 1:
            raise ValueError(f"min_digits must be >= 1, got {self.min_digits}")
        if self.max_digits < self.min_digits:
            raise ValueError(f"max_digits ({self.max_digits}) must be >= min_digits ({self.min_digits})")
        if not 0 < self.eval_buckets < 100:
            raise ValueError(f"eval_buckets must be in 1..99 (of 100 hash buckets), got {self.eval_buckets}")

    def split_of(self, digits: str) -> Split:
        """Which split a digit string belongs to (stable: sha256 of the string, 100 buckets)."""
        bucket = int.from_bytes(hashlib.sha256(digits.encode()).digest()[:8], "big") % 100
        return "eval" if bucket < self.eval_buckets else "train"

    def make_split(self, seed: int, n: int, split: Split = "train") -> list[dict]:
        """`n` distinct examples of `split`, a deterministic function of ``(seed, split)``.

        Each example is ``{"prompt", "answer", "extra": {"task", "digits", "num_digits", "split",
        "index"}}``; ``answer`` is the sorted digit string (no space), the reward's reference.
        """
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        # The split name is part of the seed so the two splits draw different streams; the hash
        # filter below is what guarantees they never share an example.
        rng = random.Random(f"{TASK_NAME}/{seed}/{split}")
        examples: list[dict] = []
        seen: set[str] = set()
        while len(examples) < n:
            length = rng.randint(self.min_digits, self.max_digits)
            digits = "".join(rng.choice("0123456789") for _ in range(length))
            if digits in seen or self.split_of(digits) != split:
                continue
            seen.add(digits)
            examples.append(_example(digits, split, len(examples)))
        return examples

    def sft_pairs(self, seed: int, n: int) -> list[tuple[str, str]]:
        """(prompt, response) pairs of the train split for the supervised warm start.

        The response is text only; the caller appends the tokenizer's eos id after tokenizing,
        exactly as the rollout engine ends a generation.
        """
        return [(ex["prompt"], reference_response(ex["prompt"])) for ex in self.make_split(seed, n, "train")]


DEFAULT_TASK = SyntheticTask()


def make_prompt(digits: str) -> str:
    """The prompt asking to sort `digits` (a non-empty string of 0-9)."""
    if not digits or not digits.isascii() or not digits.isdigit():
        raise ValueError(f"digits must be a non-empty string of 0-9, got {digits!r}")
    return f"{PROMPT_PREFIX}{digits}{PROMPT_SUFFIX}"


def parse_prompt(prompt: str) -> str:
    """The digit string of a sort prompt; ValueError if `prompt` is not one."""
    match = _PROMPT_RE.match(prompt)
    if match is None:
        raise ValueError(f"not a sort prompt (expected 'sort <digits> :'): {prompt!r}")
    return match.group(1)


def sorted_answer(digits: str) -> str:
    """The reward's reference: the digits in ascending order, no spaces."""
    return "".join(sorted(digits))


def reference_response(prompt: str) -> str:
    """The response the policy should generate for `prompt`: a space, then the sorted digits."""
    return " " + sorted_answer(parse_prompt(prompt))


def sort_reward(response_text: str, answer: str, **extra) -> float:
    """Partial-credit reward in [0, 1]: positional matches / max(len(response), len(answer)).

    `response_text` is the decoded response without eos; surrounding whitespace is ignored
    (the reference response starts with a space). Extra keyword arguments are accepted and
    ignored so the function fits the reward registry's signature.
    """
    if not answer:
        raise ValueError("sort_reward: answer is empty; expected the sorted digit string")
    pred = response_text.strip()
    if not pred:
        return 0.0
    matches = sum(p == a for p, a in zip(pred, answer))
    return matches / max(len(pred), len(answer))


def make_split(seed: int, n: int, split: Split = "train") -> list[dict]:
    """:meth:`SyntheticTask.make_split` of the default task (24-28 digits)."""
    return DEFAULT_TASK.make_split(seed, n, split)


def sft_pairs(seed: int, n: int) -> list[tuple[str, str]]:
    """:meth:`SyntheticTask.sft_pairs` of the default task."""
    return DEFAULT_TASK.sft_pairs(seed, n)


def _example(digits: str, split: Split, index: int) -> dict:
    return {
        "prompt": make_prompt(digits),
        "answer": sorted_answer(digits),
        "extra": {"task": TASK_NAME, "digits": digits, "num_digits": len(digits), "split": split,
                  "index": index},
    }
