"""The CPU-learnable search task: look a made-up name's code up with the search tool, then answer it.

Corpus: one fact per name, ``"the code of <name> is <code>"``, for a few hundred made-up names
(consonant-vowel-consonant-vowel, e.g. ``kavo``) with random codes of ``code_digits`` digits
(distinct across names). Everything is a function of the task's seed. A name is a word of its own
fact only, so BM25 with the name as the query ranks that fact first (and, as Lucene does,
returns no other document: none shares a word with the query).

Example (the project's shape, :mod:`skyrl_mtp.data.datasets`)::

    {"prompt": "Q code of kavo ? A", "answer": "4821",
     "extra": {"task": "search", "name": "kavo", "split": "train", "index": 0}}

The code is drawn independently of the name and is in no prompt, so it is reachable only through
the tool; eval names are disjoint from train names (a hash of the name picks the split), so a
policy cannot memorise eval answers either.

Gold trajectory (:func:`search_sft_trajectory`, for the supervised warm start)::

    [("<search>kavo</search>", "<information>the code of kavo is 4821</information>"),
     ("<answer>4821</answer>", "")]

With the tiny byte-level tokenizer a typical episode is about 95 tokens (prompt 15, search turn 21,
observation 46, answer turn 11, plus eos): see tests/data/test_search_task.py.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from skyrl_mtp.envs.search import ANSWER_CLOSE, ANSWER_OPEN, SEARCH_CLOSE, SEARCH_OPEN, format_observation

Split = Literal["train", "eval"]
Lookup = Callable[[Sequence[str], int], list[list[dict]]]

TASK_NAME = "search"
CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
# Words a name must not be: the corpus's and prompt's own words, and the tiny tokenizer's task words.
RESERVED = frozenset({"the", "code", "of", "is", "q", "a", "sort", "reverse", "copy", "count", "add", "sum",
                      "from", "to", "by", "step", "answer", "list", "and", "then", "next", "digits", "numbers",
                      "search", "information"})


def make_prompt(name: str) -> str:
    return f"Q code of {name} ? A"


def make_fact(name: str, code: str) -> str:
    return f"the code of {name} is {code}"


@dataclass(frozen=True)
class SearchTask:
    """``num_names`` facts with ``code_digits``-digit codes, drawn from ``seed``; ``eval_buckets``
    of 100 hash buckets of the name are the eval split."""

    seed: int = 0
    num_names: int = 400
    code_digits: int = 4
    eval_buckets: int = 10

    def __post_init__(self) -> None:
        if not 1 <= self.code_digits <= 12:
            raise ValueError(f"code_digits must be in 1..12, got {self.code_digits}")
        most = min(len(_all_names()), 10 ** self.code_digits)
        if not 1 <= self.num_names <= most:
            raise ValueError(f"num_names must be in 1..{most} (distinct names, distinct codes of "
                             f"{self.code_digits} digits), got {self.num_names}")
        if not 0 < self.eval_buckets < 100:
            raise ValueError(f"eval_buckets must be in 1..99 (of 100 hash buckets), got {self.eval_buckets}")

    def facts(self) -> list[tuple[str, str]]:
        """(name, code) of every fact, in corpus order."""
        rng = random.Random(f"{TASK_NAME}/{self.seed}")
        names = rng.sample(_all_names(), self.num_names)
        codes = rng.sample(range(10 ** self.code_digits), self.num_names)
        return [(name, f"{code:0{self.code_digits}d}") for name, code in zip(names, codes)]

    def corpus(self) -> list[dict]:
        """The retrieval corpus: ``{"id": "code-<name>", "contents": "the code of <name> is <code>"}``."""
        return [{"id": f"code-{name}", "contents": make_fact(name, code)} for name, code in self.facts()]

    def split_of(self, name: str) -> Split:
        """The split of a name (stable: sha256 of the name, 100 buckets)."""
        bucket = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % 100
        return "eval" if bucket < self.eval_buckets else "train"

    def examples(self, split: Split = "train", n: int | None = None) -> list[dict]:
        """The questions of `split` (one per name of that split, corpus order), the first `n` if given."""
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        out = []
        for name, code in self.facts():
            if self.split_of(name) == split:
                out.append({"prompt": make_prompt(name), "answer": code,
                            "extra": {"task": TASK_NAME, "name": name, "split": split, "index": len(out)}})
        if n is not None:
            if not 0 <= n <= len(out):
                raise ValueError(f"n={n}: the {split} split of this task has {len(out)} examples; ask for at "
                                 "most that many or raise num_names")
            out = out[:n]
        return out

    def index(self):
        """An in-process BM25 index of :meth:`corpus` (what the started retrieval server serves)."""
        from skyrl_mtp.envs.retrieval.index import BM25Index

        return BM25Index(self.corpus())

    def sft_trajectories(self, lookup: Lookup | object | None = None, split: Split = "train",
                         topk: int | None = None, *, tool_share: float = 1.0, passes: int = 1,
                         seed: int = 0) -> list[tuple[str, list[tuple[str, str]]]]:
        """(prompt, trajectory) for every example of `split`, `passes` times over; `lookup` defaults
        to :meth:`index`.

        With ``tool_share`` < 1 each trajectory is the gold one (search, then answer) with that
        probability, else :func:`guessed_answer_trajectory` (answer at once, a random code), drawn
        afresh per pass from `seed`, so which names get a guess is not something to memorise. A
        warm start on such a mix leaves a policy that copies codes from observations but calls the
        tool only part of the time: what it gains from calling it is left for RL to find.
        """
        if not 0.0 <= tool_share <= 1.0:
            raise ValueError(f"tool_share must be in [0, 1], got {tool_share}")
        if passes < 1:
            raise ValueError(f"passes must be >= 1, got {passes}")
        lookup = self.index() if lookup is None else lookup
        gold = [(ex["prompt"], search_sft_trajectory(ex, lookup, topk)) for ex in self.examples(split)]
        if tool_share == 1.0:
            return gold * passes
        rng = random.Random(f"{TASK_NAME}/sft/{self.seed}/{seed}")
        return [(prompt, turns if rng.random() < tool_share else guessed_answer_trajectory(self.code_digits, rng))
                for _ in range(passes) for prompt, turns in gold]


def _all_names() -> list[str]:
    syllables = [c + v for c in CONSONANTS for v in VOWELS]
    return [a + b for a in syllables for b in syllables if a + b not in RESERVED]


DEFAULT_SEARCH_TASK = SearchTask()


def guessed_answer_trajectory(code_digits: int, rng: random.Random) -> list[tuple[str, str]]:
    """One turn that answers without calling the tool: ``[("<answer>CODE</answer>", "")]`` with a
    uniformly random code of `code_digits` digits (right by chance only)."""
    return [(f"{ANSWER_OPEN}{rng.randrange(10 ** code_digits):0{code_digits}d}{ANSWER_CLOSE}", "")]


def search_sft_trajectory(example: dict, corpus_lookup: Lookup | object,
                          topk: int | None = None) -> list[tuple[str, str]]:
    """The gold turns of `example`: ``[("<search>NAME</search>", observation), ("<answer>CODE</answer>", "")]``.

    `corpus_lookup`: ``(queries, topk) -> list[list[item]]`` or an object with such a ``search``
    method - :class:`~skyrl_mtp.envs.retrieval.RetrievalClient` or
    :class:`~skyrl_mtp.envs.retrieval.BM25Index` over the task's corpus. The observation is the
    search environment's own rendering of the lookup's results (``topk`` default: ``env.topk``'s
    default), i.e. exactly what :class:`~skyrl_mtp.envs.search.SearchEnv` returns for that query.
    ValueError if it does not contain the answer (the lookup serves another corpus or seed).
    """
    if topk is None:
        from skyrl_mtp.config.schema import EnvConfig

        topk = EnvConfig().topk
    search = corpus_lookup.search if hasattr(corpus_lookup, "search") else corpus_lookup
    if not callable(search):
        raise TypeError(f"corpus_lookup must be callable (queries, topk) or have .search, got {corpus_lookup!r}")
    extra = example.get("extra") or {}
    name, answer = extra.get("name"), example.get("answer")
    if extra.get("task") != TASK_NAME or not name or not answer:
        raise ValueError(f"not a search-task example (needs extra.task='search', extra.name and answer): "
                         f"{example!r:.200}")
    observation = format_observation(search([name], topk)[0])
    if make_fact(name, answer) not in observation:
        raise ValueError(f"the lookup's results for {name!r} do not hold its fact {make_fact(name, answer)!r} "
                         f"(got {observation!r:.200}); is it serving this task's corpus (same seed)?")
    return [(f"{SEARCH_OPEN}{name}{SEARCH_CLOSE}", observation), (f"{ANSWER_OPEN}{answer}{ANSWER_CLOSE}", "")]


def main(argv: list[str] | None = None) -> int:
    """``python -m skyrl_mtp.data.search_task --write-corpus FILE [--seed S] [--num-names N]``: the
    task's corpus as JSONL, for ``python -m skyrl_mtp.envs.retrieval --corpus FILE``."""
    parser = argparse.ArgumentParser(prog="python -m skyrl_mtp.data.search_task", description=main.__doc__)
    parser.add_argument("--write-corpus", required=True, metavar="FILE")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEARCH_TASK.seed)
    parser.add_argument("--num-names", type=int, default=DEFAULT_SEARCH_TASK.num_names)
    parser.add_argument("--code-digits", type=int, default=DEFAULT_SEARCH_TASK.code_digits)
    args = parser.parse_args(argv)
    from skyrl_mtp.envs.retrieval.index import write_corpus

    task = SearchTask(seed=args.seed, num_names=args.num_names, code_digits=args.code_digits)
    path = write_corpus(task.corpus(), args.write_corpus)
    print(f"wrote {task.num_names} documents to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
