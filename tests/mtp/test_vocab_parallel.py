"""token_logprobs_and_entropy (one TP rank) against a float64 re-implementation: values, the
gradient through the logits, padded vocab columns, temperature, and the caller's logits untouched
(the in-place chain works on a private copy; the same logits are the draft loss's teacher)."""

import pytest
import torch

from skyrl_mtp.mtp.vocab_parallel import token_logprobs_and_entropy


def _reference(logits, targets, vocab_size, temperature):
    x = logits.double()[..., :vocab_size] / temperature
    logp = torch.log_softmax(x, dim=-1)
    p = logp.exp()
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(p * logp).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_float64_reference_with_padded_vocab(dtype, temperature):
    g = torch.Generator().manual_seed(0)
    vocab_size, width = 50, 56  # 6 padded columns, as after padding to a TP multiple
    logits = (torch.randn(3, 7, width, generator=g) * 4).to(dtype)
    logits[..., vocab_size:] = 1e4  # padding must not count, however large
    targets = torch.randint(0, vocab_size, (3, 7), generator=g)
    before = logits.clone()

    leaf = logits.detach().requires_grad_(True)
    logprobs, entropy = token_logprobs_and_entropy(leaf, targets, vocab_size=vocab_size, temperature=temperature)
    weights = torch.randn(3, 7, generator=g)
    (logprobs * weights).sum().backward()

    ref_leaf = logits.detach().double().requires_grad_(True)
    ref_logprobs, ref_entropy = _reference(ref_leaf, targets, vocab_size, temperature)
    (ref_logprobs * weights.double()).sum().backward()

    tol = dict(atol=1e-5, rtol=1e-5)  # computed in fp32 whatever the input dtype
    assert torch.equal(logits, before), "the caller's logits were modified"
    torch.testing.assert_close(logprobs.double(), ref_logprobs.detach(), **tol)
    torch.testing.assert_close(entropy.double(), ref_entropy.detach(), **tol)
    assert entropy.grad_fn is None
    grad = leaf.grad.double()
    torch.testing.assert_close(grad, ref_leaf.grad, atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=1e-2)
    assert torch.all(grad[..., vocab_size:] == 0)


def test_targets_are_checked_against_their_rows():
    # one-hot logits: the target's log-probability is known exactly
    logits = torch.full((1, 2, 4), -1e9)
    logits[0, 0, 1] = 0.0
    logits[0, 1, 3] = 0.0
    logprobs, entropy = token_logprobs_and_entropy(logits, torch.tensor([[1, 2]]), vocab_size=4)
    assert logprobs[0, 0].item() == pytest.approx(0.0, abs=1e-6)
    assert logprobs[0, 1].item() < -1e8
    assert torch.allclose(entropy, torch.zeros(1, 2), atol=1e-6)
