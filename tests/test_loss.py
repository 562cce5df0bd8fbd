"""The LM head's loss from targets (nn/loss.py): the chunked CPU path against the formula and a
float64 computation by hand, through the model and the trainer's use of it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from normlab import ModelConfig, build_model
from normlab.errors import ConfigError
from normlab.nn import fused, loss, reference_norms

needs_kernels = pytest.mark.skipif(fused._cpu_kernels() is None, reason="no C++ compiler: the formula runs")


def _case(n: int = 300, d: int = 24, vocab: int = 50, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen).requires_grad_()
    weight = (0.5 * torch.randn(vocab, d, generator=gen)).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[::7] = -100  # ignored
    return hidden, weight, targets


def _by_hand(hidden, weight, targets):
    """mean over counted t of logsumexp(W h_t) - (W h_t)[y_t], in float64, and its gradients."""
    h, w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    keep = targets != -100
    z = h[keep] @ w.t()
    value = (z.logsumexp(-1) - z[torch.arange(len(z)), targets[keep]]).mean()
    value.backward()
    return value.detach(), h.grad, w.grad


def _with_grads(fn, hidden, weight, targets):
    hidden.grad = weight.grad = None
    value = fn(hidden, weight, targets)
    value.backward()
    return value.detach(), hidden.grad, weight.grad


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 100 logits (2 tokens at vocabulary 50), so that 300 tokens take 150 of them."""
    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", 100)


@needs_kernels
def test_chunked_path_matches_the_formula_and_the_sum_by_hand(small_chunks):
    case = _case()
    chunked = _with_grads(loss.linear_cross_entropy, *case)
    with reference_norms():
        formula = _with_grads(loss.linear_cross_entropy, *case)
    exact = _by_hand(*case)
    for got, want, truth in zip(chunked, formula, exact, strict=True):
        torch.testing.assert_close(got.double(), truth, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert chunked[1][::7].abs().max() == 0  # an ignored token gets no gradient


@needs_kernels
def test_the_chunked_path_runs_only_beyond_one_chunk(small_chunks, monkeypatch):
    """It is the chunked Function that ran (its own grad_fn), and the formula below one chunk."""
    hidden, weight, targets = _case()
    assert "ChunkedLinearCrossEntropy" in type(loss.linear_cross_entropy(hidden, weight, targets).grad_fn).__name__
    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", hidden.shape[0] * weight.shape[0])
    assert "ChunkedLinearCrossEntropy" not in type(loss.linear_cross_entropy(hidden, weight, targets).grad_fn).__name__


def _matmuls(fn) -> int:
    """How many matrix multiplications ``fn()`` runs (torch.profiler)."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return sum(event.name in ("aten::mm", "aten::addmm", "aten::addmm_") for event in prof.events())


@needs_kernels
def test_without_autograd_no_gradient_is_computed(small_chunks):
    """Under no_grad (evaluation) the same loss from one matmul per chunk; with autograd three
    (logits, dL/dh, dL/dW)."""
    hidden, weight, targets = _case()
    chunks = hidden.shape[0] // 2
    assert _matmuls(lambda: loss.linear_cross_entropy(hidden, weight, targets)) == 3 * chunks
    with torch.no_grad():
        value = loss.linear_cross_entropy(hidden, weight, targets)
        assert _matmuls(lambda: loss.linear_cross_entropy(hidden, weight, targets)) == chunks
    torch.testing.assert_close(value.double(), _by_hand(hidden, weight, targets)[0], rtol=1e-5, atol=1e-7)


@needs_kernels
def test_every_target_ignored_gives_nan_like_the_formula(small_chunks):
    hidden, weight, _ = _case()
    targets = torch.full((hidden.shape[0],), -100)
    value = loss.linear_cross_entropy(hidden, weight, targets)
    with reference_norms():
        assert torch.isnan(loss.linear_cross_entropy(hidden, weight, targets))
    assert torch.isnan(value)
    value.backward()
    assert hidden.grad.abs().max() == 0 and weight.grad.abs().max() == 0


@needs_kernels
@pytest.mark.parametrize("tie", [False, True])
def test_model_loss_from_targets_equals_cross_entropy_of_its_logits(small_chunks, tie):
    """model(ids, targets=y).loss, the trainer's loss, against F.cross_entropy of model(ids):
    values and every parameter's gradient (a tied head adds to the embedding's)."""
    cfg = ModelConfig.from_strategy("pre_norm", d_model=32, n_layers=2, n_heads=4, vocab_size=50,
                                    max_seq_len=32, tie_embeddings=tie)
    model = build_model(cfg, seed=0)
    gen = torch.Generator().manual_seed(1)
    ids, targets = (torch.randint(0, 50, (3, 16), generator=gen) for _ in range(2))

    def grads(value):
        model.zero_grad(set_to_none=True)
        value.backward()
        return value.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    ours, ours_grads = grads(model(ids, targets=targets).loss)
    want, want_grads = grads(F.cross_entropy(model(ids).flatten(0, 1).float(), targets.flatten()))
    torch.testing.assert_close(ours, want)
    for name, grad in want_grads.items():
        torch.testing.assert_close(ours_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        assert model(ids, targets=targets).logits is None


@needs_kernels
def test_chunk_size_from_the_environment(monkeypatch):
    """NORMLAB_LOSS_CHUNK_ELEMENTS sets the chunk (what the distributed tests use to force the
    chunked path); a bad value is a ConfigError naming it."""
    hidden, weight, targets = _case()
    monkeypatch.setenv("NORMLAB_LOSS_CHUNK_ELEMENTS", "100")
    assert _matmuls(lambda: loss.linear_cross_entropy(hidden, weight, targets)) == 3 * hidden.shape[0] // 2
    monkeypatch.setenv("NORMLAB_LOSS_CHUNK_ELEMENTS", "0")
    with pytest.raises(ConfigError, match="NORMLAB_LOSS_CHUNK_ELEMENTS"):
        loss.linear_cross_entropy(hidden, weight, targets)


def test_labels_and_targets_together_are_refused():
    model = build_model(ModelConfig.from_strategy("pre_norm", d_model=16, n_layers=1, n_heads=2, vocab_size=20,
                                                  max_seq_len=8))
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="not both"):
        model(ids, labels=ids, targets=ids)
