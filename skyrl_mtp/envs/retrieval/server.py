"""The retrieval HTTP server: Search-R1's request/response shape over a BM25 index.

Endpoints (JSON in and out):

* ``POST /retrieve`` with ``{"queries": [str, ...], "topk": int (default 3), "return_scores": bool
  (default false)}`` -> ``{"result": [per query: [{"document": {"id", "contents"}, "score": float},
  ...]]}`` with ``return_scores`` true, or ``[{"id", "contents"}, ...]`` per query with it false
  (Search-R1 answers the same way). Results follow :class:`~.index.BM25Index` (only documents that
  share a token with the query, at most topk, best first). A bad request gets HTTP 400
  ``{"error": "..."}`` naming what is wrong.
* ``GET /health`` -> ``{"status": "ok", "num_docs", "max_concurrency", "served", "peak_in_flight"}``.

Concurrency is bounded: ``max_concurrency`` worker threads serve requests (one request per
connection, HTTP/1.0); connections beyond that **queue** (FIFO, listen backlog 1024) until a
worker is free, they are not refused. A client bounds its own wait with its timeout
(:class:`~.client.RetrievalClient` uses ``env.timeout_s``). A worker waits at most
``read_timeout_s`` for a slow client's request.

The server binds to loopback (127.0.0.1) unless told otherwise: it has no authentication.
"""

from __future__ import annotations

import json
import logging
import os
import socketserver
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Protocol

from skyrl_mtp.envs.retrieval.index import BM25Index, load_corpus

log = logging.getLogger(__name__)

DEFAULT_TOPK = 3  # a request without "topk"
MAX_QUERIES_PER_REQUEST = 4096
MAX_BODY_BYTES = 8 << 20


class Retriever(Protocol):
    def search(self, queries: Sequence[str], topk: int) -> list[list[dict]]: ...
    def __len__(self) -> int: ...


class _BadRequest(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    server: "_PooledHTTPServer"
    protocol_version = "HTTP/1.0"  # one request per connection: an idle keep-alive never holds a worker

    def setup(self) -> None:
        self.timeout = self.server.read_timeout_s  # socket timeout while reading the request
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.rstrip("/") != "/health":
            self._reply(404, {"error": f"no such endpoint GET {self.path}; use POST /retrieve or GET /health"})
            return
        self._reply(200, {"status": "ok", **self.server.stats()})

    def do_POST(self) -> None:  # noqa: N802
        if self.path.rstrip("/") != "/retrieve":
            self._reply(404, {"error": f"no such endpoint POST {self.path}; use POST /retrieve"})
            return
        try:
            queries, topk, return_scores = self._parse_request()
        except _BadRequest as err:
            self._reply(400, {"error": str(err)})
            return
        with self.server.track():
            try:
                result = self.server.retriever.search(queries, topk)
            except Exception as err:  # a retriever bug must not kill the worker; the client sees 500
                log.exception("retrieval failed")
                self._reply(500, {"error": f"retrieval failed: {type(err).__name__}: {err}"})
                return
        if not return_scores:
            result = [[item["document"] for item in items] for items in result]
        self._reply(200, {"result": result})

    def _parse_request(self) -> tuple[list[str], int, bool]:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise _BadRequest("missing or invalid Content-Length header") from None
        if not 0 < length <= MAX_BODY_BYTES:
            raise _BadRequest(f"request body must be 1..{MAX_BODY_BYTES} bytes, got {length}")
        try:
            body = json.loads(self.rfile.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise _BadRequest(f"request body is not JSON ({err})") from None
        if not isinstance(body, dict):
            raise _BadRequest('request body must be an object {"queries": [...], "topk": k, "return_scores": bool}')
        queries = body.get("queries")
        if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
            raise _BadRequest(f'"queries" must be a list of strings, got {queries!r:.200}')
        if len(queries) > MAX_QUERIES_PER_REQUEST:
            raise _BadRequest(f'at most {MAX_QUERIES_PER_REQUEST} queries per request, got {len(queries)}')
        topk = body.get("topk", DEFAULT_TOPK)
        if topk is None:
            topk = DEFAULT_TOPK
        if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
            raise _BadRequest(f'"topk" must be an integer >= 1, got {topk!r}')
        return_scores = body.get("return_scores", False)
        if not isinstance(return_scores, bool):
            raise _BadRequest(f'"return_scores" must be true or false, got {return_scores!r}')
        return queries, topk, return_scores

    def _reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _PooledHTTPServer(socketserver.TCPServer):
    """A TCP server whose connections are served by a fixed pool of threads (queued beyond it)."""

    allow_reuse_address = True
    request_queue_size = 1024  # listen backlog: bursts of connections wait here, not refused

    def __init__(self, address: tuple[str, int], retriever: Retriever, max_concurrency: int,
                 read_timeout_s: float) -> None:
        self.retriever = retriever
        self.max_concurrency = max_concurrency
        self.read_timeout_s = read_timeout_s
        self._lock = threading.Lock()
        self._in_flight = 0
        self._peak = 0
        self._served = 0
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="retrieval")
        super().__init__(address, _Handler)

    def process_request(self, request, client_address) -> None:  # called by serve_forever's thread
        self._pool.submit(self._serve, request, client_address)

    def _serve(self, request, client_address) -> None:
        try:
            self.finish_request(request, client_address)
        except (ConnectionError, TimeoutError) as err:  # the client gave up (e.g. its timeout) or stalled
            log.debug("retrieval server: %s while serving %s", type(err).__name__, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        log.warning("retrieval server: error while serving %s", client_address, exc_info=True)

    def track(self):
        server = self

        class _Track:
            def __enter__(self):
                with server._lock:
                    server._in_flight += 1
                    server._peak = max(server._peak, server._in_flight)

            def __exit__(self, *exc):
                with server._lock:
                    server._in_flight -= 1
                    server._served += 1

        return _Track()

    def stats(self) -> dict:
        with self._lock:
            return {"num_docs": len(self.retriever), "max_concurrency": self.max_concurrency,
                    "served": self._served, "peak_in_flight": self._peak}

    def server_close(self) -> None:
        super().server_close()
        self._pool.shutdown(wait=False, cancel_futures=True)


class RetrievalServer:
    """A running retrieval server (see :func:`start_retrieval_server`). ``url`` is its base URL
    (``http://host:port``; requests go to ``url + "/retrieve"``). Use as a context manager or
    call :meth:`close`."""

    def __init__(self, httpd: _PooledHTTPServer, thread: threading.Thread | None) -> None:
        self._httpd = httpd
        self._thread = thread  # the daemon thread serving (background), else None
        self._serving_in: threading.Thread | None = thread
        host, port = httpd.server_address[:2]
        self.host, self.port = host, port
        self.url = f"http://{host}:{port}"
        self.num_docs = len(httpd.retriever)
        self._closed = False

    def stats(self) -> dict:
        """``{"num_docs", "max_concurrency", "served", "peak_in_flight"}``: requests answered and the
        most retrievals that ever ran at once."""
        return self._httpd.stats()

    def serve_forever(self) -> None:
        """Serves in the calling thread until :meth:`close` is called from another thread, or until
        KeyboardInterrupt (the CLI)."""
        if self._thread is not None:
            raise RuntimeError("this server already serves from a background thread")
        self._serving_in = threading.current_thread()
        try:
            self._httpd.serve_forever(poll_interval=0.2)
        finally:
            self._serving_in = None

    def close(self) -> None:
        """Stops accepting and closes the socket; requests being served are not waited for.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        serving = self._serving_in
        if serving is not None and serving is not threading.current_thread():
            self._httpd.shutdown()  # waits for the serve loop to exit
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "RetrievalServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start_retrieval_server(
    corpus: Sequence[dict] | str | os.PathLike | Retriever,
    host: str = "127.0.0.1",
    port: int = 0,
    max_concurrency: int = 64,
    *,
    read_timeout_s: float = 10.0,
    background: bool = True,
) -> RetrievalServer:
    """Builds the BM25 index and starts serving it over HTTP.

    `corpus`: a list of ``{"id", "contents"}`` documents, a JSONL corpus file, or a ready index
    (:class:`~.index.BM25Index` or any object with ``search(queries, topk)`` and ``len()``).
    `port` 0 picks a free port (read it from the handle's ``url``). `max_concurrency`: requests
    served at once, the rest queue (``env.max_concurrency``). With ``background`` (default) it
    serves from a daemon thread of this process and returns at once; otherwise the caller runs
    :meth:`RetrievalServer.serve_forever`.
    """
    if not isinstance(max_concurrency, int) or isinstance(max_concurrency, bool) or max_concurrency < 1:
        raise ValueError(f"max_concurrency must be an integer >= 1 (env.max_concurrency), got {max_concurrency!r}")
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"port must be in 0..65535 (0: a free port), got {port!r}")
    if read_timeout_s <= 0:
        raise ValueError(f"read_timeout_s must be > 0, got {read_timeout_s!r}")
    if isinstance(corpus, (str, os.PathLike)):
        retriever: Retriever = BM25Index(load_corpus(Path(corpus)))
    elif hasattr(corpus, "search") and hasattr(corpus, "__len__"):
        retriever = corpus  # type: ignore[assignment]
    else:
        retriever = BM25Index(corpus)  # type: ignore[arg-type]
    try:
        httpd = _PooledHTTPServer((host, int(port)), retriever, max_concurrency, read_timeout_s)
    except OSError as err:
        raise OSError(f"cannot start the retrieval server on {host}:{port}: {err.strerror or err}; "
                      "pick another port (0: any free one) or host") from err
    if not background:
        return RetrievalServer(httpd, None)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2},
                              name=f"retrieval-server-{httpd.server_address[1]}", daemon=True)
    thread.start()
    return RetrievalServer(httpd, thread)
