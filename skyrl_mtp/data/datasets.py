"""Prompt datasets: loading user files and iterating over them in resumable, seeded batches.

This module owns

* :func:`load_examples` - reads a JSONL / JSON / Parquet file of prompts and reference answers
  (e.g. DAPO-Math-17k) into the examples the trainer uses;
* :func:`synthetic_examples` - the built-in sort task in the same shape;
* :class:`PromptDataset` - a deterministic per-epoch shuffle from a seed with a cursor that
  :meth:`~PromptDataset.state_dict` / :meth:`~PromptDataset.load_state_dict` save and restore.

An *example* is a dict ``{"prompt", "answer", "extra"}``:

* ``prompt`` is either a string (used as is) or a chat-messages list ``[{"role", "content"}, ...]``,
  kept as a list: the caller applies the tokenizer's chat template (e.g.
  ``tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)``);
* ``answer`` is the reference answer as a string (numbers are converted with ``str``);
* ``extra`` holds the row's other columns, passed on to the reward function as keyword arguments.

Column names are configurable (``prompt_key`` / ``answer_key``) and may be dotted paths into nested
records: DAPO-Math-17k stores its answer at ``reward_model.ground_truth``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from skyrl_mtp.data.synthetic import DEFAULT_TASK, Split, SyntheticTask

Example = dict[str, Any]
SUPPORTED_SUFFIXES = (".jsonl", ".json", ".parquet")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_examples(
    path: str | Path,
    *,
    prompt_key: str = "prompt",
    answer_key: str = "answer",
    max_examples: int | None = None,
) -> list[Example]:
    """Examples from a ``.jsonl``, ``.json`` (a list of records) or ``.parquet`` file.

    Raises FileNotFoundError if `path` does not exist; ValueError for an unsupported suffix, an
    empty file, a missing column (naming it and the columns present), or a bad prompt/answer value
    (naming the row).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = [row for _, row in iter_jsonl(path)]
    elif suffix == ".json":
        rows = _read_json(path)
    elif suffix == ".parquet":
        rows = _read_parquet(path)
    else:
        raise ValueError(f"unsupported dataset format {suffix!r} for {path}; use one of {SUPPORTED_SUFFIXES}")
    if not rows:
        raise ValueError(f"dataset {path} is empty: it has no rows")
    if max_examples is not None:
        if max_examples < 1:
            raise ValueError(f"max_examples must be >= 1 or None, got {max_examples}")
        rows = rows[:max_examples]
    return [_to_example(row, i, path, prompt_key, answer_key) for i, row in enumerate(rows)]


def synthetic_examples(
    seed: int, n: int, split: Split = "train", task: SyntheticTask = DEFAULT_TASK
) -> list[Example]:
    """`n` examples of the built-in sort task (see :mod:`skyrl_mtp.data.synthetic`)."""
    return task.make_split(seed, n, split)


def iter_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    """``(location, object)`` per non-blank line of a JSONL file; ValueError naming ``path:line``
    for invalid JSON or a line that is not a JSON object (location: ``path:line`` for the caller's
    own checks)."""
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object per line, got {type(row).__name__}")
            yield f"{path}:{line_no}", row


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path}: a .json dataset must be a list of objects; use .jsonl for one object per line")
    return data


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    # Struct columns become dicts and list<struct> columns (chat messages) lists of dicts.
    return pq.read_table(path).to_pylist()


def _lookup(row: dict, key: str) -> tuple[bool, Any]:
    """(found, value) for a plain or dotted key; a plain key that exists wins over a dotted path."""
    if key in row:
        return True, row[key]
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


def _to_example(row: dict, index: int, path: Path, prompt_key: str, answer_key: str) -> Example:
    values = {}
    for role, key in (("prompt_key", prompt_key), ("answer_key", answer_key)):
        found, value = _lookup(row, key)
        if not found:
            raise ValueError(
                f"{path}: row {index} has no column {key!r} ({role}); columns present: {sorted(row)}. "
                f"Pass {role}=<column> (dotted paths reach nested fields, e.g. 'reward_model.ground_truth')."
            )
        values[key] = value
    prompt = _check_prompt(values[prompt_key], index, path, prompt_key)
    answer = values[answer_key]
    if answer is None or isinstance(answer, (dict, list)):
        raise ValueError(f"{path}: row {index} column {answer_key!r} must be a string or number, got {answer!r}")
    top_level = {prompt_key.split(".")[0], answer_key.split(".")[0]}
    extra = {k: v for k, v in row.items() if k not in top_level}
    return {"prompt": prompt, "answer": str(answer), "extra": extra}


def _check_prompt(prompt: Any, index: int, path: Path, key: str) -> str | list[dict]:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError(f"{path}: row {index} column {key!r} is an empty prompt")
        return prompt
    if isinstance(prompt, list) and prompt and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt
    ):
        return [{"role": m["role"], "content": m["content"]} for m in prompt]
    raise ValueError(
        f"{path}: row {index} column {key!r} must be a string or a non-empty list of "
        f"{{'role': str, 'content': str}} messages, got {prompt!r:.200}"
    )


# --------------------------------------------------------------------------------------------
# Iteration
# --------------------------------------------------------------------------------------------


class PromptDataset:
    """Batches of `batch_size` examples; a fresh seeded shuffle each epoch; a resumable cursor.

    The order of epoch ``e`` is ``numpy.random.default_rng([seed, e]).permutation(n)``, so it
    depends only on the seed, the epoch and the number of examples: a run restored from
    :meth:`state_dict` continues with exactly the batches the original run would have drawn.
    With ``drop_last`` (default, as RL trainers do) the last incomplete batch of an epoch is
    skipped so every step sees the same number of prompts.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        if not examples:
            raise ValueError("PromptDataset needs at least one example; the dataset is empty")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (it seeds numpy's generator), got {seed}")
        if drop_last and batch_size > len(examples):
            raise ValueError(
                f"batch_size {batch_size} exceeds the dataset's {len(examples)} examples with drop_last=True: "
                "no full batch exists; lower batch_size or pass drop_last=False"
            )
        self.examples = list(examples)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0  # index into this epoch's order of the next example to yield
        self._order = self._epoch_order(0)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def batches_per_epoch(self) -> int:
        full, rest = divmod(len(self.examples), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def next_batch(self) -> list[Example]:
        """The next batch, moving to the next epoch (and its shuffle) when this one is used up."""
        if self._epoch_exhausted():
            self._start_epoch(self.epoch + 1)
        end = min(self.position + self.batch_size, len(self.examples))
        batch = [self.examples[i] for i in self._order[self.position:end]]
        self.position = end
        return batch

    def __iter__(self) -> Iterator[list[Example]]:
        """The remaining batches of the current epoch (all of the next one if this one is done)."""
        if self._epoch_exhausted():
            self._start_epoch(self.epoch + 1)
        epoch = self.epoch
        while self.epoch == epoch and not self._epoch_exhausted():
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_examples": len(self.examples),
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the cursor. The dataset, seed and shuffle must match what was saved (else the
        saved position would point into a different order); the batch size may change."""
        for key in ("seed", "num_examples", "shuffle"):
            mine = len(self.examples) if key == "num_examples" else getattr(self, key)
            if key in state and state[key] != mine:
                raise ValueError(
                    f"cannot restore PromptDataset state: saved {key}={state[key]!r} but this dataset has "
                    f"{key}={mine!r}; construct it with the same data, seed and shuffle as the saved run"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self.examples):
            raise ValueError(f"invalid PromptDataset state: epoch={epoch}, position={position} "
                             f"for {len(self.examples)} examples")
        self._start_epoch(epoch)
        self.position = position

    # -- internals --------------------------------------------------------------------------

    def _epoch_exhausted(self) -> bool:
        remaining = len(self.examples) - self.position
        return remaining == 0 or (self.drop_last and remaining < self.batch_size)

    def _start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.position = 0
        self._order = self._epoch_order(epoch)

    def _epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.examples)))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples)).tolist()
