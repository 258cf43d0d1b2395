"""The retrieval stack with the real server over loopback: BM25 against a hand-written reference,
Search-R1's request/response shape, 200 concurrent queries, bounded concurrency (queueing), the
client's errors (server down, hung server, bad answers) and the CLI."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from skyrl_mtp.envs.retrieval import (
    BM25Index,
    RetrievalBadResponse,
    RetrievalClient,
    RetrievalError,
    RetrievalTimeout,
    RetrievalUnavailable,
    load_corpus,
    start_retrieval_server,
    write_corpus,
)

REPO = Path(__file__).resolve().parents[2]
DOCS = [
    {"id": "a", "contents": "the quick brown fox jumps over the lazy dog"},
    {"id": "b", "contents": "a brown dog sleeps"},
    {"id": "c", "contents": "Fox news: the fox, the FOX and the hound"},
    {"id": "d", "contents": "nothing in common here"},
    {"id": "e", "contents": "a brown dog sleeps"},  # same text as b: ties break by corpus order
]


def reference_bm25(docs, query, k1=1.5, b=0.75):
    """Lucene's BM25 (idf = ln(1 + (N - df + 0.5) / (df + 0.5)), tf part tf / (tf + k1 (1 - b + b dl/avgdl))),
    written out from the formula, over lower-cased word tokens."""
    import re

    toks = [re.findall(r"\w+", d["contents"].lower()) for d in docs]
    n, avgdl = len(toks), sum(map(len, toks)) / len(toks)
    out = []
    for t in toks:
        tf, s = Counter(t), 0.0
        for term in re.findall(r"\w+", query.lower()):  # a repeated query word counts each time
            df = sum(term in set(x) for x in toks)
            if df == 0 or tf[term] == 0:
                continue
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            s += idf * tf[term] / (tf[term] + k1 * (1 - b + b * len(t) / avgdl))
        out.append(s)
    return out


@pytest.fixture(scope="module")
def server(task):
    """The conftest's server, taking 64 requests at once (the concurrency test sends 200)."""
    with start_retrieval_server(task.corpus(), max_concurrency=64) as srv:
        yield srv


def _post(url, payload, timeout=5.0):
    req = urllib.request.Request(url + "/retrieve", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ---------------------------------------------------------------------------------------------
# The index
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("query", ["fox", "brown dog", "the lazy fox", "HOUND!", "dog dog sleeps"])
def test_bm25_scores_match_the_formula(query):
    index = BM25Index(DOCS)
    assert index.scores(query) == pytest.approx(reference_bm25(DOCS, query), rel=1e-5)


def test_bm25_ranking_ties_topk_and_no_match():
    index = BM25Index(DOCS)
    [fox] = index.search(["fox"], topk=3)
    assert [it["document"]["id"] for it in fox] == ["c", "a"]  # only documents with a query word
    assert fox[0]["score"] > fox[1]["score"] > 0
    assert fox[0]["document"] == {"id": "c", "contents": DOCS[2]["contents"]}
    [dog] = index.search(["sleeps"], topk=5)
    assert [it["document"]["id"] for it in dog] == ["b", "e"]  # equal scores: corpus order
    [dog1] = index.search(["sleeps"], topk=1)
    assert [it["document"]["id"] for it in dog1] == ["b"]
    assert index.search(["zebra", "", "!!"], topk=3) == [[], [], []]
    assert index.search([], topk=3) == []
    with pytest.raises(ValueError, match="topk must be an integer >= 1"):
        index.search(["fox"], topk=0)
    with pytest.raises(TypeError, match="wrap it"):
        index.search("fox", topk=1)


def test_corpus_validation_and_file_round_trip(tmp_path):
    path = write_corpus(DOCS, tmp_path / "c.jsonl")
    assert load_corpus(path) == DOCS
    with pytest.raises(ValueError, match="duplicate document id 'a'"):
        BM25Index(DOCS + [{"id": "a", "contents": "x"}])
    with pytest.raises(ValueError, match=r"document 1: field 'contents' must be a string.*keys present: \['id', 'text'\]"):
        BM25Index([DOCS[0], {"id": "z", "text": "x"}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "contents": "x"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        load_corpus(bad)
    with pytest.raises(FileNotFoundError, match="corpus file not found"):
        load_corpus(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="needs at least one document"):
        BM25Index([])


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------


def test_server_request_response_shape(server, task):
    name, code = task.facts()[5]
    status, body = _post(server.url, {"queries": [name, "zebra"], "topk": 3, "return_scores": True})
    assert status == 200
    assert body["result"][1] == []
    [top] = body["result"][0]
    assert top["document"] == {"id": f"code-{name}", "contents": f"the code of {name} is {code}"}
    assert top["score"] > 0
    # return_scores false: the documents themselves (Search-R1 answers the same way); topk defaults to 3
    status, body = _post(server.url, {"queries": [f"code of {name}"]})
    assert status == 200 and len(body["result"][0]) == 3
    assert body["result"][0][0] == {"id": f"code-{name}", "contents": f"the code of {name} is {code}"}
    assert server.url.startswith("http://127.0.0.1:")
    health = RetrievalClient(server.url, 2.0).health()
    assert health["status"] == "ok" and health["num_docs"] == task.num_names


@pytest.mark.parametrize("payload, message", [
    ({"topk": 3}, '"queries" must be a list of strings'),
    ({"queries": "abc"}, '"queries" must be a list of strings'),
    ({"queries": ["a"], "topk": 0}, '"topk" must be an integer >= 1'),
    ({"queries": ["a"], "topk": "3"}, '"topk" must be an integer >= 1'),
    ({"queries": ["a"], "return_scores": "yes"}, '"return_scores" must be true or false'),
    ([1, 2], "request body must be an object"),
])
def test_server_rejects_bad_requests_with_400(server, payload, message):
    status, body = _post(server.url, payload)
    assert status == 400 and message in body["error"]


def test_server_unknown_endpoint_and_non_json(server):
    req = urllib.request.Request(server.url + "/search", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=5)
    assert err.value.code == 404
    req = urllib.request.Request(server.url + "/retrieve", data=b"not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=5)
    assert err.value.code == 400 and "not JSON" in json.loads(err.value.read())["error"]


def test_200_concurrent_queries_all_answered_correctly(server, task):
    """200 threads, one query each, released together against the server (max_concurrency 64)."""
    facts = task.facts()[:200]
    client = RetrievalClient(server.url, timeout_s=30.0)
    results: dict[int, object] = {}
    barrier = threading.Barrier(len(facts))

    def worker(i: int, name: str) -> None:
        barrier.wait()
        try:
            results[i] = client.search([name], topk=3)
        except Exception as err:  # noqa: BLE001 - recorded and asserted on below
            results[i] = err

    threads = [threading.Thread(target=worker, args=(i, name)) for i, (name, _) in enumerate(facts)]
    before = server.stats()["served"]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    elapsed = time.perf_counter() - start
    errors = {i: r for i, r in results.items() if isinstance(r, Exception)}
    assert not errors, f"{len(errors)} of 200 failed, e.g. {next(iter(errors.values()))!r}"
    assert len(results) == 200
    for i, (name, code) in enumerate(facts):
        [items] = results[i]
        assert items[0]["document"]["contents"] == f"the code of {name} is {code}", name
    stats = server.stats()
    assert stats["served"] - before == 200
    assert stats["peak_in_flight"] <= 64
    print(f"\n200 concurrent queries: all correct in {elapsed:.2f} s, peak in flight {stats['peak_in_flight']}")


class SlowIndex(BM25Index):
    """A real BM25 index whose every search takes at least `delay` seconds (to make queueing visible)."""

    delay = 0.1

    def search(self, queries, topk):
        time.sleep(self.delay)
        return super().search(queries, topk)


def test_concurrency_is_bounded_and_excess_requests_queue():
    index = SlowIndex(DOCS)
    n, bound = 32, 4
    with start_retrieval_server(index, max_concurrency=bound) as srv:
        client = RetrievalClient(srv.url, timeout_s=30.0)
        out: list = [None] * n
        threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, client.search(["fox"], 1)))
                   for i in range(n)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        elapsed = time.perf_counter() - start
        stats = srv.stats()
    assert all(r is not None and r[0][0]["document"]["id"] == "c" for r in out)  # all served, none refused
    assert stats["served"] == n
    assert stats["peak_in_flight"] == bound  # never more than the bound, and the bound was reached
    assert elapsed >= n / bound * SlowIndex.delay * 0.95  # they waited their turn


def test_server_from_corpus_file_and_port_in_use(tmp_path):
    path = write_corpus(DOCS, tmp_path / "c.jsonl")
    with start_retrieval_server(str(path)) as srv:
        assert RetrievalClient(srv.url, 5.0).search(["hound"], 2)[0][0]["document"]["id"] == "c"
        with pytest.raises(OSError, match=f"cannot start the retrieval server on 127.0.0.1:{srv.port}"):
            start_retrieval_server(DOCS, port=srv.port)
    with pytest.raises(ValueError, match="max_concurrency must be an integer >= 1"):
        start_retrieval_server(DOCS, max_concurrency=0)


def test_cli_serves_a_corpus_file(tmp_path):
    path = write_corpus(DOCS, tmp_path / "c.jsonl")
    proc = subprocess.Popen([sys.executable, "-m", "skyrl_mtp.envs.retrieval", "--corpus", str(path), "--port", "0"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "retrieval server listening on http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() else "")
        url = line.split(" on ")[1].split()[0]
        assert RetrievalClient(url, 5.0).search(["lazy"], 3)[0][0]["document"]["id"] == "a"
    finally:
        proc.terminate()
        rc = proc.wait(10)
    assert rc == 0
    bad = subprocess.run([sys.executable, "-m", "skyrl_mtp.envs.retrieval", "--corpus", str(tmp_path / "no.jsonl")],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "corpus file not found" in bad.stderr


# ---------------------------------------------------------------------------------------------
# The client's errors
# ---------------------------------------------------------------------------------------------


def test_client_server_down_is_unavailable():
    client = RetrievalClient(f"http://127.0.0.1:{_closed_port()}", timeout_s=2.0)
    start = time.perf_counter()
    with pytest.raises(RetrievalUnavailable, match="connection refused"):
        client.search(["x"], 1)
    assert time.perf_counter() - start < 1.0


@pytest.fixture
def hung_server():
    """Accepts connections (the kernel's backlog) and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    yield f"http://127.0.0.1:{s.getsockname()[1]}"
    s.close()


def test_client_hung_server_times_out_within_timeout(hung_server):
    client = RetrievalClient(hung_server, timeout_s=1.0)
    start = time.perf_counter()
    with pytest.raises(RetrievalTimeout, match=r"no .*answer within 1 s"):
        client.search(["x"], 1)
    elapsed = time.perf_counter() - start
    assert 0.95 <= elapsed < 1.0 + 0.5


class _BadHandler(BaseHTTPRequestHandler):
    mode = "not_json"

    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.mode == "trickle":  # headers, then one byte of body every 0.1 s: never done in time
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass
            return
        body = {"not_json": b"<html>oops</html>", "http_500": b'{"error": "disk on fire"}',
                "wrong_shape": b'{"result": [[{"id": "a"}]]}', "wrong_count": b'{"result": []}'}[self.mode]
        self.send_response(500 if self.mode == "http_500" else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.mark.parametrize("mode, error, message", [
    ("not_json", RetrievalBadResponse, "the answer is not JSON"),
    ("http_500", RetrievalBadResponse, "HTTP 500: disk on fire"),
    ("wrong_shape", RetrievalBadResponse, "expected up to 1 items"),
    ("wrong_count", RetrievalBadResponse, "one list per query"),
    ("trickle", RetrievalTimeout, "within 1 s"),  # bytes keep coming: only the total deadline stops it
])
def test_client_bad_answers(mode, error, message):
    """A deliberately broken HTTP server (not the retrieval server) to reach the client's checks."""
    handler = type("H", (_BadHandler,), {"mode": mode})
    httpd = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        client = RetrievalClient(f"http://127.0.0.1:{httpd.server_address[1]}", timeout_s=1.0)
        start = time.perf_counter()
        with pytest.raises(error, match=message) as err:
            client.search(["q"], 1)
        assert isinstance(err.value, RetrievalError)
        assert time.perf_counter() - start < 1.0 + 0.5
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("url, timeout, message", [
    ("127.0.0.1:8000", 1.0, "must look like http://HOST:PORT"),
    ("https://127.0.0.1:8000", 1.0, "must look like http://HOST:PORT"),
    ("http://127.0.0.1:99999", 1.0, "invalid port"),
    ("http://127.0.0.1:8000", 0, "timeout_s must be a number > 0"),
    (None, 1.0, "retrieval url must be a string"),
])
def test_client_rejects_bad_settings(url, timeout, message):
    with pytest.raises(ValueError, match=message):
        RetrievalClient(url, timeout)


def test_client_accepts_the_retrieve_path(server):
    client = RetrievalClient(server.url + "/retrieve", 2.0)
    assert client.url == server.url + "/retrieve"
    assert client.search([], 3) == []
