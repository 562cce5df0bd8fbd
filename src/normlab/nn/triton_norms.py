"""Triton kernels of the tanh norms for CUDA: DyT, BHyT* and BHyT with a given or returned
statistic, one forward and one backward kernel with hand-derived gradients (the formulas of
``fused_norms.cpp``), wrapped in ``torch.autograd.Function``\\ s. RMSNorm runs liger-kernel's
kernel when liger-kernel is installed (the ``gpu`` extra), and so does the LM head's loss once
its logits exceed one chunk (``nn/loss.py``: liger's fused linear cross-entropy); LayerNorm runs
ATen's CUDA kernel.

Notation as in ``norms.py``: ms(x) = mean_i x_i^2, r = 1 / sqrt(s2 + eps). A program takes a
block of ``ROWS`` rows of width ``BLOCK_D`` >= D (the whole row: the reduction and the
elementwise pass read it once), loads x and dy in their dtype (fp32 or bf16) and computes in
fp32; y is stored in the reference's dtype (``g * tanh(.)`` promotes x to g's dtype), dx in x's.
Backward programs loop over row blocks and write one partial sum of dg and of the scalar's
gradient each; torch adds the partials.

``normlab.nn.fused`` imports this module on the first CUDA call, so CPU users never import
triton. Tests run the kernels on CPU tensors under ``TRITON_INTERPRET=1``
(``tests/test_triton_norms.py``), which also compiles them for an sm_90 GPU without one;
liger-kernel's kernels do not run under the interpreter and are tested on CUDA only. No GPU measurement exists yet: the tiling (``_tiling``) and the
choice between these kernels, liger-kernel's and ``torch.compile`` are for the first GPU
session to measure (``normlab bench --device cuda --sections norms,transformers,strategies``).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import triton
import triton.language as tl


@triton.jit
def _tanh(z):
    """tanh(z) in fp32 within about 1e-7 (no tanh in every triton.language): z clamped to
    [-9, 9] (tanh rounds to +-1 beyond; nothing overflows), then Cephes' odd polynomial for
    |z| < 0.625, else sign(z) (1 - 2 / (exp(2|z|) + 1))."""
    z = tl.minimum(tl.maximum(z, -9.0), 9.0)
    z2 = z * z
    small = ((((-5.70498872745e-3 * z2 + 2.06390887954e-2) * z2 - 5.37397155531e-2) * z2
              + 1.33314422036e-1) * z2 - 3.33332819422e-1) * z2 * z + z
    large = 1.0 - 2.0 / (tl.exp(2.0 * tl.abs(z)) + 1.0)
    return tl.where(z2 < 0.390625, small, tl.where(z < 0, -large, large))


@triton.jit
def _tanh_norm_forward(X, Y, S2, G, SCALE, n_rows, D, eps, inv_kappa, STATISTIC: tl.constexpr,
                       EXACT: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """y = g tanh(k x) per row. DyT: k = alpha (SCALE). BHyT (STATISTIC): k = lam r / kappa
    (SCALE = lam), s2 read from S2, or with EXACT computed as ms(x) and written to S2."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < D)[None, :]
    offsets = rows.to(tl.int64)[:, None] * D + cols[None, :]
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + cols, mask=cols < D, other=0.0).to(tl.float32)
    scale = tl.load(SCALE).to(tl.float32)
    if STATISTIC:
        if EXACT:
            s2 = tl.sum(x * x, axis=1) / D
            tl.store(S2 + rows, s2, mask=row_ok)
        else:
            s2 = tl.load(S2 + rows, mask=row_ok, other=0.0)
        k = (scale * inv_kappa / tl.sqrt(s2 + eps))[:, None]
    else:
        k = scale
    y = g[None, :] * _tanh(k * x)
    tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _tanh_norm_backward(DY, X, S2, G, SCALE, DS2_OUT, DX, DS2, DG_PARTIAL, DSCALE_PARTIAL, n_rows, D, eps,
                        inv_kappa, STATISTIC: tl.constexpr, EXACT: tl.constexpr, HAS_DS2_OUT: tl.constexpr,
                        ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per row, k as in the forward, t = tanh(k x), h = g dy (1 - t^2), S = sum_i h x:
    dx = k h;  dg = sum_rows dy t;  DyT: dalpha = sum_rows S.  BHyT: dlam = sum_rows S r / kappa
    and ds2 = -S lam r^3 / (2 kappa), written to DS2, or with EXACT (s2 = ms(x)) added to dx as
    (ds2 + ds2_out) 2 x / D, ds2_out the gradient of s2 as an output (HAS_DS2_OUT).
    Program p takes row blocks p, p + P, ... and writes its sums to row p of the partials."""
    program, programs = tl.program_id(0), tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    g = tl.load(G + cols, mask=col_ok, other=0.0).to(tl.float32)
    scale = tl.load(SCALE).to(tl.float32)
    dg = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dscale = tl.zeros((ROWS,), dtype=tl.float32)
    for block in range(program, tl.cdiv(n_rows, ROWS), programs):
        rows = block * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]
        offsets = rows.to(tl.int64)[:, None] * D + cols[None, :]
        x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
        if STATISTIC:
            r = 1.0 / tl.sqrt(tl.load(S2 + rows, mask=row_ok, other=0.0) + eps)
            k = scale * inv_kappa * r
            t = _tanh(k[:, None] * x)
            h = g[None, :] * dy * (1.0 - t * t)
            s = tl.sum(h * x, axis=1)
            dx = k[:, None] * h
            dscale += s * r * inv_kappa
            ds2 = -0.5 * s * scale * inv_kappa * r * r * r
            if EXACT:
                if HAS_DS2_OUT:
                    ds2 += tl.load(DS2_OUT + rows, mask=row_ok, other=0.0)
                dx += (2.0 / D) * ds2[:, None] * x
            else:
                tl.store(DS2 + rows, ds2, mask=row_ok)
        else:
            t = _tanh(scale * x)
            h = g[None, :] * dy * (1.0 - t * t)
            dscale += tl.sum(h * x, axis=1)
            dx = scale * h
        dg += tl.sum(dy * t, axis=0)
        tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DG_PARTIAL + program * D + cols, dg, mask=col_ok)
    tl.store(DSCALE_PARTIAL + program, tl.sum(dscale, axis=0))


def _tiling(width: int) -> tuple[int, int, int]:
    """(BLOCK_D, ROWS, num_warps): the whole row in one block, rows stacked up to 2048 elements
    per program (narrow per-head Q/K norms get several rows). Not tuned on a GPU yet."""
    block_d = triton.next_power_of_2(width)
    rows = max(1, 2048 // block_d)
    return block_d, rows, min(16, max(4, rows * block_d // 512))


def _launch(warps: int) -> dict:
    """Launch options: ``warps`` warps, fused multiply-adds on (as in the CPU kernels; said
    explicitly, since Triton 3.9 warns that its default will change)."""
    return {"num_warps": warps, "enable_fp_fusion": True}


def _backward_programs(device: torch.device, blocks: int) -> int:
    """Programs of a backward launch: 4 per streaming multiprocessor (each loops over row
    blocks), 3 off CUDA (the interpreter: enough to test the partial sums)."""
    per_device = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 3
    return max(1, min(blocks, per_device))


def _on_device_of(t: torch.Tensor):
    """A context launching kernels on t's GPU (Triton launches on the current CUDA device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """t as contiguous rows (N, D) in its own dtype."""
    return t.reshape(-1, t.shape[-1]).contiguous()


def _forward(x, s2, scale, weight, kappa, eps, statistic: bool):
    """(x rows, y rows, s2 per row in fp32): s2 is ms(x), computed, when ``statistic`` and s2 is
    None (BHyT*); the given s2 when there is one; for DyT (not ``statistic``) None."""
    rows = _as_rows(x)
    n, width = rows.shape
    exact = statistic and s2 is None
    stat = None
    if statistic:
        stat = torch.empty(n, dtype=torch.float32, device=x.device) if exact else \
            s2.expand(*x.shape[:-1], 1).reshape(-1).to(torch.float32).contiguous()
    y = torch.empty(rows.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    block_d, per_program, warps = _tiling(width)
    unused = scale  # a pointer for S2, which DyT does not read
    with _on_device_of(x):
        _tanh_norm_forward[(triton.cdiv(n, per_program),)](
            rows, y, unused if stat is None else stat, weight.contiguous(), scale, n, width, eps, 1.0 / kappa,
            STATISTIC=statistic, EXACT=exact, ROWS=per_program, BLOCK_D=block_d, **_launch(warps))
    return rows, y, stat


def _backward(dy, rows, stat, scale, weight, kappa, eps, statistic: bool, exact: bool, ds2_out=None):
    """(dx rows in x's dtype, ds2 in fp32 (given s2 only, else None), dscale, dg): the gradients
    of ``_forward``'s y, plus with ``ds2_out`` that of its computed s2."""
    n, width = rows.shape
    block_d, per_program, warps = _tiling(width)
    programs = _backward_programs(rows.device, triton.cdiv(n, per_program))
    dx = torch.empty_like(rows)
    ds2 = torch.empty(n, dtype=torch.float32, device=rows.device) if statistic and not exact else None
    dg_partial = torch.empty((programs, width), dtype=torch.float32, device=rows.device)
    dscale_partial = torch.empty(programs, dtype=torch.float32, device=rows.device)
    unused = dscale_partial  # a pointer for the arguments a variant does not read or write
    with _on_device_of(rows):
        _tanh_norm_backward[(programs,)](
            _as_rows(dy), rows, unused if stat is None else stat, weight.contiguous(), scale,
            unused if ds2_out is None else ds2_out, dx, unused if ds2 is None else ds2, dg_partial, dscale_partial,
            n, width, eps, 1.0 / kappa, STATISTIC=statistic, EXACT=exact, HAS_DS2_OUT=ds2_out is not None,
            ROWS=per_program, BLOCK_D=block_d, **_launch(warps))
    return dx, ds2, dscale_partial.sum().reshape(1).to(scale.dtype), dg_partial.sum(0).to(weight.dtype)


class _DyT(torch.autograd.Function):
    """y = g tanh(alpha x)."""

    @staticmethod
    def forward(ctx, x, alpha, weight):
        rows, y, _ = _forward(x, None, alpha, weight, 1.0, 0.0, statistic=False)
        ctx.save_for_backward(rows, alpha, weight)
        return y.view(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        rows, alpha, weight = ctx.saved_tensors
        dx, _, dalpha, dw = _backward(dy, rows, None, alpha, weight, 1.0, 0.0, statistic=False, exact=False)
        return dx.view(dy.shape), dalpha, dw


class _BHyT(torch.autograd.Function):
    """y = g tanh(lam x r / kappa), r = 1/sqrt(s2 + eps). s2 None: BHyT* (ms(x) inside, its
    gradient folded into dx); else the gradient reaches s2."""

    @staticmethod
    def forward(ctx, x, s2, lam, weight, kappa, eps):
        rows, y, stat = _forward(x, s2, lam, weight, kappa, eps, statistic=True)
        ctx.save_for_backward(rows, stat, lam, weight)
        ctx.kappa, ctx.eps = kappa, eps
        ctx.s2 = None if s2 is None else (s2.shape, s2.dtype)
        return y.view(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        rows, stat, lam, weight = ctx.saved_tensors
        dx, ds2, dlam, dw = _backward(dy, rows, stat, lam, weight, ctx.kappa, ctx.eps, statistic=True,
                                      exact=ctx.s2 is None)
        if ds2 is not None:  # s2 was broadcast over rows when its shape was not (..., 1): sum back
            shape, dtype = ctx.s2
            ds2 = ds2.view(*dy.shape[:-1], 1).sum_to_size(shape).to(dtype)
        return dx.view(dy.shape), ds2, dlam, dw, None, None


class _BHyTWithStatistic(torch.autograd.Function):
    """(y, s2) = (BHyT(x; ms(x)), ms(x)): the attention site of a BHyT block, whose s2 also
    feeds the FFN site; the backward kernel combines dy and ds2 into dx in one pass."""

    @staticmethod
    def forward(ctx, x, lam, weight, kappa, eps):
        rows, y, stat = _forward(x, None, lam, weight, kappa, eps, statistic=True)
        ctx.save_for_backward(rows, stat, lam, weight)
        ctx.kappa, ctx.eps, ctx.x_shape = kappa, eps, x.shape
        ctx.set_materialize_grads(False)
        return y.view(x.shape), stat.view(*x.shape[:-1], 1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, ds2):
        rows, stat, lam, weight = ctx.saved_tensors
        dy = torch.zeros(ctx.x_shape, dtype=rows.dtype, device=rows.device) if dy is None else dy
        ds2 = None if ds2 is None else ds2.reshape(-1).to(torch.float32).contiguous()
        dx, _, dlam, dw = _backward(dy, rows, stat, lam, weight, ctx.kappa, ctx.eps, statistic=True, exact=True,
                                    ds2_out=ds2)
        return dx.view(ctx.x_shape), dlam, dw, None, None


def _liger_rms_norm(x, weight, eps: float):
    """RMSNorm by liger-kernel: casting mode 'gemma' computes in fp32 and casts y to x's dtype,
    as the reference does (gain inside, no offset); not in place, since autograd may still need
    dy."""
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    return LigerRMSNormFunction.apply(x, weight, eps, 0.0, "gemma", False)


def _liger_dyt(x, alpha, weight):
    """DyT by liger-kernel (no beta). y in x's dtype: equal to the reference for fp32 only, so
    the bench's explicit 'liger' path uses it, the dispatch does not."""
    from liger_kernel.ops.dyt import LigerDyTFunction

    return LigerDyTFunction.apply(x, alpha, weight, None)


def _liger_linear_cross_entropy(hidden, weight, targets, ignore_index: int):
    """liger-kernel's fused linear cross-entropy (chunks of tokens on the GPU, the gradients in
    the forward pass), the matmuls in autocast's dtype when autocast is on, as ``F.linear``'s."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    if torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    return liger_fused_linear_cross_entropy(hidden, weight, targets, ignore_index=ignore_index)


#: normlab's Triton kernels, op -> function called as in ``norms.py``
TRITON_OPS = {"dyt": _DyT.apply, "bhyt": _BHyT.apply, "bhyt_with_statistic": _BHyTWithStatistic.apply}


def _liger_ops() -> dict:
    """liger-kernel's kernels (op -> function), empty when it is not installed: with one warning
    where a GPU could use them (none under ``TRITON_INTERPRET`` on a CPU-only machine)."""
    try:
        import liger_kernel.ops.dyt  # noqa: F401
        import liger_kernel.ops.rms_norm  # noqa: F401
    except ImportError as error:
        if torch.cuda.is_available():
            warnings.warn(f"normlab: liger-kernel unavailable ({error}); RMSNorm on CUDA runs its formula "
                          "(pip install 'normlab[gpu]')", stacklevel=2)
        return {}
    return {"rms_norm": _liger_rms_norm, "dyt": _liger_dyt, "linear_cross_entropy": _liger_linear_cross_entropy}


LIGER_OPS = _liger_ops()

#: what the CUDA fast path runs, op -> function; an op absent here (layer_norm, mean_square; rms_norm
#: without liger-kernel) runs the formula in norms.py
OPS = {**TRITON_OPS, **{op: LIGER_OPS[op] for op in ("rms_norm", "linear_cross_entropy") if op in LIGER_OPS}}
