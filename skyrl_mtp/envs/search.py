"""The search environment (Search-R1 style): the model searches a corpus, then answers.

A model turn ends at ``</search>`` or ``</answer>`` (:attr:`SearchEnv.stop`) or at EOS:

* ``<search>QUERY</search>`` -> the observation is ``<information>`` + the top-k documents'
  contents, one per line, best first + ``</information>`` (``<information>no results</information>``
  when no document shares a word with the query); not done.
* ``<answer>TEXT</answer>`` -> done; reward 1.0 if TEXT equals the example's answer after
  stripping surrounding whitespace on both sides, else 0.0; observation "".
* anything else (no closing tag, a closing tag without its opening tag, an empty query or answer)
  -> ``<information>error: ...</information>``, ``parse_errors`` = 1, not done.
* the retrieval fails (timeout, server down, HTTP error or a bad answer) ->
  ``<information>error: search failed (timeout|unavailable|bad_response)</information>``,
  ``tool_errors`` = 1, not done: the episode goes on and the model may search again. The reason
  in full is kept in :attr:`SearchEnv.last_error` for logs.

Parsing: the action is the first closing tag of the turn (vLLM stops there) and the last opening
tag of the same kind before it; text before the opening tag (reasoning) and after the closing tag
is ignored. Every step's ``info`` has the float counters ``tool_calls`` (1 for each search sent to
the retriever, failed or not), ``tool_errors`` and ``parse_errors``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from skyrl_mtp.envs.base import EnvStep, TextEnv, register_env
from skyrl_mtp.envs.retrieval.client import RetrievalClient, RetrievalError

if TYPE_CHECKING:
    from skyrl_mtp.config.schema import EnvConfig

SEARCH_OPEN, SEARCH_CLOSE = "<search>", "</search>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
INFO_OPEN, INFO_CLOSE = "<information>", "</information>"
NO_RESULTS = "no results"
COUNTERS = ("tool_calls", "tool_errors", "parse_errors")

_CLOSE = re.compile(r"</(search|answer)>")
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


class Retriever(Protocol):
    def search(self, queries: Sequence[str], topk: int) -> list[list[dict]]: ...


def parse_action(model_text: str) -> tuple[str, str] | tuple[None, str]:
    """``("search", query)`` / ``("answer", text)`` (stripped, non-empty), or ``(None, why)``."""
    close = _CLOSE.search(model_text)
    if close is None:
        return None, "no </search> or </answer> tag"
    kind = close.group(1)
    head = model_text[:close.start()]
    opening = f"<{kind}>"
    start = head.rfind(opening)
    other = head.rfind(ANSWER_OPEN if kind == "search" else SEARCH_OPEN)
    if start < 0 or other > start:
        return None, f"</{kind}> without <{kind}>"
    content = head[start + len(opening):].strip()
    if not content:
        return None, "empty search query" if kind == "search" else "empty answer"
    return kind, content


def information(text: str) -> str:
    """An observation: `text` between ``<information>`` and ``</information>``."""
    return f"{INFO_OPEN}{text}{INFO_CLOSE}"


def format_observation(items: Sequence[dict]) -> str:
    """The observation of a search's results (the items of one query, as the retriever returns them)."""
    if not items:
        return information(NO_RESULTS)
    return information("\n".join(item["document"]["contents"].strip() for item in items))


def answer_matches(answer_text: str, reference: str) -> bool:
    """The environment's success test: equal after stripping surrounding whitespace."""
    return answer_text.strip() == str(reference).strip()


def answer_score(answer_text: str, reference: str, partial_credit: bool = False) -> float:
    """1.0 for an exact match (after stripping), else 0.0; with `partial_credit` the share of
    positions where the characters agree, over the longer of the two (so a wrong length costs too),
    the same scheme as the sort task's reward. Partial credit gives a small model a gradient
    before it gets whole answers right (the CPU search task); real QA keeps exact match."""
    got, want = answer_text.strip(), str(reference).strip()
    if got == want:
        return 1.0
    if not partial_credit or not got:
        return 0.0
    return sum(a == b for a, b in zip(got, want)) / max(len(got), len(want))


def search_exact_reward(response_text: str, answer: str, **extra) -> float:
    """Reward of a whole search episode's text: 1.0 if its last ``<answer>...</answer>`` matches
    `answer` exactly (after stripping), else 0.0 (also when it has no answer). Registered as
    ``search_exact``; agrees with :class:`SearchEnv`'s reward on the episode's final turn."""
    found = _ANSWER.findall(response_text)
    return 1.0 if found and answer_matches(found[-1], answer) else 0.0


class SearchEnv(TextEnv):
    """One search episode at a time. `retriever`: anything with ``search(queries, topk) ->
    list[list[dict]]`` - a :class:`RetrievalClient` (HTTP, the run's case) or a
    :class:`~skyrl_mtp.envs.retrieval.BM25Index` (in-process). Only :class:`RetrievalError` counts
    as a tool error; other exceptions are bugs and propagate."""

    stop = (SEARCH_CLOSE, ANSWER_CLOSE)

    def __init__(self, retriever: Retriever, topk: int = 3, partial_credit: bool = False) -> None:
        if not hasattr(retriever, "search"):
            raise TypeError(f"SearchEnv needs a retriever with search(queries, topk), got {retriever!r}")
        if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
            raise ValueError(f"topk must be an integer >= 1 (env.topk), got {topk!r}")
        self.retriever = retriever
        self.topk = topk
        self.partial_credit = partial_credit
        self.answer: str | None = None
        self.done = False
        self.last_error: str | None = None

    def reset(self, example: dict) -> None:
        answer = example.get("answer") if isinstance(example, dict) else None
        if answer is None or not str(answer).strip():
            raise ValueError(f"SearchEnv.reset: the example needs a non-empty 'answer' (the reference the "
                             f"final <answer> is compared with), got {example!r:.200}")
        self.answer = str(answer)
        self.done = False
        self.last_error = None

    def step(self, model_text: str) -> EnvStep:
        if self.answer is None:
            raise RuntimeError("SearchEnv.step before reset(example)")
        if self.done:
            raise RuntimeError("SearchEnv.step after the episode ended (an answer was given); call reset(example)")
        info = dict.fromkeys(COUNTERS, 0.0)
        self.last_error = None
        kind, content = parse_action(model_text)
        if kind is None:
            info["parse_errors"] = 1.0
            self.last_error = f"parse error: {content}"
            return EnvStep(information(f"error: {content}"), 0.0, False, info)
        if kind == "answer":
            self.done = True
            reward = answer_score(content, self.answer, self.partial_credit)
            return EnvStep("", reward, True, info)
        info["tool_calls"] = 1.0
        try:
            items = self.retriever.search([content], self.topk)[0]
        except RetrievalError as err:
            info["tool_errors"] = 1.0
            self.last_error = f"{type(err).__name__}: {err}"
            return EnvStep(information(f"error: search failed ({err.kind})"), 0.0, False, info)
        return EnvStep(format_observation(items), 0.0, False, info)

    def close(self) -> None:
        """Nothing of its own to release: the retriever is shared and outlives the episode."""
        self.answer = None


@register_env("search")
def make_search_env(config: "EnvConfig", resources: Any = None) -> SearchEnv:
    """The search environment of `config` (``env.topk``, ``env.timeout_s``, ``env.retrieval_url``).

    `resources`: the retriever shared by all episodes of the run - a :class:`RetrievalClient` to
    the server the run started or joined (build it once: ``RetrievalClient(url, cfg.env.timeout_s)``),
    or any object with ``search(queries, topk)`` such as an in-process
    :class:`~skyrl_mtp.envs.retrieval.BM25Index`. None: a client to ``env.retrieval_url`` with
    ``env.timeout_s`` (an error if that is null).
    """
    if resources is None:
        if not config.retrieval_url:
            raise ValueError("env.name=search needs a retriever: env.retrieval_url is null and no retrieval "
                             "client was passed. Start a server (skyrl_mtp.envs.retrieval.start_retrieval_server "
                             "or `python -m skyrl_mtp.envs.retrieval --corpus FILE --port N`) and pass "
                             "RetrievalClient(server.url, env.timeout_s), or set env.retrieval_url=http://HOST:PORT")
        resources = RetrievalClient(config.retrieval_url, config.timeout_s)
    return SearchEnv(resources, topk=config.topk, partial_credit=config.answer_reward == "partial")
