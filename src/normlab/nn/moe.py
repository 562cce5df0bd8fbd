"""Mixture-of-experts FFN in the OLMoE style: softmax router, top-k, dropless, SwiGLU experts.

Expert weights are stacked 3-D parameters laid out as transformers >= 5 stores
``OlmoeForCausalLM``: ``gate.weight`` (E, d), ``experts.gate_up_proj`` (E, 2f, d) with the gate
rows first, ``experts.down_proj`` (E, d, f). Tokens are sorted by expert and each expert's rows
are multiplied at once (``F.grouped_mm`` with per-expert offsets where it applies, else one
matmul per expert slice): no Python loop over tokens, no capacity, no dropped tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_HAS_GROUPED_MM = hasattr(F, "grouped_mm")


def is_moe_layer(cfg, layer: int) -> bool:
    """Whether ``layer``'s FFN is the mixture of experts (``moe_experts`` > 0 and the layer is in
    ``moe_layers``, None meaning every layer)."""
    return cfg.moe_experts > 0 and (cfg.moe_layers is None or layer in cfg.moe_layers)


class Router(nn.Module):
    """Router logits z = W_r x, W_r of shape (E, d)."""

    def __init__(self, d_model: int, n_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class Experts(nn.Module):
    """E SwiGLU FFNs: FFN_e(x) = W_down,e (silu(W_gate,e x) * W_up,e x)."""

    def __init__(self, d_model: int, n_experts: int, hidden: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * hidden, d_model))
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_model, hidden))

    def forward(self, x: torch.Tensor, counts: torch.Tensor, grouped: bool | None = None) -> torch.Tensor:
        """Rows of ``x`` sorted by expert, ``counts[e]`` of them for expert e; returns FFN_e of
        each row. ``grouped`` None: ``F.grouped_mm`` where it applies, else per-expert matmuls."""
        if grouped is None:
            grouped = self.grouped_mm_applies(x)
        if grouped:
            offsets = counts.cumsum(0).to(torch.int32)
            gate, up = F.grouped_mm(x, self.gate_up_proj.transpose(-2, -1), offs=offsets).chunk(2, -1)
            return F.grouped_mm(F.silu(gate) * up, self.down_proj.transpose(-2, -1), offs=offsets)
        pieces = []
        for e, rows in enumerate(x.split(counts.tolist())):
            gate, up = F.linear(rows, self.gate_up_proj[e]).chunk(2, -1)
            pieces.append(F.linear(F.silu(gate) * up, self.down_proj[e]))
        return torch.cat(pieces)

    def grouped_mm_applies(self, x: torch.Tensor) -> bool:
        """torch >= 2.8 has grouped_mm; it wants rows aligned to 16 bytes, and on CUDA bf16."""
        aligned = all(n * x.element_size() % 16 == 0 for n in (x.shape[-1], self.down_proj.shape[-1]))
        return _HAS_GROUPED_MM and aligned and (x.device.type == "cpu" or x.dtype == torch.bfloat16)


class MoE(nn.Module):
    """y = sum_{e in top-k(p)} w_e FFN_e(x) with p = softmax(W_r x) and w_e = p_e (OLMoE), or
    p_e / sum_top-k p when ``renormalize``.

    Each forward leaves its auxiliary losses on the module (fp32 scalars):
    ``load_balance_loss`` = E * sum_e f_e P_e (Switch), f_e = share of the N*k routing
    assignments that go to expert e, P_e = mean router probability of e (1 when balanced);
    ``z_loss`` = mean over tokens of logsumexp(z)^2; and ``expert_load`` = f (detached).
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int, hidden: int,
                 renormalize: bool = False) -> None:
        super().__init__()
        self.n_experts, self.top_k, self.renormalize = n_experts, top_k, renormalize
        self.gate = Router(d_model, n_experts)
        self.experts = Experts(d_model, n_experts, hidden)
        self.load_balance_loss: torch.Tensor | None = None
        self.z_loss: torch.Tensor | None = None
        self.expert_load: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.gate(x).float()
        probs = logits.softmax(-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, k)
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        flat = chosen.flatten()
        order = flat.argsort(stable=True)  # assignments grouped by expert
        counts = torch.bincount(flat, minlength=self.n_experts)
        tokens = order // self.top_k
        out = self.experts(x[tokens], counts) * weights.flatten()[order, None].to(x.dtype)
        y = torch.zeros_like(x).index_add_(0, tokens, out)

        share = counts.float() / flat.numel()
        self.load_balance_loss = self.n_experts * (share * probs.mean(0)).sum()
        self.z_loss = torch.logsumexp(logits, -1).square().mean()
        self.expert_load = share.detach()
        return y.reshape(shape)
