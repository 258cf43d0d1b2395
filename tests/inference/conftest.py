"""Fixtures shared by this folder's test modules, and makes its helper module (``sync_helpers``)
importable by them.

- ``ray_local``: a local Ray instance (2 CPUs, never a cluster someone else runs), started once per
  test module and shut down after it; yields the ``ray`` module.
"""

from __future__ import annotations

import os
import sys

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    os.environ.pop("RAY_ADDRESS", None)  # never attach to a cluster someone else runs
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=256 << 20)
    yield ray
    ray.shutdown()
