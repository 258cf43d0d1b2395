"""``python -m skyrl_mtp.envs.retrieval --corpus FILE [--host 127.0.0.1] [--port 8000]
[--max-concurrency 64]``: a retrieval server on its own, for runs that join it by
``env.retrieval_url=http://HOST:PORT``. Prints one line with the URL once it listens
(``--port 0`` picks a free port); stops on Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import signal
import sys
import time

from skyrl_mtp.envs.retrieval.index import BM25Index, load_corpus
from skyrl_mtp.envs.retrieval.server import start_retrieval_server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skyrl_mtp.envs.retrieval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", required=True, help='JSONL file, one {"id", "contents"} document per line')
    parser.add_argument("--host", default="127.0.0.1",
                        help="bind address (default 127.0.0.1; the server has no authentication)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: a free one; default 8000)")
    parser.add_argument("--max-concurrency", type=int, default=64,
                        help="requests served at once; the rest queue (default 64)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    try:
        index = BM25Index(load_corpus(args.corpus))
        server = start_retrieval_server(index, host=args.host, port=args.port,
                                        max_concurrency=args.max_concurrency, background=False)
    except (OSError, ValueError) as err:
        print(f"retrieval server: {err}", file=sys.stderr)
        return 2

    def _stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    print(f"retrieval server listening on {server.url} ({server.num_docs} documents, "
          f"max_concurrency {args.max_concurrency}, ready in {time.perf_counter() - started:.1f} s)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
