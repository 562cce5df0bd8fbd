"""Derf ("dynamic erf", Chen et al., "Stronger Normalization-Free Transformers", 2025) added to
normlab from outside, through its public API only:

    normlab compare --plugin examples/plugins/derf.py --strategies dyt,derf --baseline dyt --out runs/derf
"""

import torch
from torch import nn

import normlab


@normlab.register_norm("derf")
class Derf(nn.Module):
    """Derf(x) = g * erf(alpha * x + s) + b;  scalars alpha (init 0.5) and s (init 0), per-channel
    g (init 1) and b (init 0). Pointwise: no statistic, so nothing to keep in fp32."""

    alpha0 = 0.5

    def __init__(self, dim: int, cfg, site: str) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(self.alpha0))
        self.shift = nn.Parameter(torch.tensor(0.0))
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.alpha, self.alpha0)
        nn.init.zeros_(self.shift)
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def argument(self, x: torch.Tensor) -> torch.Tensor:
        """What goes into erf (diagnostics report the share of |argument| > 2 as saturation)."""
        return self.alpha.to(x.dtype) * x + self.shift.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * torch.erf(self.argument(x)) + self.bias


normlab.register_strategy(
    "derf",
    "Pre-Norm with N(x) = g * erf(alpha x + s) + b",
    {"placement": "pre", "norm": "derf", "init": "normal"},
    "Derf (Chen et al. 2025)",
)
