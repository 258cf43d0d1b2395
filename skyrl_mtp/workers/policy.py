"""The Megatron policy: one rank's trunk + MTP head, their DDP buffers, optimizers and schedules.

:class:`MegatronPolicy` is plain Python (tests and tools drive it in-process); the Ray actors in
``skyrl_mtp.workers.actors`` wrap it, one per rank. Separation of the two parameter sets:

- the trunk (policy) is wrapped in its own Megatron DDP with its own optimizer and LR schedule;
  its gradient reduction, grad-norm and clipping see only policy parameters;
- the MTP head is a separate module with a separate DDP buffer, optimizer, schedule and clipping;
- the draft loss reaches the head only (detached trunk, embedding and output layer by default).

Batches are dicts of ``[B, S]`` tensors for this rank's data-parallel shard: ``input_ids``
(right-padded), ``loss_mask`` (1 where position t predicts a response token), and for training
``old_logprobs``, ``advantages`` and optionally ``ref_logprobs`` (aligned with loss_mask).
They run as micro-batches of ``megatron.micro_batch_size`` rows, or, with
``megatron.max_tokens_per_microbatch``, as packed micro-batches (``skyrl_mtp.workers.packing``).
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import torch

from skyrl_mtp.megatron.bridge import (load_module_state, make_bridge, module_state, read_megatron_shard,
                                      split_trunk_and_mtp)
from skyrl_mtp.megatron.drafter_attention import install as install_drafter_attention
from skyrl_mtp.megatron.model_builder import (BuildOptions, build_device, build_head_embedding, build_mtp_block,
                                              build_trunk, causal_mask)
from skyrl_mtp.megatron.pipeline import (check_pipeline_layout, current_stage, finalize_grads, gather_stages, global_names,
                                         join_optimizer_build, run_schedule, scope_grad_stats, stage_of, stage_state, sync_embedding_replica)
from skyrl_mtp.models.checkpoint import check_hf_checkpoint
from skyrl_mtp.models.families import config_from_pretrained
from skyrl_mtp.mtp.replay import MtpCapture
from skyrl_mtp.config.schema import MegatronConfig, OptimConfig
from skyrl_mtp.workers.config import PolicyWorkerConfig
from skyrl_mtp.workers.objective import DraftObjective, ObjectiveContext, rl_output_processor
from skyrl_mtp.workers.packing import pack_microbatches

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CHECKPOINT_FORMAT = 1


def _make_optimizer(module, config, optim: OptimConfig, params_dtype, mg: MegatronConfig):
    """Megatron DDP (own grad buffer) + Megatron optimizer (clipping) + LR schedule for one module.

    With ``mg.use_distributed_optimizer`` the DDP buffer is reduce-scattered and Megatron's
    DistributedOptimizer keeps this DP rank's shard of the Adam state (and of the fp32 main params),
    then all-gathers the updated parameters; its grad norm is reduced over the DP x TP ranks that
    hold the shards, still over this module's parameters only. ``mg.optimizer_cpu_offload`` puts
    ``mg.optimizer_offload_fraction`` of that shard's state and step on the host (Megatron's
    HybridDeviceOptimizer)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    dist_opt = mg.use_distributed_optimizer
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=dist_opt), module)
    opt = get_megatron_optimizer(OptimizerConfig(
        optimizer=optim.optimizer, sgd_momentum=0.0, lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad, bf16=params_dtype == torch.bfloat16, params_dtype=params_dtype,
        use_distributed_optimizer=dist_opt, optimizer_cpu_offload=mg.optimizer_cpu_offload,
        optimizer_offload_fraction=mg.optimizer_offload_fraction if mg.optimizer_cpu_offload else 0.0,
        # With offload, the fp32 master weights live in the HybridDeviceOptimizer (on the host for
        # the offloaded share) instead of a second full fp32 copy on the GPU: 4 bytes per parameter
        # of GPU memory saved (31 GB at 7.8B). Moments and master weights stay fp32.
        use_precision_aware_optimizer=mg.optimizer_cpu_offload), [ddp])
    sched = OptimizerParamScheduler(
        opt, init_lr=0.0 if optim.lr_warmup_steps else optim.lr, max_lr=optim.lr, min_lr=optim.min_lr,
        lr_warmup_steps=optim.lr_warmup_steps, lr_decay_steps=max(optim.lr_decay_steps, optim.lr_warmup_steps + 1),
        lr_decay_style=optim.lr_decay_style, start_wd=optim.weight_decay, end_wd=optim.weight_decay,
        wd_incr_steps=1, wd_incr_style="constant")
    return ddp, opt, sched


def head_microbatches(seen: int, count: int, share: float) -> list[bool]:
    """Which of the next `count` micro-batches (after `seen` of them) the MTP head trains on:
    evenly spaced at `share` over the run (the i-th overall is chosen when floor((i + 1) * share)
    passes an integer), so with one micro-batch a step and share 0.5 the head trains every other step."""
    return [int((i + 1) * share + 1e-9) > int(i * share + 1e-9) for i in range(seen, seen + count)]


def _cu_seqlens(mb: dict[str, Any]):
    """A packed micro-batch's sequence boundaries (None for padded rows): draft targets stay inside."""
    packing = mb.get("packing")
    return packing.params.cu_seqlens_q if packing is not None else None


def _distributed_parts(opt) -> list:
    """The DistributedOptimizer instances inside a Megatron optimizer (get_megatron_optimizer
    returns a ChainedOptimizer around them); empty for the plain optimizer."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return [o for o in getattr(opt, "chained_optimizers", [opt]) if isinstance(o, DistributedOptimizer)]


def _optimizer_shard(opt) -> list | None:
    """This DP rank's shard of a distributed optimizer (fp32 main params, Adam moments and step per
    parameter range, in Megatron's bucket layout; no collective), or None for the plain optimizer,
    whose whole state is in its state_dict. Cloned: the fp32 main params are views of the model's
    parameters, and saving a view would write the whole buffer."""
    parts = _distributed_parts(opt)
    if not parts:
        return None
    out = []
    for part in parts:
        state = part.get_parameter_state_dp_reshardable()
        for key, per_dtype in state.items():
            if not isinstance(key, int):
                continue
            for buckets in per_dtype.values():
                for bucket in buckets:
                    for i, elem in enumerate(bucket):
                        # Megatron's loader skips entries flagged as padding (its dist-checkpoint
                        # writer adds the flag); these are all real parameter ranges.
                        bucket[i] = {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in elem.items()}
                        bucket[i]["padding"] = False
        out.append(state)
    return out


def _load_optimizer_shard(opt, shard: list | None, path: Path) -> None:
    """Inverse of _optimizer_shard, after ``opt.load_state_dict`` (which sizes the state)."""
    parts = _distributed_parts(opt)
    if bool(parts) != (shard is not None):
        raise ValueError(f"{path}: saved with megatron.use_distributed_optimizer={not parts}, this run uses "
                         f"{bool(parts)}; keep the setting of the run that wrote the checkpoint")
    # no_grad: with fp32 parameters the main-param shards Megatron copies into are views of them
    with torch.no_grad():
        for part, state in zip(parts, shard or []):
            # megatron-core 0.16.1's DistributedOptimizer.load_state_dict gives every parameter the
            # *same* 'step' tensor when the optimizer is torch's AdamW (no Apex/TE, as on CPU and on
            # this project's GPU machines): each parameter's update would then advance it, and Adam's
            # bias correction would use step + number of parameters. One tensor per parameter:
            for param_state in part.optimizer.state.values():
                if torch.is_tensor(param_state.get("step")):
                    param_state["step"] = param_state["step"].clone()
            part.load_parameter_state_from_dp_reshardable(state)


def head_grad_norm(head_opt: Any, returned_norm: float | None) -> float:
    """The MTP head's gradient norm after its optimizer step.

    megatron-core >= 0.19 tags MTP parameters with ``grad_norm_group='mtp'`` (when
    ``mtp_detach_heads`` is set) and clips them by their own group norm, which it keeps in
    ``grad_norms_by_group``; the norm ``step()`` returns is then the norm of the *other*
    parameters, 0 for an optimizer that holds only the head. Older versions return the head's norm.
    """
    group_norm = (getattr(head_opt, "grad_norms_by_group", None) or {}).get("mtp")
    return float(group_norm if group_norm is not None else (returned_norm or 0.0))


class MegatronPolicy:
    """One rank of the policy (or, with trainable=False, of the frozen reference)."""

    def __init__(self, cfg: PolicyWorkerConfig, *, rank: int = 0, world_size: int = 1,
                 master_addr: str = "127.0.0.1", master_port: int | None = None, trainable: bool = True,
                 init_distributed: bool = True):
        from skyrl_mtp.megatron.parallel import free_port, init_megatron

        self.cfg = cfg
        self.model_cfg = config_from_pretrained(cfg.model_path)  # mimo or qwen3_5, from config.json
        cfg.validate(self.model_cfg.num_mtp_layers)  # before any process group or model exists
        check_pipeline_layout(self.model_cfg, cfg.megatron.pp_size)
        self.mtp_on = cfg.mtp.enabled and trainable
        # The checkpoint's tensor names and shapes, from the safetensors headers (no tensor read yet).
        check_hf_checkpoint(self.model_cfg, cfg.model_path, require_mtp=self.mtp_on)
        mg = cfg.megatron
        bridge = make_bridge(self.model_cfg, tp_size=mg.tp_size)

        if init_distributed:
            init_megatron(rank=rank, world_size=world_size, master_addr=master_addr,
                          master_port=master_port or free_port(), tp_size=mg.tp_size, pp_size=mg.pp_size,
                          seed=cfg.seed)
        from megatron.core import parallel_state

        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.dp_group = parallel_state.get_data_parallel_group()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.pp_rank, self.pp_size = current_stage()
        self.bridge = bridge
        self.params_dtype = _DTYPES[mg.params_dtype]
        opts = BuildOptions(tp_size=mg.tp_size, pp_size=mg.pp_size, params_dtype=self.params_dtype,
                            recompute=mg.recompute, packed=mg.max_tokens_per_microbatch is not None)
        # Each rank reads its own tensor-parallel slices, lazily (the MTP head's only with MTP on).
        shard = read_megatron_shard(bridge, cfg.model_path, tp_rank=self.tp_rank, tp_size=mg.tp_size,
                                    with_mtp=self.mtp_on)
        trunk_state, head_state = split_trunk_and_mtp(shard)
        device = build_device()

        # Megatron's placement: embedding on the first stage, final norm and output layer on the
        # last, the decoder layers split evenly; the MTP head lives on the last stage.
        self.trunk = build_trunk(self.model_cfg, opts, pre_process=self.pp_rank == 0,
                                 post_process=self.pp_rank == self.pp_size - 1)
        self.stage = stage_of(self.trunk)
        load_module_state(self.trunk, stage_state(trunk_state, self.stage),
                          what=f"policy trunk ({cfg.model_path}, pipeline stage {self.pp_rank})")
        self.head = self.head_embedding = None
        if self.mtp_on and self.stage.last:
            self.head = build_mtp_block(self.model_cfg, opts)
            load_module_state(self.head, head_state, what=f"MTP head ({cfg.model_path})")
            if cfg.mtp.depth_attention == "drafter_cache":  # here, so a head it cannot serve fails at start-up
                install_drafter_attention(self.head.layers[0])
            if not self.stage.first:
                self.head_embedding = build_head_embedding(self.model_cfg, opts)
                load_module_state(self.head_embedding, {"word_embeddings.weight": trunk_state["embedding.word_embeddings.weight"]},
                                  what=f"MTP head's embedding replica ({cfg.model_path})")
        self.capture = MtpCapture().attach(self.trunk)
        self.device = device
        self.step = 0
        self._microbatches_seen = 0  # micro-batches trained on so far (trainer.mtp.microbatch_share)
        self._head_trained = False  # whether the head saw a micro-batch in this optimizer step
        self.trainable = trainable
        self.trunk_ddp = self.trunk_opt = self.trunk_sched = None
        self.head_ddp = self.head_opt = self.head_sched = None
        if trainable:
            self.trunk_ddp, self.trunk_opt, self.trunk_sched = _make_optimizer(
                self.trunk, self.trunk.config, cfg.optim, self.params_dtype, mg)
            if self.head is not None:
                self.head_ddp, self.head_opt, self.head_sched = _make_optimizer(
                    self.head, self.head.config, cfg.mtp.optim, self.params_dtype, mg)
                # The head exists on the last stage only: its grad norm and clipping must not
                # wait for ranks of other stages (Megatron's default group spans all of them).
                scope_grad_stats(self.head_opt, distributed_optimizer=mg.use_distributed_optimizer)
            elif self.mtp_on:
                join_optimizer_build(lambda stand_in: _make_optimizer(
                    stand_in, self.trunk.config, cfg.mtp.optim, self.params_dtype, mg), self.params_dtype)
        else:
            self.trunk.eval()

    # ------------------------------------------------------------------ helpers
    def _model(self):
        return self.trunk_ddp if self.trunk_ddp is not None else self.trunk

    def _microbatches(self, batch: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        budget = self.cfg.megatron.max_tokens_per_microbatch
        if budget is not None:
            return pack_microbatches(batch, budget, self.device)
        n = batch["input_ids"].shape[0]
        size = self.cfg.megatron.micro_batch_size
        return [{k: (v[start:start + size].to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
                for start in range(0, n, size)]

    def _forward(self, mb: dict[str, Any], ctx: ObjectiveContext):
        ids = mb["input_ids"]
        packing = mb.get("packing")
        if packing is not None:  # THD: positions restart per sequence, attention stays inside each
            return self._model()(ids, packing.position_ids(), None, packed_seq_params=packing.params,
                                 output_processor=rl_output_processor, output_processor_context=ctx)
        seq = ids.shape[1]
        pos = torch.arange(seq, device=ids.device)[None].expand_as(ids)
        return self._model()(ids, pos, causal_mask(seq, device=ids.device), output_processor=rl_output_processor,
                             output_processor_context=ctx)

    @staticmethod
    def _targets(mb: dict[str, Any]) -> torch.Tensor:
        """The token each position predicts: the next one in its row (or, packed, in its sequence)."""
        ids = mb["input_ids"]
        if mb.get("packing") is not None:
            return mb["packing"].targets(ids)
        return torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)

    def _dp_sum(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        if self.dp_size > 1:
            torch.distributed.all_reduce(t, group=self.dp_group)
        return float(t.item())

    # ------------------------------------------------------------------ forward-only
    @torch.no_grad()
    def compute_logprobs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Token log-probs (and entropies) at the rollout temperature, ``[B, S]`` aligned with loss_mask,
        on the last pipeline stage (None on the others). Collective over the pipeline."""
        self.trunk.eval()

        def forward(mb):
            return self._forward(mb, ObjectiveContext(
                mode="logprobs", targets=self._targets(mb), loss_mask=mb["loss_mask"],
                vocab_size=self.model_cfg.vocab_size, temperature=self.cfg.temperature, tp_group=self.tp_group))

        def keep(out):
            return out["logprobs"].new_zeros(()), {k: out[k].cpu() for k in ("logprobs", "entropy")}

        microbatches = self._microbatches(batch)
        outs = run_schedule(self._model(), microbatches, forward, keep, forward_only=True)
        if not self.stage.last:
            return None
        if microbatches[0].get("packing") is None:
            return {k: torch.cat([o[k] for o in outs]) for k in ("logprobs", "entropy")}
        # Packed: back to the batch's rows; positions past a sequence's packed length are 0 (nothing there counts).
        result = {k: torch.zeros(batch["input_ids"].shape, dtype=outs[0][k].dtype) for k in ("logprobs", "entropy")}
        for mb, out in zip(microbatches, outs):
            for k in result:
                mb["packing"].scatter(out[k], result[k])
        return result

    # ------------------------------------------------------------------ training
    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimizer step of the policy (and of the MTP head) on this rank's shard."""
        sums, draft_sums = self.accumulate_gradients(batch)
        return self.apply_gradients(sums, draft_sums)

    def accumulate_gradients(self, batch: dict[str, torch.Tensor]):
        """Zero the grad buffers, run forward/backward over all micro-batches and reduce over DP.
        Gradients end in each parameter's ``main_grad`` (Megatron DDP buffers).

        Without ``old_logprobs`` in the batch (one optimizer step per rollout batch) the ratio's
        denominator is the detached log-prob of this very forward: the same numbers as a separate
        forward at the same weights, one forward pass fewer."""
        if not self.trainable:
            raise RuntimeError("train_step on a frozen (reference) policy")
        algo = self.cfg.algorithm
        mask = batch["loss_mask"].float()
        if algo.loss_agg_mode == "token_mean":
            normalizer = self._dp_sum(mask.sum().item()) / self.dp_size
        else:
            normalizer = self._dp_sum(float((mask.sum(-1) > 0).sum().item())) / self.dp_size
        if normalizer <= 0:
            raise ValueError("train_step got a batch with no response tokens on any rank (loss_mask is all zero)")
        draft = None
        draft_norms: list[float] = []
        if self.head is not None:
            from skyrl_mtp.mtp.losses import shift_mask

            m = self.cfg.mtp
            embedding = self.head_embedding if self.head_embedding is not None else self.trunk.embedding
            draft = DraftObjective(head=self.head, capture=self.capture, embedding=embedding,
                                   num_depths=m.num_speculative_tokens, loss_type=m.loss_type,
                                   loss_weight=m.loss_weight, topk=m.topk if m.loss_type == "topk_soft_ce" else None,
                                   chunk_size=self.cfg.megatron.mtp_loss_chunk_size,
                                   detach_shared_output=m.detach_shared_output, detach_embedding=m.detach_embedding,
                                   zero_first_embedding=getattr(self.model_cfg, "drafter_zeroes_first_embedding", True),
                                   fused=None if m.fused_loss else False, depth_weighting=m.depth_weighting,
                                   depth_attention=m.depth_attention)
            self.head.train()
            self.head_ddp.zero_grad_buffer()
            self.head_opt.zero_grad()
        self.trunk.train()
        self.trunk_ddp.zero_grad_buffer()
        self.trunk_opt.zero_grad()

        microbatches = self._microbatches(batch)
        head_trains = [False] * len(microbatches)
        if draft is not None:
            head_trains = head_microbatches(self._microbatches_seen, len(microbatches), self.cfg.mtp.microbatch_share)
            # per depth: the draft tokens of the micro-batches the head trains on, summed over DP
            # (counted on the device, one host read per depth)
            chosen = [mb for mb, on in zip(microbatches, head_trains) if on]
            draft_norms = []
            for k in range(1, self.cfg.mtp.num_speculative_tokens + 1):
                tokens = sum((shift_mask(mb["loss_mask"].float(), k, _cu_seqlens(mb)).sum() for mb in chosen),
                             torch.zeros((), device=self.device))
                draft_norms.append(max(self._dp_sum(float(tokens)) / self.dp_size, 1e-12))
        self._microbatches_seen += len(microbatches)
        # No micro-batch of the head on any DP rank (microbatch_share < 1): its optimizer skips the
        # step, as Adam's momentum would otherwise move it on a zero gradient.
        self._head_trained = draft is not None and self._dp_sum(float(sum(head_trains))) > 0

        sums: dict[str, float] = {}
        maxima: dict[str, float] = {}
        draft_sums = [[0.0, 0.0] for _ in draft_norms]
        head_for = iter(head_trains)  # the schedule runs each micro-batch's forward once, in order

        def forward(mb):
            return self._forward(mb, ObjectiveContext(
                mode="train", targets=self._targets(mb), loss_mask=mb["loss_mask"].float(),
                vocab_size=self.model_cfg.vocab_size, temperature=self.cfg.temperature, tp_group=self.tp_group,
                algorithm=algo, old_logprobs=mb.get("old_logprobs"), advantages=mb["advantages"],
                ref_logprobs=mb.get("ref_logprobs"), rollout_logprobs=mb.get("rollout_logprobs"),
                normalizer=normalizer, draft=draft if next(head_for) else None, draft_normalizers=draft_norms,
                packing=mb.get("packing")))

        def loss(out):  # last stage: the schedule back-propagates the returned loss as is
            sums["policy_loss"] = sums.get("policy_loss", 0.0) + float(out["policy_loss"])
            for name, value in out["stats"].items():
                sums[name] = sums.get(name, 0.0) + float(value)
            for name, value in out["maxima"].items():
                maxima[name] = max(maxima.get(name, float("-inf")), float(value))
            for k, (loss_sum, weight) in enumerate(out["draft"]):
                draft_sums[k][0] += float(loss_sum)
                draft_sums[k][1] += weight
            return out["loss"], {}

        run_schedule(self.trunk_ddp, microbatches, forward, loss, forward_only=False)
        finalize_grads(self.trunk_ddp)
        if self.head is not None:
            self.head_ddp.finish_grad_sync()
        return (sums, maxima), draft_sums

    def apply_gradients(self, stats: tuple[dict[str, float], dict[str, float]],
                        draft_sums: list[list[float]]) -> dict[str, float]:
        """Clip and step each optimizer on its own parameters; advance both LR schedules. The
        policy's grad norm covers every pipeline stage; loss and draft metrics exist on the last."""
        started = time.perf_counter()
        ok, grad_norm, _ = self.trunk_opt.step()
        self.trunk_sched.step(1)
        if self.mtp_on:  # the head's embedding replica follows the policy's embedding
            sync_embedding_replica(self.trunk.embedding if self.stage.first else None, self.head_embedding)
        metrics = self._reduce_metrics(*stats) if self.stage.last else {}
        metrics.update({"policy/grad_norm": float(grad_norm or 0.0), "policy/update_ok": float(bool(ok)),
                        "policy/lr": self.trunk_opt.param_groups[0]["lr"]})
        if self.head is not None and self._head_trained:
            _, head_norm, _ = self.head_opt.step()
            self.head_sched.step(1)
            metrics.update(self._draft_metrics(draft_sums))
            metrics.update({"mtp/grad_norm": head_grad_norm(self.head_opt, head_norm),
                            "mtp/lr": self.head_opt.param_groups[0]["lr"]})
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        # both optimizers' steps (with offload: the host Adam and the copies to and from the GPU)
        metrics["timing/optimizer_s"] = time.perf_counter() - started
        self.step += 1
        return metrics

    def _reduce_metrics(self, sums: dict[str, float], maxima: dict[str, float]) -> dict[str, float]:
        keys = sorted(sums)
        t = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=self.device)
        peak_keys = sorted(maxima)
        peaks = torch.tensor([maxima[k] for k in peak_keys], dtype=torch.float64, device=self.device)
        if self.dp_size > 1:
            torch.distributed.all_reduce(t, group=self.dp_group)
            if peak_keys:
                torch.distributed.all_reduce(peaks, op=torch.distributed.ReduceOp.MAX, group=self.dp_group)
        total = dict(zip(keys, t.tolist()))
        tokens = max(total.pop("mask_sum", 0.0), 1.0)
        # Each rank's loss is its share of the global loss scaled by dp_size (DDP averages grads).
        out = {"policy/loss": total.pop("policy_loss") / self.dp_size}
        out["policy/entropy"] = total.pop("entropy_sum") / tokens
        if "kl_sum" in total:
            out["policy/kl"] = total.pop("kl_sum") / tokens
        for name, value in total.items():  # token sums from the policy-loss function and TIS
            out[name if "/" in name else f"policy/{name}"] = value / tokens
        out.update(zip(peak_keys, peaks.tolist()))
        return out

    def _draft_metrics(self, draft_sums: list[list[float]]) -> dict[str, float]:
        t = torch.tensor(draft_sums, dtype=torch.float64, device=self.device)
        if self.dp_size > 1:
            torch.distributed.all_reduce(t, group=self.dp_group)
        out, total_loss, total_w = {}, 0.0, 0.0
        for k, (loss_sum, weight) in enumerate(t.tolist(), start=1):
            out[f"mtp/loss_depth_{k}"] = loss_sum / max(weight, 1.0)
            total_loss, total_w = total_loss + loss_sum, total_w + weight
        out["mtp/loss"] = total_loss / max(total_w, 1.0)
        return out

    # ------------------------------------------------------------------ weights out
    def export_hf_weights(self, dtype: torch.dtype | None = None, *,
                          on_device: bool = False) -> dict[str, torch.Tensor] | None:
        """Full HF-named tensors (draft head included when MTP is on) on the export holder (TP rank 0,
        DP rank 0, first pipeline stage); None elsewhere. Collective over the TP group, then over
        the holder's pipeline (every stage's tensors, renamed to global layer numbers, reach it).
        Host copies by default; ``on_device=True`` returns the tensors where they are (views of
        the parameters where the HF layout allows; for GPU weight sync)."""
        from skyrl_mtp.megatron.export import gather_megatron_state

        state = global_names(gather_megatron_state(self.trunk, self.head, self.bridge, self.tp_group), self.stage)
        if self.tp_rank != 0 or self.dp_rank != 0:
            return None
        state = gather_stages(state, dst_stage=0)
        if not self.holds_export:
            return None
        hf = self.bridge.megatron_to_hf(state)
        if dtype is not None:
            hf = {k: v.to(dtype) for k, v in hf.items()}
        return {k: v.detach() if on_device else v.detach().cpu() for k, v in hf.items()}

    def save_hf_export(self, out_dir: str | Path, *, extras: dict[str, torch.Tensor] | None = None,
                       max_shard_bytes: int | None = None) -> Path | None:
        """Writes the HF checkpoint (bf16 shards + index, config, tokenizer) from the export holder;
        None elsewhere. Collective like :meth:`export_hf_weights`. The tensors stay on the device
        and reach the host one shard at a time: a 7B policy with its optimizer state offloaded
        already fills most of the host, and a host copy of every weight (plus Ray's copy on the way
        to the driver) was what ran the one-H200 rehearsal out of memory at its final export.
        `extras` (the frozen head with MTP off) complete the set."""
        from skyrl_mtp.models.checkpoint import save_hf_checkpoint

        hf = self.export_hf_weights(on_device=True)
        if hf is None:
            return None
        return save_hf_checkpoint(self.model_cfg, {**(extras or {}), **hf}, out_dir, torch_dtype="bfloat16",
                                  tokenizer_from=self.cfg.model_path, max_shard_bytes=max_shard_bytes)

    @property
    def holds_export(self) -> bool:
        """Whether export_hf_weights returns the weights on this rank."""
        return self.tp_rank == 0 and self.dp_rank == 0 and self.stage.first

    def policy_state(self) -> dict[str, torch.Tensor]:
        """This rank's policy parameters (for invariance checks), with global layer numbers."""
        return {k: v.detach().clone().cpu() for k, v in global_names(module_state(self.trunk), self.stage).items()}

    # ------------------------------------------------------------------ checkpoints
    def shard_name(self) -> str:
        return f"model_tp{self.tp_rank}.pt" if self.pp_size == 1 else f"model_tp{self.tp_rank}_pp{self.pp_rank}.pt"

    def optimizer_shard_name(self) -> str:
        return self.shard_name().replace(".pt", f"_dp{self.dp_rank}_optim.pt")

    def save_checkpoint(self, directory: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Writes this model-parallel rank's shard (DP rank 0 only) into `directory`, which the
        caller later renames into place (see skyrl_mtp.trainer.checkpoint): never a half-written latest.
        With the distributed optimizer every DP rank also writes its own optimizer shard
        (:meth:`optimizer_shard_name`): nothing is gathered onto one rank."""
        trunk_shard = _optimizer_shard(self.trunk_opt)
        if trunk_shard is not None:
            head_shard = _optimizer_shard(self.head_opt) if self.head is not None else None
            _save_atomic({"format": CHECKPOINT_FORMAT, "dp_size": self.dp_size, "trunk": trunk_shard, "head": head_shard},
                         Path(directory) / self.optimizer_shard_name())
        if self.dp_rank != 0:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "tp_size": self.cfg.megatron.tp_size,
            "pp_size": self.pp_size,
            "mtp": self.mtp_on,
            "trunk": module_state(self.trunk),
            "trunk_opt": self.trunk_opt.state_dict(),
            "trunk_sched": self.trunk_sched.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            "extra": extra or {},
        }
        if self.head is not None:
            state.update(head=module_state(self.head), head_opt=self.head_opt.state_dict(),
                         head_sched=self.head_sched.state_dict())
        _save_atomic(state, Path(directory) / self.shard_name())

    def load_checkpoint(self, directory: str | Path) -> dict[str, Any]:
        path = Path(directory) / self.shard_name()
        state = _read_checkpoint_file(path)
        if state["tp_size"] != self.cfg.megatron.tp_size:
            raise ValueError(f"{path}: saved with tp_size={state['tp_size']}, "
                             f"this run uses tp_size={self.cfg.megatron.tp_size}")
        if state.get("pp_size", 1) != self.pp_size:
            raise ValueError(f"{path}: saved with pp_size={state.get('pp_size', 1)}, this run uses pp_size={self.pp_size}")
        if state["mtp"] != self.mtp_on:
            raise ValueError(f"{path}: saved with MTP {'on' if state['mtp'] else 'off'}, this run has MTP "
                             f"{'on' if self.mtp_on else 'off'}; keep trainer.mtp.enabled as it was")
        shard = {"trunk": None, "head": None}
        if _distributed_parts(self.trunk_opt):
            shard = _read_checkpoint_file(Path(directory) / self.optimizer_shard_name())
            if shard["dp_size"] != self.dp_size:
                raise ValueError(f"{directory}: optimizer shards written at dp_size={shard['dp_size']}, this run has "
                                 f"dp_size={self.dp_size}; resume with the same megatron.dp_size")
        load_module_state(self.trunk, state["trunk"], what=f"policy trunk from {path}")
        self.trunk_opt.load_state_dict(state["trunk_opt"])
        _load_optimizer_shard(self.trunk_opt, shard["trunk"], path)
        self.trunk_sched.load_state_dict(state["trunk_sched"])
        if self.head is not None:
            load_module_state(self.head, state["head"], what=f"MTP head from {path}")
            self.head_opt.load_state_dict(state["head_opt"])
            _load_optimizer_shard(self.head_opt, shard["head"], path)
            self.head_sched.load_state_dict(state["head_sched"])
        if self.mtp_on:  # the last stage's replica of the embedding the first stage just loaded
            sync_embedding_replica(self.trunk.embedding if self.stage.first else None, self.head_embedding)
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(_as_tuple(state["rng"]["python"]))
        self.step = state["step"]
        return state["extra"]


def _save_atomic(state: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _read_checkpoint_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint shard {path} is missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise ValueError(f"checkpoint shard {path} is corrupted or not a skyrl_mtp checkpoint: {err}") from err
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: checkpoint format {state.get('format')!r}, this version reads {CHECKPOINT_FORMAT}")
    return state


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
