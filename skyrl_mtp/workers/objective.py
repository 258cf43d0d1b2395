"""The RL objective, written once against the output-processor contract
(``skyrl_mtp.megatron.output_processor``): policy loss + decoupled draft loss in one forward.

:func:`rl_output_processor` receives the trunk's final hidden states and the output layer, and:

1. computes the policy's token log-probabilities at the rollout temperature (vocab-parallel);
2. in ``"logprobs"`` mode returns them (old / reference log-probabilities, no graph kept);
3. in ``"train"`` mode builds the policy loss (PPO-style clipped surrogate with separate low/high
   epsilons, optional dual clip, or GSPO; token/sequence aggregation; optional KL to a reference;
   optional truncated importance sampling against the rollout engine's log-probs), and,
   when MTP is on, the draft loss: the MTP head replayed on the *detached* trunk
   (``skyrl_mtp.mtp.replay``) distils the policy's detached next-token distribution, depth by
   depth. Nothing of the draft loss reaches a policy parameter, so the policy's gradient is the
   one it would have without MTP (checked bitwise by tools.check_policy_invariance).

Packed micro-batches (``ctx.packing``, see ``skyrl_mtp.workers.packing``): the model and the
draft loss work on the packed row (the draft masks stay inside each sequence through cu_seqlens);
the policy loss, KL and TIS see each sequence as a row again, as in the padded path.

Normalisation: losses are divided by global counts (tokens or sequences over all micro-batches
and data-parallel ranks) times the DP size, because Megatron DDP averages gradients over DP
ranks; so the update equals one big-batch update whatever the micro-batching or DP layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from skyrl_mtp.config.schema import AlgorithmConfig
from skyrl_mtp.mtp.losses import acceptance_probability, draft_loss, draft_loss_from_hidden, shift_mask
from skyrl_mtp.mtp.replay import MtpCapture, mtp_logits, replay_mtp
from skyrl_mtp.mtp.vocab_parallel import token_logprobs_and_entropy
from skyrl_mtp.rl.kl import kl_penalty
from skyrl_mtp.rl.policy_loss import aggregate_loss, compute_policy_loss
from skyrl_mtp.rl.tis import mismatch_stats, truncated_is_weights


# Gather the counted positions before the draft head's vocabulary projection only when at most
# this fraction of positions counts. Gathering makes a copy of the teacher rows, so with a
# fraction f of the b*s positions the logits memory is 3f (student, its gradient, teacher copy)
# against 2 (student and gradient over all positions): above 2/3 the full path uses less.
GATHER_MAX_FRACTION = 2 / 3


@dataclass
class DraftObjective:
    """What the processor needs to train the MTP head (None when MTP is off)."""

    head: torch.nn.Module  # MultiTokenPredictionBlock (wrapped or not in DDP)
    capture: MtpCapture
    embedding: torch.nn.Module
    num_depths: int
    loss_type: str = "soft_ce"
    loss_weight: float = 1.0
    topk: int | None = None
    chunk_size: int | None = None
    detach_shared_output: bool = True
    detach_embedding: bool = True
    zero_first_embedding: bool = True  # vLLM's MiMo drafter zeroes position 0's token embedding
    # Projection + loss fused (skyrl_mtp/mtp/fused_loss.py: the student logits never reach HBM for
    # all rows). None: on CUDA when Triton is there; True forces it (also Triton's interpreter).
    # Needs the output layer detached (the fused path gives no gradient to the weight).
    fused: bool | None = None
    # uniform: every depth's loss is a plain mean over its positions. acceptance: depth d >= 2
    # weighs position t by the probability that the drafts of depths 1..d-1 from t are accepted,
    # prod_j (1 - TV_j(t)) (detached), since only then is depth d's draft verified: the depth
    # terms then follow the expected number of accepted tokens. Eager path only.
    depth_weighting: str = "uniform"
    depth_attention: str = "causal"  # causal | drafter_cache (skyrl_mtp.mtp.replay.replay_mtp)


@dataclass
class ObjectiveContext:
    """The caller-owned context passed as ``output_processor_context``."""

    mode: str  # "logprobs" | "train"
    targets: torch.Tensor  # [b, s] token at t+1 (what logits at t predict)
    loss_mask: torch.Tensor  # [b, s] 1 where position t predicts a response token
    vocab_size: int
    temperature: float = 1.0
    tp_group: Any = None
    # train mode
    algorithm: AlgorithmConfig | None = None  # the policy loss, KL and TIS settings
    old_logprobs: torch.Tensor | None = None  # None: this forward's own, detached (one step per rollout)
    advantages: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    rollout_logprobs: torch.Tensor | None = None  # the engine's log-probs of the sampled tokens
    normalizer: float = 1.0  # global tokens (token_mean) or sequences (seq_*) / dp_size
    draft: DraftObjective | None = None
    draft_normalizers: list[float] = field(default_factory=list)  # per depth: global draft tokens / dp
    # A packed micro-batch (skyrl_mtp.workers.packing.Packing): the tensors above are [1, T]
    packing: Any = None


def rl_output_processor(*, hidden_states, output_layer, output_weight, input_ids, position_ids,
                        attention_mask, packed_seq_params, context: ObjectiveContext, **_unused):
    """The output processor (keyword arguments as in PROCESSOR_KWARGS)."""
    ctx = context
    logits, _ = output_layer(hidden_states, weight=output_weight, runtime_gather_output=False)
    logits = logits.transpose(0, 1)  # [b, s, V_local]
    logprobs, entropy = token_logprobs_and_entropy(
        logits, ctx.targets, vocab_size=ctx.vocab_size, temperature=ctx.temperature, tp_group=ctx.tp_group)
    if ctx.mode == "logprobs":
        return {"logprobs": logprobs.detach(), "entropy": entropy}
    if ctx.mode != "train":
        raise ValueError(f"ObjectiveContext.mode must be 'logprobs' or 'train', got {ctx.mode!r}")

    # The RL math reduces per row: a packed micro-batch's sequences become rows again.
    per_seq = ctx.packing.as_rows if ctx.packing is not None else _as_is
    logprobs, entropy, mask = per_seq(logprobs), per_seq(entropy), per_seq(ctx.loss_mask)
    advantages, ref_logprobs, rollout_logprobs = (
        None if t is None else per_seq(t) for t in (ctx.advantages, ctx.ref_logprobs, ctx.rollout_logprobs))
    algo = ctx.algorithm
    old = per_seq(ctx.old_logprobs) if ctx.old_logprobs is not None else logprobs.detach()
    norm = {"num_tokens" if algo.loss_agg_mode == "token_mean" else "num_seqs": ctx.normalizer}
    tokens = mask.sum()
    stats = {"entropy_sum": (entropy * mask).sum(), "mask_sum": tokens}
    maxima = {}
    weights = None
    if rollout_logprobs is not None:
        tis = algo.tis
        if tis.enabled:
            weights = truncated_is_weights(old, rollout_logprobs, mask, mode=tis.mode, cap=tis.cap)
        mismatch_sums, maxima = mismatch_stats(old, rollout_logprobs, mask, weights,
                                               tis.cap if tis.enabled else None)
        stats.update(mismatch_sums)
    policy_loss, metrics = compute_policy_loss(logprobs, old, advantages, mask, algo, token_weights=weights,
                                               **norm)
    for name, value in metrics.items():  # token means of this micro-batch -> token sums
        stats[name] = value * tokens
    if algo.use_kl_loss and ref_logprobs is not None:
        kl = kl_penalty(logprobs, ref_logprobs, algo.kl_type)
        policy_loss = policy_loss + algo.kl_coef * aggregate_loss(kl, mask, algo.loss_agg_mode, **norm)
        stats["kl_sum"] = (kl.detach() * mask).sum()

    total = policy_loss
    draft_terms = []
    if ctx.draft is not None:
        total_draft, draft_terms = _draft_losses(ctx, logits, hidden_states, output_layer, output_weight,
                                                 input_ids, position_ids, attention_mask, packed_seq_params)
        total = total + total_draft
    return {"loss": total, "policy_loss": policy_loss.detach(), "draft": draft_terms, "stats": stats,
            "maxima": maxima}


def _as_is(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _use_fused(draft: DraftObjective, device: torch.device) -> bool:
    """Whether this objective's draft loss takes the fused projection + loss path."""
    if draft.fused is False or not draft.detach_shared_output or draft.depth_weighting != "uniform":
        return False
    from skyrl_mtp.mtp.fused_loss import fused_available

    if draft.fused:
        if not fused_available(device):
            raise RuntimeError(f"the fused draft loss was asked for on {device}, which needs CUDA with Triton "
                               "(or TRITON_INTERPRET=1); set trainer.mtp.fused_loss=false")
        return True
    return device.type == "cuda" and fused_available(device)


def _draft_losses(ctx: ObjectiveContext, policy_logits, hidden_states, output_layer, output_weight,
                  input_ids, position_ids, attention_mask, packed_seq_params):
    """Sum over depths of loss_weight * (this micro-batch's share of) the draft loss; per-depth
    (loss sum, weight) pairs for metrics."""
    d = ctx.draft
    hidden_per_depth = replay_mtp(
        d.head, d.embedding, hidden_states=hidden_states, input_ids=input_ids, position_ids=position_ids,
        attention_mask=attention_mask, rotary_pos_emb=d.capture.rotary_pos_emb,
        packed_seq_params=packed_seq_params, num_depths=d.num_depths, detach_trunk=True,
        detach_embedding=d.detach_embedding, zero_first_embedding=d.zero_first_embedding,
        depth_attention=d.depth_attention, capture=d.capture)
    teacher_all = policy_logits.detach()
    seq = teacher_all.shape[1]
    total = hidden_states.new_zeros(())
    terms = []
    weighted = d.depth_weighting == "acceptance" and len(hidden_per_depth) > 1
    # [b, seq]: probability that every draft before the current depth from position t is accepted
    reach = torch.ones(teacher_all.shape[:2], dtype=torch.float32, device=teacher_all.device) if weighted else None
    # Packed: a position counts only if its target `depth` ahead lies in its own sequence.
    cu_seqlens = packed_seq_params.cu_seqlens_q if packed_seq_params is not None else None
    for depth, hidden in enumerate(hidden_per_depth, start=1):
        # Head depth k at t predicts token t+k+1; the policy predicts it at t+k: that is the teacher.
        mask = shift_mask(ctx.loss_mask, depth, cu_seqlens)[:, : seq - depth]
        weight = mask.sum()
        if weight.item() == 0:  # identical on every TP rank: all ranks skip together
            terms.append((hidden.new_zeros(()), 0.0))
            continue
        hidden = hidden[: seq - depth]
        teacher = teacher_all[:, depth:]
        labels = ctx.targets[:, depth:] if d.loss_type == "hard_ce" else None
        if weight.item() <= GATHER_MAX_FRACTION * mask.numel():
            # Only positions that count (response tokens whose target lies `depth` ahead) go
            # through the vocabulary projection and the loss; prompts and padding would each cost
            # a vocabulary row for nothing. The mask is the same on every TP rank, so all ranks
            # pick the same positions (sequence parallel, which shards them, is refused with MTP).
            rows, cols = mask.nonzero(as_tuple=True)
            hidden = hidden.transpose(0, 1)[rows, cols].unsqueeze(1)  # [n, 1, h]
            teacher = teacher[rows, cols].unsqueeze(0)  # [1, n, V_local]: a copy
            labels = labels[rows, cols].unsqueeze(0) if labels is not None else None
            mask = mask.new_ones(1, rows.numel())
        else:
            rows, cols = None, None
        if _use_fused(d, hidden.device):
            weight_local = output_weight if output_weight is not None else output_layer.weight
            mean = draft_loss_from_hidden(hidden.transpose(0, 1), weight_local.detach(), teacher, mask,
                                          loss_type=d.loss_type, labels=labels, topk=d.topk,
                                          temperature=ctx.temperature, vocab_size=ctx.vocab_size,
                                          tp_group=ctx.tp_group, fused=True)  # rows per chunk: its default
        else:
            student = mtp_logits(output_layer, hidden, output_weight, detach_output=d.detach_shared_output)
            if weighted and depth > 1:  # positions weighted by the chance that depth `depth` is verified
                reached = reach[:, : seq - depth]
                reached = reached[rows, cols].unsqueeze(0) if rows is not None else reached
                mask = mask * reached.to(mask.dtype if mask.is_floating_point() else torch.float32)
                weight = mask.sum()
                if weight.item() <= 0:  # no draft of this depth can be verified (same on every TP rank)
                    terms.append((hidden.new_zeros(()), 0.0))
                    continue
            mean = draft_loss(student, teacher, mask, loss_type=d.loss_type, labels=labels, topk=d.topk,
                              temperature=ctx.temperature, vocab_size=ctx.vocab_size, tp_group=ctx.tp_group,
                              chunk_size=d.chunk_size)
            if weighted and depth < len(hidden_per_depth):
                accept = acceptance_probability(student, teacher, temperature=ctx.temperature,
                                                vocab_size=ctx.vocab_size, tp_group=ctx.tp_group,
                                                chunk_size=d.chunk_size)  # [B', S'] as the student
                if rows is not None:
                    reach[rows, cols] *= accept[0]
                else:
                    reach[:, : seq - depth] *= accept
        share = mean * weight / ctx.draft_normalizers[depth - 1]
        total = total + d.loss_weight * share
        terms.append(((mean * weight).detach(), float(weight)))
    return total, terms
