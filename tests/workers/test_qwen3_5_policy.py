"""The qwen3_5 hybrid in the Megatron policy worker: MTP head training leaves the policy bitwise
unchanged (check_policy_invariance on the hybrid), and the check does catch a leak there."""

from __future__ import annotations

from skyrl_mtp.tools.check_policy_invariance import main as invariance


def test_invariance_on_the_hybrid(megatron_single):
    report = invariance(["--steps", "3", "--mini-batches", "4", "--preset", "qwen3_5_tiny", "--head-lr", "1e-2",
                         "--num-depths", "2"])
    assert report["optimizer_steps"] == 12
    assert report["identical"] is True and report["max_abs_diff"] == 0.0
    assert report["mtp_loss_last"] < report["mtp_loss_first"]


def test_invariance_check_catches_a_leak_on_the_hybrid(megatron_single):
    report = invariance(["--steps", "2", "--preset", "qwen3_5_tiny", "--attach-output-layer"])
    assert report["identical"] is False and report["max_abs_diff"] > 0
