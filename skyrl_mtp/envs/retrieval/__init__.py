"""Local retrieval for the search environment: a BM25 index (bm25s), an HTTP server with
Search-R1's request/response shape, and its client.

* :class:`BM25Index` - the index, usable in-process (``search(queries, topk)``);
* :func:`start_retrieval_server` - serves an index on loopback from a thread of this process;
  ``python -m skyrl_mtp.envs.retrieval --corpus FILE --port N`` runs one on its own;
* :class:`RetrievalClient` - the client the search environment uses (``env.retrieval_url``,
  ``env.timeout_s``), raising :class:`RetrievalError` subclasses on timeout, server down or a bad
  answer.

Dense retrieval (e5 + FAISS) is not implemented: BM25 is what the CPU task needs; a dense
retriever would plug in as another object with ``search(queries, topk)`` and ``len()``.
"""

from skyrl_mtp.envs.retrieval.client import (
    RetrievalBadResponse,
    RetrievalClient,
    RetrievalError,
    RetrievalTimeout,
    RetrievalUnavailable,
)
from skyrl_mtp.envs.retrieval.index import BM25Index, load_corpus, tokenize, write_corpus
from skyrl_mtp.envs.retrieval.server import RetrievalServer, start_retrieval_server

__all__ = [
    "BM25Index",
    "RetrievalBadResponse",
    "RetrievalClient",
    "RetrievalError",
    "RetrievalServer",
    "RetrievalTimeout",
    "RetrievalUnavailable",
    "load_corpus",
    "start_retrieval_server",
    "tokenize",
    "write_corpus",
]
