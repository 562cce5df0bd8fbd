"""The fused CPU norm kernels (normlab.nn.fused) against the eager formulas, the reference."""

from __future__ import annotations

import contextlib
import copy
import shutil

import pytest
import torch

from normlab import ModelConfig, build_model
from normlab.nn import fused
from normlab.nn.attention import apply_rope, rope_tables
from normlab.nn.norms import fast_elementwise
from normlab.nn.registry import is_norm, make_norm

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
CFG = ModelConfig(vocab_size=50, d_model=48, n_layers=2, n_heads=4, max_seq_len=16)

needs_kernels = pytest.mark.skipif(fused._cpu_kernels() is None, reason="no C++ compiler: the reference runs")


def random_norm(kind: str, dim: int, site: str = "attn", seed: int = 0):
    """A norm of ``kind`` whose every parameter is perturbed, so a wrong gradient term shows."""
    norm = make_norm(kind, dim, CFG, site)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in norm.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return norm


def forward_backward(norm, x: torch.Tensor, call):
    """(output, grad of x, grads of the parameters) of sum(output * a fixed ramp)."""
    x = x.detach().clone().requires_grad_()
    norm.zero_grad(set_to_none=True)
    y = call(norm, x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1], device=y.device)).sum().backward()
    return y, [y.detach(), x.grad] + [p.grad for p in norm.parameters()]


def assert_same(fast, reference, dtype, exact=None):
    """fast within the dtype's tolerance of reference, or, where the reference's own rounding
    exceeds that (a scalar's gradient summed with cancellation; DyT's tanh in bf16), about as
    close to ``exact``, the fp64 result, as the reference (within 3x its error: the two sum in
    different orders)."""
    tol = TOLERANCE[dtype]
    for i, (got, want) in enumerate(zip(fast, reference, strict=True)):
        assert got.dtype == want.dtype and got.shape == want.shape
        scale = want.abs().max().item()
        if exact is not None and (got.double() - want.double()).abs().max() > tol * scale:
            truth = exact[i]
            assert (got.double() - truth).abs().max() <= 3 * (want.double() - truth).abs().max()
        else:
            torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * scale)


def shared_statistic(norm, x):
    """The BHyT block's path: s2 = ms(x), then apply(x, s2); the gradient reaches x through s2 too."""
    return norm.apply(x, norm.statistic(x))


def shared_statistic_after_attention(norm, x):
    """The FFN site's s2_hat = s2 + c_attn * sg(lam)^2 / kappa^2, s2 from the same x."""
    return norm.apply(x, norm.statistic_after_attention(norm.statistic(x), torch.tensor(0.7)))


CASES = [("rmsnorm", None), ("dyt", None), ("bhyt_star", None), ("bhyt", None),
         ("bhyt", shared_statistic), ("bhyt", shared_statistic_after_attention)]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,call", CASES)
@pytest.mark.parametrize("shape", [(3, 5, 48), (7, 4, 16)])  # (7, 4, 16): Q/K/V norms act per head
def test_fast_path_matches_reference(kind, call, dtype, shape):
    call = call or (lambda norm, x: norm(x))
    norm = random_norm(kind, shape[-1])
    x = (2 * torch.randn(shape, generator=torch.Generator().manual_seed(1))).to(dtype)
    y, fast = forward_backward(norm, x, call)
    assert type(y.grad_fn).__qualname__.startswith("_"), "the fast path did not run"
    with fused.reference_norms():
        y, reference = forward_backward(norm, x, call)
        exact = forward_backward(copy.deepcopy(norm).double(), x.double(), call)[1]
    assert not type(y.grad_fn).__qualname__.startswith("_")
    assert_same(fast, reference, dtype, exact)


@needs_kernels
def test_gradient_reaches_a_shared_statistic_as_in_the_reference():
    norm = random_norm("bhyt", 32)
    x = torch.randn(6, 32)
    grads = []
    for reference in (False, True):
        s2 = norm.statistic(x).detach().requires_grad_()
        with fused.reference_norms() if reference else contextlib.nullcontext():
            (norm.apply(x, s2) * torch.linspace(-1, 1, 32)).sum().backward()
        grads.append(s2.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_site_with_its_statistic_matches_reference(dtype):
    """apply_with_statistic: (y, s2) from one kernel; the gradients of both outputs (s2 also
    feeds the FFN site in a block) reach x, lam and g as in statistic-then-apply."""
    def call(norm, x):
        y, s2 = norm.apply_with_statistic(x)
        return y * (1 + norm.statistic_after_attention(s2, torch.tensor(0.7)))

    norm = random_norm("bhyt", 48)
    x = (2 * torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(2))).to(dtype)
    y, fast = forward_backward(norm, x, call)
    assert type(y.grad_fn.next_functions[0][0]).__qualname__.startswith("_BHyTWithStatistic")
    with fused.reference_norms():
        reference = forward_backward(norm, x, call)[1]
        exact = forward_backward(copy.deepcopy(norm).double(), x.double(), call)[1]
    assert_same(fast, reference, dtype, exact)


def test_fp64_and_reference_switch_run_the_formulas():
    norm = make_norm("rmsnorm", 8, CFG, "attn").double()
    assert not type(norm(torch.randn(2, 8, dtype=torch.float64, requires_grad=True)).grad_fn).__qualname__.startswith("_")
    with fused.reference_norms():
        assert not fused.FastPath.takes(torch.randn(2, 8))


def test_without_kernels_the_reference_runs(monkeypatch):
    monkeypatch.setitem(fused.KERNELS, "cpu", None)
    norm = random_norm("dyt", 8)
    x = torch.randn(3, 8)
    with fused.reference_norms():
        want = norm(x)
    torch.testing.assert_close(norm(x), want, rtol=0, atol=0)


@needs_kernels
def test_double_backward_is_refused_on_the_fast_path():
    norm = random_norm("rmsnorm", 8)
    x = torch.randn(3, 8, requires_grad=True)
    (grad,) = torch.autograd.grad(norm(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()


def grads_of(fn, *inputs: torch.Tensor, reference: bool):
    """(output, grads of the inputs) of sum(fn(*inputs) * fixed random weights), on one path."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    with fused.reference_norms() if reference else contextlib.nullcontext():
        y = fn(*inputs)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(7)))
    return [y.detach()] + [t.grad for t in inputs]


@needs_kernels
@pytest.mark.parametrize("heads_first", [True, False])
def test_fused_rope_matches_the_formula(heads_first):
    """x (B, H, T, d) as attention makes it (a transposed view of (B, T, H, d)) or contiguous;
    the rotation by hand: [a, b] -> [a cos - b sin, b cos + a sin] on the two halves."""
    batch, seq, heads, dim = 2, 9, 3, 8
    cos, signed_sin = rope_tables(dim, 16, 10000.0)
    cos, signed_sin = cos[:seq], signed_sin[:seq]
    x = torch.randn(batch, seq, heads, dim).transpose(1, 2)
    x = x if heads_first else x.contiguous()

    def rope(t):
        return apply_rope(t, cos, signed_sin)

    assert fast_elementwise("rope", x, cos, signed_sin) is not None
    fast, reference = grads_of(rope, x, reference=False), grads_of(rope, x, reference=True)
    assert fast[0].stride() == x.stride()  # SDPA gets the layout it got before
    half = dim // 2
    angle_cos, angle_sin = cos[:, :half], signed_sin[:, half:]
    a, b = x[..., :half], x[..., half:]
    by_hand = torch.cat([a * angle_cos - b * angle_sin, b * angle_cos + a * angle_sin], -1)
    torch.testing.assert_close(fast[0], by_hand, rtol=1e-6, atol=1e-6)
    for got, want in zip(fast, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@needs_kernels
def test_fused_swiglu_matches_the_formula():
    gate, up = 4 * torch.randn(5, 7, 40), torch.randn(5, 7, 40)  # |gate| up to ~15: both tails of silu
    fast = grads_of(fused.CPU_OPS["swiglu"], gate, up, reference=False)
    reference = grads_of(lambda g, u: torch.nn.functional.silu(g) * u, gate, up, reference=True)
    for got, want in zip(fast, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_rope_and_swiglu_take_the_formulas_off_the_cpu_fp32_path():
    x, table = torch.randn(1, 2, 3, 4), torch.randn(3, 4)
    assert fast_elementwise("rope", x, table, table) is not None
    assert fast_elementwise("rope", x.double(), table.double(), table.double()) is None
    assert fast_elementwise("swiglu", x.bfloat16(), x.bfloat16()) is None
    with fused.reference_norms():
        assert fast_elementwise("swiglu", x, x) is None
    one_row = torch.randn(1, 4)  # a table that broadcasts over positions: the formula's job, not the kernel's
    with fused.reference_norms():
        broadcast = apply_rope(x, one_row, one_row)
    torch.testing.assert_close(apply_rope(x, one_row, one_row), broadcast, rtol=0, atol=0)


@pytest.mark.parametrize("strategy", ["pre_norm", "hybridnorm", "peri_norm", "dyt", "bhyt", "bhyt_star"])
def test_model_loss_and_gradients_match_reference(strategy):
    """Whole models (hybridnorm: Q/K/V norms per head), every norm on the fast path."""
    model = build_model(ModelConfig.from_strategy(strategy, vocab_size=50, d_model=32, n_layers=3, n_heads=4,
                                                  n_kv_heads=2, max_seq_len=16), seed=0)
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for reference in (False, True):
        model.zero_grad(set_to_none=True)
        with fused.reference_norms() if reference else contextlib.nullcontext():
            loss = model(ids, labels=ids).loss
            loss.backward()
        results.append([loss.detach()] + [p.grad for p in model.parameters()])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_hooks_see_the_fast_outputs():
    model = build_model(ModelConfig.from_strategy("dyt", vocab_size=50, d_model=32, n_layers=2, n_heads=4,
                                                  max_seq_len=16), seed=0)
    seen = []
    for module in model.modules():
        if is_norm(module):
            module.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    model(torch.zeros(1, 4, dtype=torch.long))
    assert len(seen) == sum(1 for m in model.modules() if is_norm(m))


@pytest.mark.parametrize("strategy", ["pre_norm", "bhyt"])
def test_same_seed_gives_the_same_loss_curve_on_both_paths(strategy):
    def curve(reference: bool) -> list[float]:
        model = build_model(ModelConfig.from_strategy(strategy, vocab_size=50, d_model=32, n_layers=2, n_heads=4,
                                                      max_seq_len=16), seed=3)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(4)
        losses = []
        with fused.reference_norms() if reference else contextlib.nullcontext():
            for _ in range(8):
                ids = torch.randint(0, 50, (4, 16), generator=gen)
                loss = model(ids, labels=ids).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
        return losses

    fast = curve(False)
    assert fast == curve(False)  # the kernels are deterministic for a fixed thread count
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(curve(True)), rtol=1e-5, atol=0)


@pytest.mark.skipif(not any(map(shutil.which, ("g++", "c++", "clang++"))), reason="inductor needs a C++ compiler")
def test_compiled_model_matches_the_fast_eager_path():
    """``train.compile: true``: torch.compile traces the formulas (the kernels step aside while
    compiling) and inductor fuses them; the whole model's loss (through the trainer's
    ``targets`` path: chunked head and loss) and every gradient agree with the eager fast path.
    BHyT: its shared statistic, the FFN site's s2_hat and the c_attn buffer go through the graph."""
    model = build_model(ModelConfig.from_strategy("bhyt", vocab_size=50, d_model=32, n_layers=2, n_heads=4,
                                                  n_kv_heads=2, max_seq_len=16), seed=0)
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for forward in (model, torch.compile(model)):
        model.zero_grad(set_to_none=True)
        loss = forward(ids, targets=ids).loss
        loss.backward()
        results.append([loss.detach()] + [p.grad for p in model.parameters()])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
