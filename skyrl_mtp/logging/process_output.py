"""Where the Ray actors' own output goes: the run's log files rather than the console.

vLLM, Megatron and Ray print a great deal from inside the actors (start-up banners, warnings,
e.g. vLLM's per-sync "RotaryEmbedding: Failed to load weights"). The driver sets
``SKYRL_MTP_ACTOR_LOG_DIR`` for every actor; each actor then points its stdout and stderr (the file
descriptors, so output of C/C++ code and child processes follows) at ``<dir>/<name>.log`` before
it imports vLLM or Megatron. Errors still reach the driver: a failed actor call raises there with
its traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ACTOR_LOG_DIR_ENV = "SKYRL_MTP_ACTOR_LOG_DIR"


def redirect_to_run_log(name: str) -> Path | None:
    """Called first thing in an actor: appends this process's output to ``<dir>/<name>.log`` when
    the driver set the directory; returns the file, or None (output stays where it was)."""
    directory = os.environ.get(ACTOR_LOG_DIR_ENV)
    if not directory:
        return None
    path = Path(directory) / f"{name}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return path
