"""The CUDA path's Triton kernels (normlab.nn.triton_norms) against the eager formulas, run on
CPU tensors by Triton's interpreter; on a CUDA machine also every norm through the dispatch.

The interpreter needs ``TRITON_INTERPRET=1`` before triton is imported (triton's own ``@jit``
helpers such as ``tl.sum`` are decorated then) and must not reach other tests (every Triton
kernel of the process, inductor's and liger-kernel's too, would be interpreted), so
``test_kernels_under_the_interpreter`` runs this file's ``interpreted`` tests in a process with
the variable set from its start; they skip elsewhere. They reach the kernels through the norm
modules, as on CUDA, by pointing the CPU dispatch at the Triton op table.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import subprocess
import sys

import pytest
import torch

import normlab.nn
from normlab.nn import fused
from test_norm_paths import CASES, assert_same, forward_backward, random_norm

pytest.importorskip("triton")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in test_kernels_under_the_interpreter's process")
not_interpreted = pytest.mark.skipif(INTERPRETED, reason="the interpreter's process runs the interpreted tests")

TRITON_CASES = [(kind, call) for kind, call in CASES if kind in ("dyt", "bhyt_star", "bhyt")]
SHAPES = [(37, 48), (3, 7, 200)]  # widths not powers of two; 37 rows: three row blocks, the last partial


@not_interpreted
def test_kernels_under_the_interpreter():
    result = subprocess.run([sys.executable, "-m", "pytest", __file__, "-x", "-q", "-o", "addopts=", "-p",
                             "no:cacheprovider"], env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert re.search(r"\b[1-9]\d* passed", result.stdout.splitlines()[-1]), result.stdout[-1000:]


@pytest.fixture
def triton_on_cpu(monkeypatch):
    """normlab.nn.triton_norms, with CPU calls dispatched to its (interpreted) Triton kernels and
    bf16 parameters taken as on CUDA."""
    from normlab.nn import triton_norms

    monkeypatch.setattr(fused, "_ops", lambda device_type: triton_norms.TRITON_OPS)
    monkeypatch.setitem(fused.PARAM_DTYPES, "cpu", fused.PARAM_DTYPES["cuda"])
    return triton_norms


def ran_triton(y: torch.Tensor) -> bool:
    """Whether one of triton_norms' Functions is in y's autograd graph."""
    nodes, seen = [y.grad_fn], set()
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if getattr(getattr(node, "_forward_cls", None), "__module__", None) == "normlab.nn.triton_norms":
            return True
        nodes += [child for child, _ in node.next_functions]
    return False


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,call", TRITON_CASES)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference(triton_on_cpu, kind, call, dtype, shape):
    """Values and the gradients of x, g and the scalar (lam, alpha; through s2 for the shared
    statistic) against the reference; fp32 within 1e-5, bf16 within 1e-2."""
    call = call or (lambda norm, x: norm(x))
    norm = random_norm(kind, shape[-1])
    x = (2 * torch.randn(shape, generator=torch.Generator().manual_seed(1))).to(dtype)
    y, fast = forward_backward(norm, x, call)
    assert ran_triton(y), "the Triton kernels did not run"
    with fused.reference_norms():
        reference = forward_backward(norm, x, call)[1]
        exact = forward_backward(copy.deepcopy(norm).double(), x.double(), call)[1]
    assert_same(fast, reference, dtype, exact)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_site_with_its_statistic(triton_on_cpu, dtype):
    """(y, s2) from one kernel: the gradients of both outputs combine into dx in the backward."""
    def call(norm, x):
        y, s2 = norm.apply_with_statistic(x)
        return y * (1 + norm.statistic_after_attention(s2, torch.tensor(0.7)))

    norm = random_norm("bhyt", 200)
    x = (2 * torch.randn(37, 200, generator=torch.Generator().manual_seed(2))).to(dtype)
    y, fast = forward_backward(norm, x, call)
    assert ran_triton(y)
    with fused.reference_norms():
        reference = forward_backward(norm, x, call)[1]
        exact = forward_backward(copy.deepcopy(norm).double(), x.double(), call)[1]
    assert_same(fast, reference, dtype, exact)


@interpreted
@pytest.mark.parametrize("s2_shape", [(37, 1), (1, 1)])  # (1, 1): broadcast over the rows
def test_gradient_reaches_a_given_statistic(triton_on_cpu, s2_shape):
    norm = random_norm("bhyt", 48)
    x = torch.randn(37, 48, generator=torch.Generator().manual_seed(3))
    grads = []
    for reference in (False, True):
        s2 = (norm.statistic(x).detach()[: s2_shape[0]] + 0.1).requires_grad_()
        with fused.reference_norms() if reference else contextlib.nullcontext():
            (norm.apply(x, s2) * torch.linspace(-1, 1, 48)).sum().backward()
        grads.append(s2.grad)
    assert grads[0].shape == s2_shape
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


@interpreted
@pytest.mark.parametrize("kind", ["dyt", "bhyt_star"])
def test_bf16_parameters_compute_in_fp32(triton_on_cpu, kind):
    """FSDP's mixed precision: bf16 x and parameters; y and the gradients in bf16, as the reference's."""
    norm = random_norm(kind, 200).to(torch.bfloat16)
    x = (2 * torch.randn(3, 7, 200, generator=torch.Generator().manual_seed(4))).to(torch.bfloat16)
    call = lambda norm, x: norm(x)  # noqa: E731
    y, fast = forward_backward(norm, x, call)
    assert ran_triton(y)
    with fused.reference_norms():
        reference = forward_backward(norm, x, call)[1]
        exact = forward_backward(copy.deepcopy(norm).double(), x.double(), call)[1]
    assert_same(fast, reference, torch.bfloat16, exact)


@interpreted
def test_tanh_is_accurate_everywhere(triton_on_cpu):
    """tanh inside the kernels (DyT with alpha = g = 1) within 2 fp32 ulps of 1 absolute, and
    relative near 0, from 1e-6 to saturation."""
    z = torch.cat([torch.linspace(-12, 12, 4001), torch.tensor([-1e4, -50.0, -1e-6, 0.0, 1e-6, 3e-3, 50.0, 1e4])])
    y = triton_on_cpu.TRITON_OPS["dyt"](z.view(-1, 1), torch.ones(1), torch.ones(1)).view(-1)
    want = torch.tanh(z.double())
    assert torch.isfinite(y).all()
    assert (y.double() - want).abs().max() <= 2.4e-7
    small = z.abs() < 0.625
    assert ((y.double() - want)[small].abs() <= 2.4e-7 * want[small].abs()).all()


VARIANTS = {"forward": [{"STATISTIC": False, "EXACT": False}, {"STATISTIC": True, "EXACT": False},
                        {"STATISTIC": True, "EXACT": True}],
            "backward": [{"STATISTIC": False, "EXACT": False, "HAS_DS2_OUT": False},
                         {"STATISTIC": True, "EXACT": False, "HAS_DS2_OUT": False},
                         {"STATISTIC": True, "EXACT": True, "HAS_DS2_OUT": False},
                         {"STATISTIC": True, "EXACT": True, "HAS_DS2_OUT": True}]}


@not_interpreted
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_kernels_compile_for_a_gpu(dtype):
    """Every kernel variant compiles to sm_90 machine code, no GPU needed: the interpreter runs
    some programs the compiler rejects."""
    from triton import compile as compile_kernel
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from normlab.nn import triton_norms

    kernels = {"forward": triton_norms._tanh_norm_forward, "backward": triton_norms._tanh_norm_backward}
    tensors = {"X", "DY", "DX", "G", "SCALE"}  # in x's or the parameters' dtype; the rest fp32
    block_d, rows, warps = triton_norms._tiling(200)
    for direction, kernel in kernels.items():
        for flags in VARIANTS[direction]:
            constexprs = {**flags, "ROWS": rows, "BLOCK_D": block_d}
            signature = {name: "constexpr" if name in constexprs else "i32" if name in ("n_rows", "D")
                         else "fp32" if name in ("eps", "inv_kappa") else f"*{dtype if name in tensors else 'fp32'}"
                         for name in kernel.arg_names}
            compiled = compile_kernel(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                                      options=triton_norms._launch(warps))
            assert compiled.asm["cubin"], (direction, flags)


@not_interpreted
def test_without_triton_cuda_runs_the_formulas_after_one_warning(monkeypatch):
    monkeypatch.setattr(fused, "KERNELS", {k: v for k, v in fused.KERNELS.items() if k != "cuda"})
    monkeypatch.setitem(sys.modules, "normlab.nn.triton_norms", None)  # importing it raises ImportError
    monkeypatch.delattr(normlab.nn, "triton_norms", raising=False)  # (once imported, the package holds it)
    with pytest.warns(UserWarning, match="Triton norm kernels unavailable"):
        assert fused._ops("cuda") is None
    assert fused._ops("cuda") is None  # decided once


@not_interpreted
def test_cpu_users_do_not_import_triton():
    code = ("import sys, torch, normlab; from normlab.nn import make_norm; from normlab import ModelConfig; "
            "make_norm('bhyt_star', 8, ModelConfig(), 'attn')(torch.randn(2, 8)).sum().backward(); "
            "sys.exit('triton' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


@not_interpreted
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,call", CASES)
def test_cuda_dispatch_matches_reference(kind, call, dtype):
    """Every norm on CUDA through the dispatch (Triton; liger-kernel's RMSNorm when installed)."""
    call = call or (lambda norm, x: norm(x))
    norm = random_norm(kind, 200).cuda()
    x = (2 * torch.randn(4, 9, 200, generator=torch.Generator().manual_seed(5))).to(dtype).cuda()
    y, fast = forward_backward(norm, x, call)
    assert ran_triton(y) == (kind in ("dyt", "bhyt_star", "bhyt"))
    with fused.reference_norms():
        reference = forward_backward(norm, x, call)[1]
        exact = forward_backward(copy.deepcopy(norm).double(), x.double(), call)[1]
    assert_same([t.cpu() for t in fast], [t.cpu() for t in reference], dtype, [t.cpu() for t in exact])


@not_interpreted
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_loss_beyond_one_chunk_matches_the_formula(monkeypatch):
    """The LM head's loss on CUDA past one chunk of logits (liger-kernel's fused linear
    cross-entropy): value and gradients against the formula, fp32."""
    pytest.importorskip("liger_kernel")
    from normlab.nn import loss

    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", 1000)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(300, 64, generator=gen).cuda().requires_grad_()
    weight = (0.3 * torch.randn(500, 64, generator=gen)).cuda().requires_grad_()
    targets = torch.randint(0, 500, (300,), generator=gen).cuda()
    targets[::7] = -100

    def value_and_grads():
        hidden.grad = weight.grad = None
        value = loss.linear_cross_entropy(hidden, weight, targets)
        value.backward()
        return [value.detach().cpu(), hidden.grad.cpu(), weight.grad.cpu()], type(value.grad_fn).__name__

    fast, ran = value_and_grads()
    assert "Liger" in ran
    with fused.reference_norms():
        reference, _ = value_and_grads()
    for got, want in zip(fast, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
