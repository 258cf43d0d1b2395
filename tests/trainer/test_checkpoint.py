"""Checkpoint directories: atomic, keep-last-N, latest pointer, clear errors."""

from __future__ import annotations

import json

import pytest

from skyrl_mtp.trainer.checkpoint import CheckpointManager, check_compatible


def _write(d):
    (d / "model_tp0.pt").write_bytes(b"x")


def test_keep_last_n_and_latest(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last_n=2)
    for step in (1, 2, 3):
        mgr.save(step, _write, {"data": {"position": step}})
    assert mgr.complete_steps() == [2, 3]
    assert mgr.latest().name == "step_000003"
    assert CheckpointManager.read_state(mgr.latest())["data"] == {"position": 3}


def test_interrupted_save_leaves_latest_loadable(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last_n=2)
    mgr.save(1, _write, {})

    def crash(d):
        _write(d)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        mgr.save(2, crash, {})
    assert mgr.latest().name == "step_000001"
    assert (tmp_path / "checkpoints" / "step_000002.tmp").exists()  # ignored ...
    mgr.save(3, _write, {})
    assert not (tmp_path / "checkpoints" / "step_000002.tmp").exists()  # ... and cleaned up later


def test_corrupted_state_names_the_file(tmp_path):
    mgr = CheckpointManager(tmp_path)
    d = mgr.save(1, _write, {})
    (d / "trainer_state.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"step_000001/trainer_state.json is corrupted"):
        CheckpointManager.read_state(d)
    assert (d / "model_tp0.pt").read_bytes() == b"x"  # nothing overwritten


def test_incompatible_settings(tmp_path):
    with pytest.raises(ValueError, match=r"mtp=True.*mtp=False"):
        check_compatible({"mtp": True}, {"mtp": False}, tmp_path)
    check_compatible({"mtp": True}, {"mtp": True, "new_key": 1}, tmp_path)
