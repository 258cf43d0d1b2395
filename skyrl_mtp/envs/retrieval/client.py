"""The retrieval client: one blocking HTTP request per call, never longer than its timeout.

:class:`RetrievalClient` holds no connection (one per request), so one client is shared by every
environment and thread of a run. Failures raise a :class:`RetrievalError` subclass:

* :class:`RetrievalTimeout` - no complete answer within ``timeout_s`` (connect, send and read
  together; a watchdog closes the socket at the deadline, so a server that accepts and never
  answers, or trickles bytes, costs at most ``timeout_s``);
* :class:`RetrievalUnavailable` - connection refused / reset / closed early (server down);
* :class:`RetrievalBadResponse` - an HTTP error status, or a body that is not the expected JSON.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Sequence
from urllib.parse import urlsplit


class RetrievalError(RuntimeError):
    """A retrieval request failed (a tool error: the environment reports it and goes on)."""

    kind = "error"


class RetrievalTimeout(RetrievalError):
    kind = "timeout"


class RetrievalUnavailable(RetrievalError):
    kind = "unavailable"


class RetrievalBadResponse(RetrievalError):
    kind = "bad_response"


class RetrievalClient:
    """Client of the retrieval server at `url` (``http://host:port``, with or without ``/retrieve``)."""

    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        if not isinstance(url, str) or not url:
            raise ValueError(f"retrieval url must be a string like http://127.0.0.1:8000, got {url!r} "
                             "(env.retrieval_url)")
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"retrieval url {url!r} must look like http://HOST:PORT (env.retrieval_url); "
                             "https is not supported")
        try:
            port = parts.port or 80
        except ValueError:
            raise ValueError(f"retrieval url {url!r} has an invalid port (env.retrieval_url)") from None
        if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or timeout_s <= 0:
            raise ValueError(f"timeout_s must be a number > 0 (env.timeout_s), got {timeout_s!r}")
        self.host, self.port = parts.hostname, port
        self.base_url = f"http://{parts.netloc}"
        self.url = self.base_url + "/retrieve"
        self.timeout_s = float(timeout_s)

    def __repr__(self) -> str:
        return f"RetrievalClient({self.base_url!r}, timeout_s={self.timeout_s})"

    def search(self, queries: Sequence[str], topk: int) -> list[list[dict]]:
        """Per query, up to `topk` items ``{"document": {"id", "contents"}, "score": float}``, best first."""
        if isinstance(queries, str):
            raise TypeError("queries must be a list of strings, got one string; wrap it: [query]")
        queries = list(queries)
        if not all(isinstance(q, str) for q in queries):
            raise TypeError(f"queries must be strings, got {queries!r:.200}")
        if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
            raise ValueError(f"topk must be an integer >= 1 (env.topk), got {topk!r}")
        if not queries:
            return []
        body = self._request("POST", "/retrieve", {"queries": queries, "topk": topk, "return_scores": True})
        result = body.get("result") if isinstance(body, dict) else None
        if not isinstance(result, list) or len(result) != len(queries):
            raise RetrievalBadResponse(f"{self.url}: expected {{\"result\": [one list per query]}} for "
                                       f"{len(queries)} queries, got {str(body)[:200]}")
        for items in result:
            if not isinstance(items, list) or len(items) > topk or not all(_is_item(it) for it in items):
                raise RetrievalBadResponse(f"{self.url}: expected up to {topk} items "
                                           f"{{\"document\": {{\"id\", \"contents\"}}, \"score\"}} per query, "
                                           f"got {str(items)[:200]}")
        return result

    def health(self) -> dict:
        """The server's ``GET /health`` answer (``status``, ``num_docs``, ...); raises like :meth:`search`."""
        body = self._request("GET", "/health", None)
        if not isinstance(body, dict) or body.get("status") != "ok":
            raise RetrievalBadResponse(f"{self.base_url}/health: unexpected answer {str(body)[:200]}")
        return body

    def _request(self, method: str, path: str, payload: dict | None) -> object:
        where = f"{method} {self.base_url}{path}"
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        expired = threading.Event()
        opened: list[socket.socket] = []  # conn.sock goes None once a closing response is read

        def _expire() -> None:  # unblocks a read stuck on a server that never finishes answering
            expired.set()
            sock = opened[0] if opened else conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        watchdog = threading.Timer(self.timeout_s, _expire)
        watchdog.daemon = True
        watchdog.start()
        try:
            data = None if payload is None else json.dumps(payload).encode()
            headers = {"Content-Type": "application/json"} if data is not None else {}
            conn.connect()
            opened.append(conn.sock)
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            status = resp.status
        except (socket.timeout, TimeoutError):
            raise RetrievalTimeout(f"{where}: no answer within {self.timeout_s:g} s (env.timeout_s)") from None
        except ConnectionRefusedError:
            raise RetrievalUnavailable(
                f"{where}: connection refused - is the retrieval server running? Start one with "
                "`python -m skyrl_mtp.envs.retrieval --corpus FILE --port N`, or leave env.retrieval_url "
                "null so the run starts its own") from None
        except (OSError, http.client.HTTPException) as err:
            if expired.is_set():
                raise RetrievalTimeout(f"{where}: no complete answer within {self.timeout_s:g} s "
                                       "(env.timeout_s)") from None
            raise RetrievalUnavailable(f"{where}: {type(err).__name__}: {err}") from None
        finally:
            watchdog.cancel()
            conn.close()
        if expired.is_set():  # the read ended because the watchdog shut the socket
            raise RetrievalTimeout(f"{where}: no complete answer within {self.timeout_s:g} s (env.timeout_s)")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        if status != 200:
            detail = body.get("error") if isinstance(body, dict) else raw[:200].decode("utf-8", "replace")
            raise RetrievalBadResponse(f"{where}: HTTP {status}: {detail}")
        if body is None:
            raise RetrievalBadResponse(f"{where}: the answer is not JSON: {raw[:200]!r}")
        return body


def _is_item(item: object) -> bool:
    if not isinstance(item, dict) or not isinstance(item.get("document"), dict):
        return False
    doc, score = item["document"], item.get("score")
    return (isinstance(doc.get("id"), str) and isinstance(doc.get("contents"), str)
            and isinstance(score, (int, float)) and not isinstance(score, bool))
