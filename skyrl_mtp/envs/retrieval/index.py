"""The corpus and its BM25 index (the `bm25s` library), usable in-process or behind the server.

A corpus is a list of documents ``{"id": str, "contents": str}`` (Search-R1's corpus format: a
JSONL file, one document per line; other keys are kept and ignored).

Retrieval semantics (:meth:`BM25Index.search`):

* text is split into lower-cased word tokens (``\\w+``), for documents and queries alike; no
  stemming and no stop words, so a made-up name is a token like any other;
* scores are bm25s's BM25 (Lucene variant, k1=1.5, b=0.75); a word repeated in the query counts
  each time, as in Lucene;
* like Lucene/Pyserini BM25, only documents that share at least one token with the query are
  results: a query matching nothing returns an empty list, and at most `topk` documents come back;
* ranking is by score, ties broken by the document's position in the corpus, so results are a
  function of (corpus, query, topk) alone.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from skyrl_mtp.data.datasets import iter_jsonl

_WORD = re.compile(r"\w+")


def tokenize(text: str) -> list[str]:
    """The retrieval tokens of `text`: lower-cased runs of word characters."""
    return _WORD.findall(text.lower())


def load_corpus(path: str | Path) -> list[dict]:
    """The documents of a JSONL corpus file (one ``{"id", "contents"}`` object per line).

    ValueError naming the line for invalid JSON, a missing/non-string field or a duplicate id."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus file not found: {path} (a JSONL file of {{\"id\", \"contents\"}} lines)")
    docs = [_check_doc(row, where) for where, row in iter_jsonl(path)]
    if not docs:
        raise ValueError(f"corpus {path} has no documents")
    _check_unique_ids(docs, str(path))
    return docs


def write_corpus(docs: Sequence[dict], path: str | Path) -> Path:
    """Writes `docs` as a JSONL corpus file (the format :func:`load_corpus` and the CLI read)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"id": doc["id"], "contents": doc["contents"]}, ensure_ascii=False) + "\n")
    return path


class BM25Index:
    """BM25 over `docs` (``{"id", "contents"}`` dicts). Thread-safe for :meth:`search` (read-only)."""

    def __init__(self, docs: Sequence[dict]) -> None:
        import bm25s  # imported here: it pulls numba in (~1 s), which users of the client never need

        if not docs:
            raise ValueError("BM25Index needs at least one document; the corpus is empty")
        self.docs = [_check_doc(d, f"document {i}") for i, d in enumerate(docs)]
        _check_unique_ids(self.docs, "the corpus")
        tokens = [tokenize(d["contents"]) for d in self.docs]
        # backend="numpy": no numba compilation at start-up; scoring a query is a sparse column sum.
        self._bm25 = bm25s.BM25(backend="numpy")
        self._bm25.index(tokens, show_progress=False)
        self._vocab = self._bm25.vocab_dict

    def __len__(self) -> int:
        return len(self.docs)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for `query` (zeros when no token of it is in the corpus)."""
        known = [t for t in tokenize(query) if t in self._vocab and t != ""]
        if not known:
            return np.zeros(len(self.docs), dtype=np.float32)
        return np.asarray(self._bm25.get_scores(known))

    def search(self, queries: Sequence[str], topk: int) -> list[list[dict]]:
        """Per query, up to `topk` results ``{"document": {"id", "contents"}, "score": float}``,
        best first (the same items the server returns and :class:`RetrievalClient` gives back)."""
        if isinstance(queries, str):
            raise TypeError("queries must be a list of strings, got one string; wrap it: [query]")
        if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
            raise ValueError(f"topk must be an integer >= 1, got {topk!r}")
        out = []
        for query in queries:
            if not isinstance(query, str):
                raise TypeError(f"each query must be a string, got {type(query).__name__}: {query!r:.100}")
            scores = self.scores(query)
            out.append([{"document": {"id": self.docs[i]["id"], "contents": self.docs[i]["contents"]},
                         "score": float(scores[i])} for i in _top(scores, topk)])
        return out


def _top(scores: np.ndarray, k: int) -> list[int]:
    """Indices of the (at most) k best positive scores, by score then by index."""
    positive = np.flatnonzero(scores > 0)
    if positive.size > k:  # keep everything tied with the k-th score, so ties break by index below
        kth = np.partition(scores[positive], positive.size - k)[positive.size - k]
        positive = positive[scores[positive] >= kth]
    order = np.lexsort((positive, -scores[positive]))
    return positive[order][:k].tolist()


def _check_doc(row: object, where: str) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a document must be an object {{\"id\", \"contents\"}}, got {type(row).__name__}")
    for key in ("id", "contents"):
        if not isinstance(row.get(key), str):
            raise ValueError(f"{where}: field {key!r} must be a string, got {row.get(key)!r:.100} "
                             f"(keys present: {sorted(row)})")
    return row


def _check_unique_ids(docs: Sequence[dict], where: str) -> None:
    seen: set[str] = set()
    for doc in docs:
        if doc["id"] in seen:
            raise ValueError(f"{where}: duplicate document id {doc['id']!r}; ids must be unique")
        seen.add(doc["id"])
