"""Sequence packing (megatron.max_tokens_per_microbatch): the packing plan and its inverse, and the
packed policy against the padded one (the reference) on CPU in fp32: log-probs, policy and draft
losses, gradients of trunk and head within 1e-5; the MTP decoupling still bitwise; the refusals."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from skyrl_mtp.config.schema import (AlgorithmConfig, ConfigError, GspoConfig, MegatronConfig, MtpConfig, OptimConfig,
                                     TisConfig)
from skyrl_mtp.tools.check_policy_invariance import synthetic_batch
from skyrl_mtp.workers.config import PolicyWorkerConfig
from skyrl_mtp.workers.packing import Packing, pack_microbatches, plan_microbatches, sequence_lengths

TOL = 1e-5
BUDGET = 48  # tokens per packed micro-batch: two or three of the test's 13-22-token sequences


# ---------------------------------------------------------------- the plan and its inverse
def test_plan_is_first_fit_decreasing_within_the_budget():
    lengths = [5, 3, 7, 2, 4, 8, 1]
    bins = plan_microbatches(lengths, 8)
    assert sorted(r for b in bins for r in b) == list(range(len(lengths)))  # every row once
    assert all(sum(lengths[r] for r in b) <= 8 for b in bins)
    # decreasing order, first fit: 8 | 7+1 | 5+3 | 4+2
    assert bins == [[5], [2, 6], [0, 1], [3, 4]]


def test_plan_refuses_a_sequence_over_the_budget_naming_both_numbers():
    with pytest.raises(ValueError, match=r"sequence 1 has 9 tokens, more than megatron\.max_tokens_per_microbatch=8: "
                                         r"set it >= 11"):
        plan_microbatches([3, 9, 11], 8)


def test_sequence_lengths_end_one_past_the_last_loss_position():
    mask = torch.tensor([[0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1]], dtype=torch.float)
    # row 0: loss at 1..2 predicts tokens 2..3 -> 4 tokens; row 1: nothing counts -> 1; row 2: capped at S
    assert sequence_lengths(mask) == [4, 1, 6]


def test_pack_and_unpack_round_trip():
    ids = torch.arange(1, 19).reshape(3, 6)
    mask = torch.tensor([[0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0]], dtype=torch.float)
    (mb,) = pack_microbatches({"input_ids": ids, "loss_mask": mask}, budget=16, device="cpu")
    packing: Packing = mb["packing"]
    assert packing.rows == [0, 1, 2] and packing.lengths == [4, 1, 5]
    assert mb["input_ids"].tolist() == [[1, 2, 3, 4, 7, 13, 14, 15, 16, 17]]
    assert packing.params.cu_seqlens_q.tolist() == [0, 4, 5, 10] and packing.params.max_seqlen_q == 5
    assert packing.position_ids().tolist() == [[0, 1, 2, 3, 0, 0, 1, 2, 3, 4]]
    # the next token inside each sequence, 0 at each sequence's end (as past a padded row's end)
    assert packing.targets(mb["input_ids"]).tolist() == [[2, 3, 4, 0, 0, 14, 15, 16, 17, 0]]
    assert packing.as_rows(mb["loss_mask"]).tolist() == [[0, 1, 1, 0, 0], [0, 0, 0, 0, 0], [0, 0, 1, 1, 0]]
    out = torch.zeros(3, 6, dtype=torch.long)
    packing.scatter(mb["input_ids"], out)
    assert out.tolist() == [[1, 2, 3, 4, 0, 0], [7, 0, 0, 0, 0, 0], [13, 14, 15, 16, 17, 0]]


# ---------------------------------------------------------------- packed vs padded, the policy
ALGORITHMS = {
    # DAPO: clip-higher PPO, token mean, token TIS; draft loss TV over 2 depths
    "dapo_token_mean": (AlgorithmConfig(tis=TisConfig(enabled=True)), MtpConfig(loss_type="tv")),
    # every per-sequence reduction: GSPO's sequence ratio, sequence means, sequence TIS, KL to a
    # reference; draft loss soft CE with acceptance weighting of depth 2
    "gspo_seq_mean": (AlgorithmConfig(policy_loss="gspo", loss_agg_mode="seq_mean_token_mean",
                                      gspo=GspoConfig(clip_eps_low=0.05, clip_eps_high=0.05),
                                      tis=TisConfig(enabled=True, mode="sequence", cap=1.5),
                                      use_kl_loss=True, kl_coef=0.1),
                      MtpConfig(loss_type="soft_ce", depth_weighting="acceptance")),
}


def _cfg(path, algorithm: AlgorithmConfig, mtp: MtpConfig, **megatron) -> PolicyWorkerConfig:
    return PolicyWorkerConfig(model_path=str(path), megatron=MegatronConfig(micro_batch_size=2, **megatron),
                              optim=OptimConfig(lr=1e-3), algorithm=algorithm, temperature=0.9,
                              mtp=replace(mtp, enabled=True, num_speculative_tokens=2, optim=OptimConfig(lr=3e-3)))


def _rl_batch(rows: int = 8, seq: int = 24) -> dict[str, torch.Tensor]:
    batch = synthetic_batch(0, 300, rows, seq, 6)
    batch["loss_mask"][3] = 0  # a row where nothing counts (an overlong-filtered response)
    gen = torch.Generator().manual_seed(5)
    for key in ("old_logprobs", "ref_logprobs", "rollout_logprobs"):
        batch[key] = -3.0 + 0.2 * torch.randn(rows, seq, generator=gen)
    return batch


def _grads(module) -> dict[str, torch.Tensor]:
    return {n: p.main_grad.detach().clone() for n, p in module.named_parameters()}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_packed_matches_padded(megatron_single, tiny_ckpt, name):
    """Same weights, same batch: padded micro-batches of 2 rows against packed ones of <= 48 tokens
    (several sequences each, boundaries inside a micro-batch). Log-probs on the loss positions,
    the policy loss and its statistics, each depth's draft loss and count, and every trunk and head
    gradient agree within 1e-5."""
    from skyrl_mtp.workers.policy import MegatronPolicy

    algorithm, mtp = ALGORITHMS[name]
    batch = _rl_batch()
    out = {}
    for packed in (False, True):
        cfg = _cfg(tiny_ckpt, algorithm, mtp, max_tokens_per_microbatch=BUDGET if packed else None)
        policy = MegatronPolicy(cfg, init_distributed=False)
        microbatches = policy._microbatches(batch)
        if packed:  # really packed: 3 micro-batches (padded: 4), sequence boundaries inside each
            assert len(microbatches) == 3 and all(len(mb["packing"].rows) >= 2 for mb in microbatches)
            assert all(mb["input_ids"].shape[1] <= BUDGET for mb in microbatches)
        logprobs = policy.compute_logprobs(batch)
        (sums, maxima), draft_sums = policy.accumulate_gradients(batch)
        out[packed] = dict(logprobs=logprobs, sums=sums, maxima=maxima, draft=draft_sums,
                           trunk=_grads(policy.trunk), head=_grads(policy.head))
    ref, got = out[False], out[True]
    mask = batch["loss_mask"].bool()
    diffs = {}
    for key in ("logprobs", "entropy"):
        diffs[key] = (ref["logprobs"][key][mask] - got["logprobs"][key][mask]).abs().max().item()
        assert diffs[key] <= TOL, (key, diffs[key])
    assert set(ref["sums"]) == set(got["sums"]) and "policy_loss" in ref["sums"]
    for key, value in ref["sums"].items():
        assert abs(got["sums"][key] - value) <= TOL * max(1.0, abs(value)), (key, got["sums"][key], value)
    diffs["policy_loss"] = abs(got["sums"]["policy_loss"] - ref["sums"]["policy_loss"])
    for key, value in ref["maxima"].items():
        assert abs(got["maxima"][key] - value) <= TOL, (key, got["maxima"][key], value)
    assert len(ref["draft"]) == 2
    for depth, ((ref_loss, ref_weight), (loss, weight)) in enumerate(zip(ref["draft"], got["draft"]), start=1):
        assert weight == pytest.approx(ref_weight, abs=TOL) and ref_weight > 0
        assert abs(loss - ref_loss) <= TOL * max(1.0, abs(ref_loss)), (loss, ref_loss)
        diffs[f"draft_loss_depth_{depth}"] = abs(loss / weight - ref_loss / ref_weight)
    diffs["trunk_grads"], diffs["head_grads"] = _max_diff(ref["trunk"], got["trunk"]), _max_diff(ref["head"], got["head"])
    print(f"\n[{name}] packed vs padded max |diff|: " + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()))
    assert diffs["trunk_grads"] <= TOL and diffs["head_grads"] <= TOL
    assert max(g.abs().max().item() for g in ref["head"].values()) > 0  # the head did get a gradient


def test_policy_update_with_packing_is_bitwise_the_same_without_mtp(tiny_ckpt):
    """check_policy_invariance with packing on: the policy trained with the draft loss is bitwise
    the one trained without it; the negative control (draft loss attached to the output layer)
    is still caught."""
    from skyrl_mtp.tools.check_policy_invariance import main as invariance

    argv = ["--steps", "2", "--mini-batches", "2", "--num-depths", "2", "--model", str(tiny_ckpt),
            "--max-tokens-per-microbatch", "64"]
    report = invariance(argv)
    assert report["identical"] is True and report["max_abs_diff"] == 0.0
    assert report["max_tokens_per_microbatch"] == 64
    leak = invariance(argv + ["--attach-output-layer"])
    assert leak["identical"] is False and leak["max_abs_diff"] > 0


def test_worker_refuses_a_sequence_longer_than_the_budget(megatron_single, tiny_ckpt):
    from skyrl_mtp.workers.policy import MegatronPolicy

    algorithm, mtp = ALGORITHMS["dapo_token_mean"]
    policy = MegatronPolicy(_cfg(tiny_ckpt, algorithm, mtp, max_tokens_per_microbatch=16), init_distributed=False)
    with pytest.raises(ValueError, match=r"has 2\d tokens, more than megatron\.max_tokens_per_microbatch=16"):
        policy.compute_logprobs(_rl_batch())


# ---------------------------------------------------------------- refusals
def _validated(**changes):
    from skyrl_mtp.config.schema import Config, validate_config

    cfg = Config()
    for key, value in changes.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return validate_config(cfg)


def test_config_checks_the_budget_before_anything_starts():
    # defaults: data.max_prompt_length 64 + generator.max_response_length 40 = 104
    with pytest.raises(ConfigError, match=r"max_tokens_per_microbatch=100: a sequence can have data\.max_prompt_length "
                                          r"\+ generator\.max_response_length = 104 tokens, more than the 100-token"):
        _validated(megatron__max_tokens_per_microbatch=100)
    with pytest.raises(ConfigError, match=r"max_tokens_per_microbatch=0: must be >= 1"):
        _validated(megatron__max_tokens_per_microbatch=0)
    _validated(megatron__max_tokens_per_microbatch=104)


def test_packing_is_refused_for_the_qwen3_5_family(tmp_path):
    """Its Gated DeltaNet recurrence has no packed-sequence path: refused in validation and at build."""
    from skyrl_mtp.megatron.model_builder import BuildOptions, build_trunk
    from skyrl_mtp.models.families import all_presets

    with pytest.raises(ConfigError, match=r"max_tokens_per_microbatch=256: the qwen3_5 family's Gated DeltaNet"):
        _validated(model__preset="qwen3_5_tiny", generator__dtype="bfloat16", generator__enable_prefix_caching=False,
                   megatron__max_tokens_per_microbatch=256)
    with pytest.raises(ValueError, match="not supported by the qwen3_5 family"):
        build_trunk(all_presets()["qwen3_5_tiny"], BuildOptions(packed=True))
