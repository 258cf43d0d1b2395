"""Pipeline stages: Megatron's micro-batch schedule, per-stage tensor names, and what crosses stages.

Owns everything the policy worker needs to run with ``megatron.pp_size`` >= 1:

- :func:`run_schedule` drives the micro-batches through Megatron's
  ``get_forward_backward_func()`` (1F1B across stages when pp_size > 1, the plain loop at
  pp_size 1), with the loss the objective returns reaching backward unchanged;
- :class:`StageLayout`: where this rank sits (first / last stage, which decoder layers it holds);
- :func:`stage_state` / :func:`global_names`: a full Megatron state dict (global layer numbers)
  cut to this stage's modules, and back;
- :func:`sync_embedding_replica`: the MTP head lives on the last stage (Megatron's placement)
  but re-embeds the shifted tokens with the trunk's word embedding, which lives on the first:
  the last stage keeps a frozen replica, refreshed from the first stage after every policy step;
- :func:`gather_stages`: every stage's tensors to one rank (HF export, weight sync);
- :func:`scope_grad_stats` / :func:`join_optimizer_build`: an optimizer for a module on one stage
  only (the head's), whose statistics and construction must not involve the other stages' ranks;
- :func:`check_pipeline_layout`: the layouts this is implemented and tested for.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


@dataclass(frozen=True)
class StageLayout:
    """This rank's pipeline stage: which parts of the trunk it builds and holds."""

    pp_rank: int = 0
    pp_size: int = 1
    layer_offset: int = 0  # global index of this stage's first decoder layer
    num_layers: int = 0  # decoder layers on this stage

    @property
    def first(self) -> bool:
        return self.pp_rank == 0

    @property
    def last(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def current_stage() -> tuple[int, int]:
    """(pipeline rank, pipeline size) of this process, from Megatron's parallel state."""
    from megatron.core import parallel_state

    return (parallel_state.get_pipeline_model_parallel_rank(),
            parallel_state.get_pipeline_model_parallel_world_size())


def stage_of(trunk: torch.nn.Module) -> StageLayout:
    """The layout of a built trunk: Megatron numbers its layers globally (``layer_number``, from 1)."""
    pp_rank, pp_size = current_stage()
    if pp_size == 1:  # the whole trunk (any family's module layout)
        return StageLayout()
    layers = trunk.decoder.layers
    offset = layers[0].layer_number - 1 if len(layers) else 0
    return StageLayout(pp_rank=pp_rank, pp_size=pp_size, layer_offset=offset, num_layers=len(layers))


def check_pipeline_layout(model_cfg, pp_size: int) -> None:
    """What pipeline parallel supports: the mimo family (the stage cut in stage_state follows its
    tensor names), untied embeddings (every preset; a tied model's first/last-stage copy of the
    embedding is not tested), the decoder split evenly, as Megatron splits it."""
    if pp_size == 1:
        return
    family = getattr(model_cfg, "family", "mimo")
    if family != "mimo":
        raise ValueError(f"megatron.pp_size={pp_size} with a {family} model: pipeline parallel is implemented for the "
                         "mimo family only; use pp_size=1 (tensor and data parallel work)")
    if model_cfg.tie_word_embeddings:
        raise ValueError(f"megatron.pp_size={pp_size} with tied word embeddings (tie_word_embeddings=true): not "
                         "tested with pipeline stages; use pp_size=1 or an untied checkpoint")
    if model_cfg.num_layers % pp_size:
        raise ValueError(f"megatron.pp_size={pp_size}: the model's {model_cfg.num_layers} decoder layers do not split "
                         f"evenly over {pp_size} pipeline stages; use a pp_size that divides {model_cfg.num_layers}")


def _is_stage_key(name: str, stage: StageLayout) -> bool:
    match = _LAYER.match(name)
    if match:
        return stage.layer_offset <= int(match.group(1)) < stage.layer_offset + stage.num_layers
    if name.startswith("embedding."):
        return stage.first
    if name.startswith("decoder.final_layernorm."):
        return stage.last
    if name == "output_layer.weight":
        return stage.last
    return False


def stage_state(full: dict[str, torch.Tensor], stage: StageLayout) -> dict[str, torch.Tensor]:
    """This stage's trunk tensors in its modules' own (local) names, from a full trunk state dict
    with global layer numbers (at pp_size 1: all of it)."""
    if stage.pp_size == 1:
        return dict(full)
    out = {}
    for name, tensor in full.items():
        if not _is_stage_key(name, stage):
            continue
        match = _LAYER.match(name)
        if match:
            name = f"decoder.layers.{int(match.group(1)) - stage.layer_offset}.{match.group(2)}"
        out[name] = tensor
    return out


def global_names(local: dict[str, Any], stage: StageLayout) -> dict[str, Any]:
    """The inverse renaming: this stage's layer indices -> global ones (other names unchanged)."""
    if stage.pp_size == 1:
        return dict(local)
    out = {}
    for name, value in local.items():
        match = _LAYER.match(name)
        if match:
            name = f"decoder.layers.{int(match.group(1)) + stage.layer_offset}.{match.group(2)}"
        out[name] = value
    return out


@contextmanager
def _loss_reaches_backward_unchanged(config):
    # The schedule divides what a loss function returns by the number of micro-batches (and, for
    # a (loss, num_tokens, data) triple, by the token count) unless calculate_per_token_loss is
    # set. The RL objective already divides by global token / sequence counts
    # (skyrl_mtp.workers.objective), so its loss must reach backward as returned: a division
    # and the matching multiplication would not round-trip bitwise. The flag is read by the
    # schedule in forward_step_calc_loss and when calling finalize_model_grads_func (never set
    # here); Megatron DDP read it once, at construction, so it is set only while the schedule runs.
    saved = config.calculate_per_token_loss
    config.calculate_per_token_loss = True
    try:
        yield
    finally:
        config.calculate_per_token_loss = saved


def run_schedule(model: torch.nn.Module, microbatches: list[dict[str, torch.Tensor]],
                 forward: Callable[[dict[str, torch.Tensor]], Any],
                 loss: Callable[[Any], tuple[torch.Tensor, dict]], *, forward_only: bool) -> list[dict]:
    """Runs every micro-batch through Megatron's schedule; returns, on the last stage, what
    ``loss`` returned as data for each micro-batch in order (an empty list on other stages).

    ``forward(mb)`` runs the model on one micro-batch (the same call on every stage: Megatron
    feeds a later stage the previous stage's output); ``loss(output)`` is called on the last
    stage only and returns (the scalar to differentiate, data to keep). Without forward_only
    the gradients are left in the DDP buffers, not yet reduced over data-parallel ranks.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    if not microbatches:
        raise ValueError("run_schedule got no micro-batches")
    config = get_model_config(model)
    seq = max(mb["input_ids"].shape[1] for mb in microbatches)
    # Stages exchange tensors of one fixed shape unless variable_seq_lengths is set; packed
    # micro-batches (skyrl_mtp.workers.packing) differ in length, which one stage alone takes.
    if (current_stage()[1] > 1 and not config.variable_seq_lengths
            and any(mb["input_ids"].shape[1] != seq for mb in microbatches)):
        raise ValueError("all micro-batches of one pipeline schedule must have the same sequence length")
    it = iter(microbatches)

    def loss_func(output):
        value, data = loss(output)
        # The token count is only used when Megatron scales gradients itself (not here).
        return value, torch.zeros((), dtype=torch.int), data

    def step(data_iterator, _model):
        return forward(next(data_iterator)), loss_func

    with _loss_reaches_backward_unchanged(config):
        return get_forward_backward_func()(
            forward_step_func=step, data_iterator=it, model=[model], num_microbatches=len(microbatches),
            seq_length=seq, micro_batch_size=microbatches[0]["input_ids"].shape[0], forward_only=forward_only)


def finalize_grads(ddp_model: torch.nn.Module) -> None:
    """After a schedule: Megatron's gradient finalisation (reduction over data-parallel ranks; the
    all-reduces it adds for layouts this project refuses, e.g. tied embeddings over stages, find
    nothing to do)."""
    from megatron.core.distributed import finalize_model_grads

    finalize_model_grads([ddp_model], num_tokens=None)


def sync_embedding_replica(source: torch.nn.Module | None, replica: torch.nn.Module | None) -> None:
    """Copies the first stage's word embedding into the last stage's frozen replica (broadcast
    over Megatron's embedding group: the first and last stage of one pipeline, same TP rank).
    Every first- and last-stage rank calls it; other stages return at once."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return
    if not parallel_state.is_rank_in_embedding_group(ignore_virtual=True):
        return
    tensor = (source if source is not None else replica).word_embeddings.weight
    with torch.no_grad():
        torch.distributed.broadcast(tensor.data, src=parallel_state.get_pipeline_model_parallel_first_rank(),
                                    group=parallel_state.get_embedding_group())


def gather_stages(local: dict[str, torch.Tensor], *, dst_stage: int = 0) -> dict[str, torch.Tensor] | None:
    """Every pipeline stage's tensors (distinct names) on stage ``dst_stage``; None on the others.
    Collective over this rank's pipeline group: names and shapes travel first as objects, then
    the tensors point to point, in one order on every rank."""
    from megatron.core import parallel_state

    group = parallel_state.get_pipeline_model_parallel_group()
    size = torch.distributed.get_world_size(group)
    if size == 1:
        return dict(local)
    me = torch.distributed.get_rank(group)
    specs = [(name, tuple(t.shape), t.dtype) for name, t in sorted(local.items())]
    all_specs: list[Any] = [None] * size
    torch.distributed.all_gather_object(all_specs, specs, group=group)
    dst = torch.distributed.get_global_rank(group, dst_stage)
    out = dict(local) if me == dst_stage else None
    device = next(iter(local.values())).device if local else torch.device("cpu")
    for stage, stage_specs in enumerate(all_specs):
        if stage == dst_stage:
            continue
        src = torch.distributed.get_global_rank(group, stage)
        for name, shape, dtype in stage_specs:
            if me == stage:
                torch.distributed.send(local[name].detach().contiguous(), dst=dst, group=group)
            elif me == dst_stage:
                if name in out:
                    raise RuntimeError(f"pipeline stages {dst_stage} and {stage} both hold tensor {name}")
                buf = torch.empty(shape, dtype=dtype, device=device)
                torch.distributed.recv(buf, src=src, group=group)
                out[name] = buf
    return out



def scope_grad_stats(optimizer, *, distributed_optimizer: bool) -> None:
    """Reduce an optimizer's gradient statistics (the norm it clips by, found-inf) over the ranks
    of this pipeline stage only, for a module that exists on one stage (the MTP head): its TP
    ranks, or its TP x DP ranks with the distributed optimizer, whose shards span DP. At
    pp_size 1 these are the groups Megatron picks itself."""
    from megatron.core import parallel_state

    group = (parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True) if distributed_optimizer
             else parallel_state.get_tensor_model_parallel_group())
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not hasattr(opt, "grad_stats_parallel_group"):
            raise RuntimeError(f"{type(opt).__name__} has no grad_stats_parallel_group: this megatron-core reduces "
                               "gradient statistics differently; the MTP head's optimizer on the last pipeline "
                               "stage needs its own group (skyrl_mtp.megatron.pipeline.scope_grad_stats)")
        opt.grad_stats_parallel_group = group


def join_optimizer_build(make_optimizer: Callable[[torch.nn.Module], Any], dtype: torch.dtype) -> None:
    """On a stage without the module another stage builds a Megatron optimizer for (the MTP
    head): take part in that build and keep nothing. get_megatron_optimizer aligns parameter
    groups over *all* ranks (all_gather_object on the default group, once per parameter kind), so
    every rank must run it; building it here for a one-element stand-in makes exactly the same
    collectives whatever their number in the installed megatron-core."""
    from skyrl_mtp.megatron.model_builder import build_device

    stand_in = torch.nn.Linear(1, 1, bias=False).to(device=build_device(), dtype=dtype)
    make_optimizer(stand_in)
