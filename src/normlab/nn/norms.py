"""The built-in norm types, registered through ``register_norm`` like a plugin's. Every norm maps
(..., dim) -> (..., dim), is built as ``cls(dim, cfg, site)`` and computes statistics in fp32.

``x`` is one row of the residual stream, ``ms(x) = mean_i x_i^2``.

The formulas below are the reference. ``normlab.nn.fused`` installs ``FAST_PATH``: fused CPU
kernels and, on CUDA, Triton (``normlab.nn.triton_norms``) and liger-kernel kernels that compute
the same values and gradients; an exported model has none and runs the formulas.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from normlab.nn.registry import register_norm

#: the fast kernels' dispatch (``normlab.nn.fused.FastPath``, installed when normlab.nn is imported), or None
FAST_PATH = None


def fast_kernel(op: str, x: torch.Tensor, *params: torch.Tensor):
    """The fast kernel computing ``op`` for this call (``FastPath.kernel``: x fp32 or bf16, the
    parameters in the device's dtypes), else None (the caller runs its formula)."""
    return FAST_PATH.kernel(op, x, *params) if FAST_PATH is not None else None


def fast_elementwise(op: str, x: torch.Tensor, *others: torch.Tensor):
    """The fast kernel of 'rope' or 'swiglu' for these tensors, all fp32, else None."""
    if any(t.dtype != torch.float32 for t in (x, *others)):
        return None
    return fast_kernel(op, x, *others)


def _stat_dtype(x: torch.Tensor) -> torch.Tensor:
    """x in at least fp32 precision (bf16/fp16 are upcast, fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@register_norm("rmsnorm")
class RMSNorm(nn.Module):
    """RMSNorm(x) = g * x / sqrt(ms(x) + eps);  g init 1, no bias."""

    def __init__(self, dim: int, cfg, site: str) -> None:
        super().__init__()
        self.eps = cfg.norm_eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernel := fast_kernel("rms_norm", x, self.weight):
            return kernel(x, self.weight, self.eps)
        # the gain goes inside: one call instead of two passes
        if x.dtype == self.weight.dtype and x.dtype in (torch.float32, torch.float64):
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # no conversions to dispatch
        xs = _stat_dtype(x)
        return F.rms_norm(xs, (x.shape[-1],), self.weight.to(xs.dtype), self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


@register_norm("layernorm")
class LayerNorm(nn.Module):
    """LayerNorm(x) = g * (x - mean(x)) / sqrt(var(x) + eps) + b;  g init 1, b init 0."""

    def __init__(self, dim: int, cfg, site: str) -> None:
        super().__init__()
        self.eps = cfg.norm_eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = _stat_dtype(x)  # ATen's kernel is fused already: no fast path (see normlab.nn.fused)
        out = F.layer_norm(xs, (x.shape[-1],), self.weight.to(xs.dtype), self.bias.to(xs.dtype), self.eps)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


@register_norm("dyt")
class DyT(nn.Module):
    """DyT(x) = g * tanh(alpha * x);  scalar alpha (stored as shape (1,)) (init alpha0: ``dyt_alpha_attn`` at the
    attention site, ``dyt_alpha_other`` elsewhere), per-channel g init 1, no bias (the LLaMA
    form of Zhu et al. 2025)."""

    def __init__(self, dim: int, cfg, site: str) -> None:
        super().__init__()
        self.alpha0 = float(cfg.dyt_alpha_attn if site == "attn" else cfg.dyt_alpha_other)
        self.alpha = nn.Parameter(torch.full((1,), self.alpha0))  # shape (1,): FSDP2 shards no 0-dim tensors
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.alpha, self.alpha0)
        nn.init.ones_(self.weight)

    def argument(self, x: torch.Tensor) -> torch.Tensor:
        """What goes into tanh: alpha * x."""
        return self.alpha.to(x.dtype) * x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernel := fast_kernel("dyt", x, self.alpha, self.weight):
            return kernel(x, self.alpha, self.weight)
        return self.weight * torch.tanh(self.argument(x))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}"


@register_norm("bhyt_star")
class BHyT(nn.Module):
    """BHyT(x; s2) = g * tanh(lam * x / (kappa * sqrt(s2 + eps))), here with the exact statistic
    s2 = ms(x) at every site (BHyT*, Byun et al. 2026). lam is a learnable scalar (init
    ``bhyt_lambda_attn`` / ``bhyt_lambda_ffn`` by site), kappa a fixed constant, g per channel
    init 1.
    """

    slots_only = True

    def __init__(self, dim: int, cfg, site: str) -> None:
        super().__init__()
        self.kappa = cfg.bhyt_kappa
        self.eps = cfg.bhyt_eps
        self.lam0 = float(cfg.bhyt_lambda_attn if site == "attn" else cfg.bhyt_lambda_ffn)
        self.lam = nn.Parameter(torch.full((1,), self.lam0))
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.lam, self.lam0)
        nn.init.ones_(self.weight)

    @staticmethod
    def mean_square(x: torch.Tensor) -> torch.Tensor:
        """s2 = ms(x) in fp32, shape (..., 1)."""
        if kernel := fast_kernel("mean_square", x):
            return kernel(x)
        return _stat_dtype(x).pow(2).mean(-1, keepdim=True)

    def argument(self, x: torch.Tensor, s2: torch.Tensor | None = None) -> torch.Tensor:
        """What goes into tanh: lam * x / (kappa * sqrt(s2 + eps)), s2 = ms(x) when not given."""
        s2 = self.mean_square(x) if s2 is None else s2
        scale = (torch.rsqrt(s2 + self.eps) / self.kappa).to(x.dtype)
        return self.lam.to(x.dtype) * scale * x

    def apply(self, x: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
        if kernel := fast_kernel("bhyt", x, s2, self.lam, self.weight):
            return kernel(x, s2, self.lam, self.weight, self.kappa, self.eps)
        return self.weight * torch.tanh(self.argument(x, s2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernel := fast_kernel("bhyt", x, self.lam, self.weight):  # ms(x) and its gradient inside the kernels
            return kernel(x, None, self.lam, self.weight, self.kappa, self.eps)
        return self.apply(x, self.mean_square(x))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, kappa={self.kappa}, eps={self.eps}"


@register_norm("bhyt")
class SharedBHyT(BHyT):
    """BHyT(x; s2) = g * tanh(lam * x / (kappa * sqrt(s2 + eps))) with one statistic per block:
    s2 = ms(X) at the attention site, s2_hat = s2 + c_attn * sg(lam_attn)^2 / kappa^2 at the FFN
    site (Byun et al. 2026, approximating ms(Y) from the attention weights)."""

    def statistic(self, x: torch.Tensor) -> torch.Tensor:
        return self.mean_square(x)

    def apply_with_statistic(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(apply(x, s2), s2) with s2 = statistic(x): one fused pass on the fast path."""
        if kernel := fast_kernel("bhyt_with_statistic", x, self.lam, self.weight):
            return kernel(x, self.lam, self.weight, self.kappa, self.eps)
        s2 = self.statistic(x)
        return self.apply(x, s2), s2

    def statistic_after_attention(self, s2: torch.Tensor, c_attn: torch.Tensor) -> torch.Tensor:
        """s2_hat = s2 + c_attn * sg(lam)^2 / kappa^2 (called on the attention-site norm)."""
        return s2 + c_attn * self.lam.detach() ** 2 / self.kappa**2


@register_norm("none")
class NoNorm(nn.Identity):
    """N(x) = x: the slot computes nothing (a normalization-free baseline)."""

    def __init__(self, dim: int, cfg, site: str) -> None:
        super().__init__()

    def reset_parameters(self) -> None:
        """Nothing to reset."""
