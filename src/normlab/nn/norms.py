"""Norm types. Every norm maps (..., dim) -> (..., dim); statistics are computed in fp32.

``x`` is one row of the residual stream, ``ms(x) = mean_i x_i^2``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _stat_dtype(x: torch.Tensor) -> torch.Tensor:
    """x in at least fp32 precision (bf16/fp16 are upcast, fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    """RMSNorm(x) = g * x / sqrt(ms(x) + eps);  g init 1, no bias."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the gain goes inside: one call instead of two passes
        if x.dtype == self.weight.dtype and x.dtype in (torch.float32, torch.float64):
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # no conversions to dispatch
        xs = _stat_dtype(x)
        return F.rms_norm(xs, (x.shape[-1],), self.weight.to(xs.dtype), self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class LayerNorm(nn.Module):
    """LayerNorm(x) = g * (x - mean(x)) / sqrt(var(x) + eps) + b;  g init 1, b init 0."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = _stat_dtype(x)
        out = F.layer_norm(xs, (x.shape[-1],), self.weight.to(xs.dtype), self.bias.to(xs.dtype), self.eps)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class DyT(nn.Module):
    """DyT(x) = g * tanh(alpha * x);  scalar alpha (init alpha0), per-channel g init 1, no bias
    (the LLaMA form of Zhu et al. 2025)."""

    def __init__(self, dim: int, alpha0: float) -> None:
        super().__init__()
        self.alpha0 = float(alpha0)
        self.alpha = nn.Parameter(torch.tensor(self.alpha0))
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.alpha, self.alpha0)
        nn.init.ones_(self.weight)

    def argument(self, x: torch.Tensor) -> torch.Tensor:
        """What goes into tanh: alpha * x."""
        return self.alpha.to(x.dtype) * x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * torch.tanh(self.argument(x))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}"


class BHyT(nn.Module):
    """BHyT(x; s2) = g * tanh(lam * x / (kappa * sqrt(s2 + eps))).

    ``forward(x)`` uses the exact statistic s2 = ms(x) (BHyT*); a block that shares one
    statistic across its two sites calls ``apply(x, s2)`` with its own s2 (Byun et al. 2026).
    lam is a learnable scalar, kappa a fixed constant, g per channel init 1.
    """

    def __init__(self, dim: int, lam0: float, kappa: float = 10.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.kappa = kappa
        self.eps = eps
        self.lam0 = float(lam0)
        self.lam = nn.Parameter(torch.tensor(self.lam0))
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.lam, self.lam0)
        nn.init.ones_(self.weight)

    @staticmethod
    def mean_square(x: torch.Tensor) -> torch.Tensor:
        """s2 = ms(x) in fp32, shape (..., 1)."""
        return _stat_dtype(x).pow(2).mean(-1, keepdim=True)

    def argument(self, x: torch.Tensor, s2: torch.Tensor | None = None) -> torch.Tensor:
        """What goes into tanh: lam * x / (kappa * sqrt(s2 + eps)), s2 = ms(x) when not given."""
        s2 = self.mean_square(x) if s2 is None else s2
        scale = (torch.rsqrt(s2 + self.eps) / self.kappa).to(x.dtype)
        return self.lam.to(x.dtype) * scale * x

    def apply(self, x: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
        return self.weight * torch.tanh(self.argument(x, s2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply(x, self.mean_square(x))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, kappa={self.kappa}, eps={self.eps}"


NORM_CLASSES = (RMSNorm, LayerNorm, DyT, BHyT)


def make_norm(kind: str, dim: int, *, eps: float, site: str, cfg) -> nn.Module:
    """A norm of type ``kind`` for a slot; ``site`` is 'attn' or 'other' (DyT alpha0, BHyT lambda0)."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    if kind == "layernorm":
        return LayerNorm(dim, eps)
    if kind == "dyt":
        return DyT(dim, cfg.dyt_alpha_attn if site == "attn" else cfg.dyt_alpha_other)
    if kind in ("bhyt", "bhyt_star"):
        lam = cfg.bhyt_lambda_attn if site == "attn" else cfg.bhyt_lambda_ffn
        return BHyT(dim, lam, cfg.bhyt_kappa, cfg.bhyt_eps)
    if kind == "none":
        return nn.Identity()
    raise AssertionError(kind)

