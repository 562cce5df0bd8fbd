"""Fast paths of the norm types and their dispatch per device. On the CPU: one C++ kernel per
norm for the forward and one for the backward pass (``fused_norms.cpp``), each reading a row of
x and dy once and writing a row of y or dx once, with hand-derived gradients for x, the gains,
the scalars alpha / lam and BHyT's s2. On CUDA: ``triton_norms`` (imported on the first CUDA
call). The CPU extension also fuses the block's other elementwise work: RoPE (one pass instead of mul,
roll and addcmul, each way) and SwiGLU's silu(gate) * up (one pass instead of two forward,
three backward); together they made a train step about 5% faster (with / without them, idle
machine, 195 GFLOP/s: 0.951 on bench config B, d 64 and 16 layers; 0.954 on config A, d 256).

Why a C++ extension (measured on a busy 2-core CPU, fp32, forward+backward as a fraction of
copy bandwidth, 2.5 x time(dst.copy_(src)) / time(norm), medians of alternated rounds):
``F.rms_norm`` is a composite of about 10 ATen ops on the CPU (0.03-0.16 at (4096, 512)); an
``autograd.Function`` over eager ops is no better (0.04: still one pass per op);
``torch.compile`` of the norm alone reached 0.25 but costs 17 s per process plus about 4 s per
new shape, which every ``make demo`` worker and test process would pay. These kernels cost one
build per machine (about 25 s of CPU time, a minute of wall time on a loaded machine; then
0.03 s to load); the README's Benchmarks section has their measured fractions (idle machine,
175 GFLOP/s: 0.26-0.59 at (4096, 512), where the copy runs from cache and DyT/BHyT are bound by
their tanh arithmetic, and 0.65-0.80 at (4096, 2048), against 0.05-0.13 for the formulas).

At (4096, 2048) the fresh 32 MiB outputs used to come from mmap, and page faults bounded the time
as much as the kernels did; since normlab keeps freed host memory
(``device.keep_freed_host_memory``) the fused RMSNorm went from 0.15 to 0.75-0.81 there. The
kernels are built for the CPU's vector width: AVX2 and FMA, and 512-bit AVX-512 where torch
reports that capability, which moved DyT from 0.26 to 0.40 and BHyT* from 0.20 to 0.33 at
(4096, 512) and DyT from 0.53 to 0.75 at (4096, 2048) (AVX-512 EPYC, 2 threads, ~185 GFLOP/s,
consecutive runs).

LayerNorm has no kernel here: ATen's ``F.layer_norm`` is already one fused pass each way, and a
kernel of the same kind measured no faster (fraction of copy bandwidth, ATen / ours, idle
machine: 0.41 / 0.48 and 0.66 / 0.48 at (4096, 512) and (4096, 2048) in one run, 0.55 / 0.52 and
0.72 / 0.68 in another), so LayerNorm runs its formula on every device.

The norm modules in ``norms.py`` ask ``FastPath.kernel(op, x, *params)`` for the kernel of
their call on x's device (the op tables: ``CPU_OPS`` here; on CUDA ``triton_norms.OPS``: Triton
kernels for DyT and BHyT, liger-kernel's RMSNorm when installed, no kernel for LayerNorm and
ms(x) alone) and run their own formulas when there is none; those formulas stay the reference:

- ``with reference_norms():`` or ``NORMLAB_NORMS=reference`` in the environment selects them,
  on every device;
- fp64 (gradient checks), CPU autocast, ``torch.compile`` tracing (inductor fuses the formulas
  itself) and ``torch.func`` transforms run the reference; CUDA autocast does not (the residual
  stream stays fp32 under it; the kernels compute in fp32 whatever the dtype);
- bf16 inputs are converted to fp32 around the fp32 CPU kernels (statistics are fp32 either
  way); on CUDA the kernels load bf16 x and bf16 parameters (FSDP's mixed precision) as they are;
- without triton on a CUDA machine the CUDA norms run the reference after one warning
  (``pip install 'normlab[gpu]'``);
- the backward passes are ``once_differentiable``: double backward raises an error (run it
  under ``reference_norms()``);
- a subclass that overrides ``argument``, ``apply`` or ``mean_square`` must override
  ``forward`` too (the fused forward does not call them).

The extension is compiled on first use by ``torch.utils.cpp_extension`` (a C++ compiler and
``ninja``) and cached per CPU capability, torch version and hash of source and flags in ``TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``); concurrent processes wait on the build's lock. When it cannot be
built, every norm runs the reference after one warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import warnings
from pathlib import Path

import torch

from normlab.nn import norms
from normlab.nn.loss import chunked_linear_cross_entropy

SOURCE = Path(__file__).with_name("fused_norms.cpp")

#: device type -> the loaded kernels (CPU: the C++ extension; CUDA: ``normlab.nn.triton_norms``),
#: or None once loading failed
KERNELS: dict[str, object | None] = {}

#: the CUDA op table that ``cuda_kernels`` chose, or None: ``triton_norms.OPS``
_cuda_ops: dict | None = None

_reference_only = os.environ.get("NORMLAB_NORMS", "fast") == "reference"


@contextlib.contextmanager
def reference_norms():
    """Run the eager reference formulas (every norm, RoPE, SwiGLU, the LM head's loss) inside
    the block."""
    global _reference_only
    before, _reference_only = _reference_only, True
    try:
        yield
    finally:
        _reference_only = before


@contextlib.contextmanager
def cuda_kernels(ops: dict):
    """Run the CUDA norms on ``ops`` (op -> function, e.g. ``triton_norms.TRITON_OPS`` or
    ``LIGER_OPS``) inside the block, the ops it lacks on their formulas: the bench's explicit
    'triton' and 'liger' paths."""
    global _cuda_ops
    before, _cuda_ops = _cuda_ops, ops
    try:
        yield
    finally:
        _cuda_ops = before


def _put_ninja_on_path() -> None:
    """torch runs ``ninja`` from PATH; a venv's own (the ``ninja`` package, a normlab
    dependency) is not on it unless the venv is activated, so add its directory."""
    if shutil.which("ninja") is None:
        with contextlib.suppress(ImportError):
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _cpu_kernels():
    """The compiled extension (built on first call), or None with one warning when it cannot be."""
    if "cpu" not in KERNELS:
        from torch.utils import cpp_extension

        capability = torch.backends.cpu.get_cpu_capability().lower()
        torch_version = re.sub(r"\W", "_", torch.__version__)
        flags = ["-O3", "-fopenmp", "-fno-trapping-math"]
        flags += ["-mavx2", "-mfma"] if capability in ("avx2", "avx512") else []
        if capability == "avx512":
            flags += ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mprefer-vector-width=512"]
        _put_ninja_on_path()
        # the source's hash in the name: two checkouts with different sources keep one build each
        # (with one name they would rebuild over each other on every alternation)
        source_hash = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:12]
        try:
            KERNELS["cpu"] = cpp_extension.load(
                name=f"normlab_fused_norms_{capability}_torch{torch_version}_{source_hash}",
                sources=[str(SOURCE)],
                extra_cflags=flags, extra_ldflags=["-fopenmp"])
        except Exception as error:  # no compiler, no ninja, no headers: the reference still works
            warnings.warn(f"normlab: fast norm kernels unavailable, using the eager formulas ({error})",
                          stacklevel=3)
            KERNELS["cpu"] = None
    return KERNELS["cpu"]


class FastPath:
    """What ``norms.py`` calls: ``kernel(op, x, *params)`` is the function that computes ``op``
    (a key of ``CPU_OPS`` or ``triton_norms.OPS``, called like the module method of that name)
    for this call on x's device, or None: the caller runs its formula."""

    @staticmethod
    def takes(x: torch.Tensor, *params: torch.Tensor) -> bool:
        """Whether fast kernels may compute this call: x fp32 or bf16 on a device with kernels,
        the parameters on x's device in ``PARAM_DTYPES``, outside ``reference_norms``,
        compilation, CPU autocast and torch.func."""
        device = x.device.type
        if (_reference_only or device not in PARAM_DTYPES or x.dtype not in (torch.float32, torch.bfloat16)
                or any(p.dtype not in PARAM_DTYPES[device] or p.device != x.device for p in params)
                or torch.compiler.is_compiling() or (device == "cpu" and torch.is_autocast_enabled("cpu"))
                or torch._C._are_functorch_transforms_active()):
            return False
        return _ops(device) is not None

    @staticmethod
    def kernel(op: str, x: torch.Tensor, *params: torch.Tensor):
        """The function computing ``op`` for this call, or None (not taken, or no kernel for op here)."""
        return _ops(x.device.type).get(op) if FastPath.takes(x, *params) else None


#: device type -> parameter dtypes its kernels take (CUDA: FSDP's bf16 parameters too, computed in fp32)
PARAM_DTYPES = {"cpu": (torch.float32,), "cuda": (torch.float32, torch.bfloat16)}


def _triton_kernels():
    """``normlab.nn.triton_norms`` (imported on the first CUDA call), or None with one warning
    when triton cannot be imported."""
    if "cuda" not in KERNELS:
        try:
            from normlab.nn import triton_norms
        except ImportError as error:
            warnings.warn(f"normlab: Triton norm kernels unavailable, CUDA norms use the eager formulas ({error})",
                          stacklevel=4)
            triton_norms = None
        KERNELS["cuda"] = triton_norms
    return KERNELS["cuda"]


def _ops(device_type: str) -> dict | None:
    """The op table of a device type: ``CPU_OPS``; on CUDA ``triton_norms.OPS``, or the table
    ``cuda_kernels`` chose. None when the device's kernels cannot be loaded."""
    if device_type == "cpu":
        return CPU_OPS if _cpu_kernels() is not None else None
    triton_norms = _triton_kernels()
    if triton_norms is None:
        return None
    return triton_norms.OPS if _cuda_ops is None else _cuda_ops


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as contiguous fp32 rows (N, D)."""
    return x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous()


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        rows = _rows(x)
        y, r = KERNELS["cpu"].rms_norm_forward(rows, weight.contiguous(), eps)
        ctx.save_for_backward(rows, weight, r)
        ctx.x_dtype = x.dtype
        return y.view(x.shape).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        rows, weight, r = ctx.saved_tensors
        dx, dw = KERNELS["cpu"].rms_norm_backward(_rows(dy), rows, weight.contiguous(), r)
        return dx.view(dy.shape).to(ctx.x_dtype), dw, None


class _DyT(torch.autograd.Function):
    """y in the reference's dtype: weight * tanh(.) promotes bf16 x to fp32."""

    @staticmethod
    def forward(ctx, x, alpha, weight):
        rows = _rows(x)
        y = KERNELS["cpu"].dyt_forward(rows, alpha, weight.contiguous())
        ctx.save_for_backward(rows, alpha, weight)
        ctx.x_dtype = x.dtype
        return y.view(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        rows, alpha, weight = ctx.saved_tensors
        dx, dalpha, dw = KERNELS["cpu"].dyt_backward(_rows(dy), rows, alpha, weight.contiguous())
        return dx.view(dy.shape).to(ctx.x_dtype), dalpha, dw


class _MeanSquare(torch.autograd.Function):
    """s2 = ms(x) in fp32, shape (..., 1)."""

    @staticmethod
    def forward(ctx, x):
        rows = _rows(x)
        ctx.save_for_backward(rows)
        ctx.x_dtype = x.dtype
        return KERNELS["cpu"].mean_square_forward(rows).view(*x.shape[:-1], 1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, ds2):
        (rows,) = ctx.saved_tensors
        dx = KERNELS["cpu"].mean_square_backward(ds2.reshape(-1).contiguous(), rows)
        return dx.view(*ds2.shape[:-1], rows.shape[1]).to(ctx.x_dtype)


class _BHyT(torch.autograd.Function):
    """s2 None: BHyT* (ms(x) inside, its gradient folded into dx); else the gradient reaches s2."""

    @staticmethod
    def forward(ctx, x, s2, lam, weight, kappa, eps):
        rows = _rows(x)
        given = torch.empty(0) if s2 is None else s2.reshape(-1).to(torch.float32).contiguous()
        y, stat = KERNELS["cpu"].bhyt_forward(rows, given, lam, weight.contiguous(), kappa, eps)
        ctx.save_for_backward(rows, stat, lam, weight)
        ctx.exact, ctx.kappa, ctx.eps, ctx.x_dtype = s2 is None, kappa, eps, x.dtype
        ctx.s2_shape = None if s2 is None else s2.shape
        return y.view(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        rows, stat, lam, weight = ctx.saved_tensors
        dx, ds2, dlam, dw = KERNELS["cpu"].bhyt_backward(
            _rows(dy), rows, stat, lam, weight.contiguous(), ctx.kappa, ctx.eps, ctx.exact, torch.empty(0))
        ds2 = None if ctx.exact else ds2.view(ctx.s2_shape)
        return dx.view(dy.shape).to(ctx.x_dtype), ds2, dlam, dw, None, None


class _BHyTWithStatistic(torch.autograd.Function):
    """(y, s2) = (BHyT(x; ms(x)), ms(x)) in one pass each way: the attention site of a BHyT block,
    whose s2 also feeds the FFN site; that gradient joins dx in the backward kernel."""

    @staticmethod
    def forward(ctx, x, lam, weight, kappa, eps):
        rows = _rows(x)
        y, stat = KERNELS["cpu"].bhyt_forward(rows, torch.empty(0), lam, weight.contiguous(), kappa, eps)
        ctx.save_for_backward(rows, stat, lam, weight)
        ctx.kappa, ctx.eps, ctx.x_dtype, ctx.x_shape = kappa, eps, x.dtype, x.shape
        ctx.set_materialize_grads(False)
        return y.view(x.shape), stat.view(*x.shape[:-1], 1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, ds2):
        rows, stat, lam, weight = ctx.saved_tensors
        dy = torch.zeros(rows.shape, dtype=torch.float32) if dy is None else _rows(dy)
        ds2 = torch.empty(0) if ds2 is None else ds2.reshape(-1).to(torch.float32).contiguous()
        dx, _, dlam, dw = KERNELS["cpu"].bhyt_backward(
            dy, rows, stat, lam, weight.contiguous(), ctx.kappa, ctx.eps, True, ds2)
        return dx.view(ctx.x_shape).to(ctx.x_dtype), dlam, dw, None, None


class _Rope(torch.autograd.Function):
    """RoPE is linear in x: the backward pass applies its transpose to dy (the same kernel)."""

    @staticmethod
    def forward(ctx, x, cos, signed_sin):
        ctx.save_for_backward(cos, signed_sin)
        return KERNELS["cpu"].rope(x, cos, signed_sin, False)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        cos, signed_sin = ctx.saved_tensors
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        return KERNELS["cpu"].rope(dy, cos, signed_sin, True), None, None


def _rope(x, cos, signed_sin):
    """x * cos + roll(x, d/2) * signed_sin for x (B, H, T, d) and tables (T, d); the kernel
    walks rows of d by x's strides and needs the last one to be 1."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    return _Rope.apply(x, cos.contiguous(), signed_sin.contiguous())


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up."""

    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return KERNELS["cpu"].swiglu_forward(gate, up)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return KERNELS["cpu"].swiglu_backward(dy.contiguous(), gate, up)


def _bhyt(x, s2, lam, weight, kappa: float, eps: float):
    """BHyT with the statistic s2 of shape (..., 1), or ms(x) computed inside when s2 is None."""
    if s2 is not None and s2.shape != (*x.shape[:-1], 1):
        s2 = s2.expand(*x.shape[:-1], 1)
    return _BHyT.apply(x, s2, lam, weight, kappa, eps)


#: the fused CPU kernels, op -> function called as in ``norms.py``
CPU_OPS = {"rms_norm": _RMSNorm.apply, "dyt": _DyT.apply,
           "mean_square": _MeanSquare.apply, "bhyt": _bhyt, "bhyt_with_statistic": _BHyTWithStatistic.apply,
           "rope": _rope, "swiglu": _SwiGLU.apply, "linear_cross_entropy": chunked_linear_cross_entropy}

norms.FAST_PATH = FastPath
