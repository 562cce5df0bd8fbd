"""The one transformer block. Its norm slots are switched on per layer by a ``LayerPlan``."""

from __future__ import annotations

import torch
from torch import nn

from normlab.nn.attention import Attention
from normlab.nn.mlp import SwiGLU
from normlab.nn.moe import MoE, is_moe_layer
from normlab.nn.plan import LayerPlan
from normlab.nn.registry import make_norm, shares_statistic

#: slot field of LayerPlan -> (module name, site for DyT alpha0 / BHyT lambda0)
SLOTS: dict[str, tuple[str, str]] = {
    "input_norm": ("input_layernorm", "attn"),
    "attn_output_norm": ("attn_output_layernorm", "attn"),
    "attn_residual_norm": ("attn_residual_norm", "attn"),
    "ffn_input_norm": ("post_attention_layernorm", "other"),
    "ffn_output_norm": ("post_feedforward_layernorm", "other"),
    "ffn_residual_norm": ("ffn_residual_norm", "other"),
}


class Block(nn.Module):
    """A decoder block with six norm slots; a slot that is off is the identity (module None)::

        X ──┬──> input_layernorm ─> *c ─> self_attn ─> attn_output_layernorm ──┐
            └──> *a ─────────────────────────────────────────────────────────> (+) ─> attn_residual_norm ─> Y
        Y ──┬──> post_attention_layernorm ─> *c ─> mlp ─> post_feedforward_layernorm ──┐
            └──> *a ────────────────────────────────────────────────────────────────> (+) ─> ffn_residual_norm ─> X'

    ``a`` is the residual scale (DeepNorm alpha), ``c`` the branch scale (LNS 1/sqrt(l+1)).
    Pre-Norm turns on the two input norms, Post-Norm the two residual norms, Peri-Norm the input
    and output norms, OLMo 2 the output norms, HybridNorm only ``attn_residual_norm`` (so
    X' = N(Y) + FFN(N(Y))) with Q/K/V norms inside attention.

    BHyT (``shared_statistic``) computes s2 = ms(X) once; the FFN site uses
    s2_hat = s2 + c_attn * sg(lambda_attn)^2 / kappa^2 instead of ms(Y).
    """

    def __init__(self, cfg, layer: int, plan: LayerPlan) -> None:
        super().__init__()
        self.layer = layer
        self.plan = plan
        self.residual_scale = plan.residual_scale
        self.branch_scale = plan.branch_scale
        self.self_attn = Attention(cfg, plan.qk_norm, layer)
        if is_moe_layer(cfg, layer):  # the MoE FFN sits wherever the dense one does
            self.mlp = MoE(cfg.d_model, cfg.moe_experts, cfg.moe_top_k, cfg.moe_ffn_hidden, cfg.moe_renormalize)
        else:
            self.mlp = SwiGLU(cfg.d_model, cfg.ffn_hidden)
        for slot, (name, site) in SLOTS.items():  # a slot that is off is None (no module to call)
            on = getattr(plan, slot)
            setattr(self, name, make_norm(cfg.norm, cfg.d_model, cfg, site) if on else None)
        self.shared_statistic = shares_statistic(cfg.norm)
        if self.shared_statistic:
            # Persistent so that a loaded model uses the constant it was trained with.
            self.register_buffer("c_attn", torch.zeros(()), persistent=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Every norm acts on each token alone, so a KV cache (``cache``, ``mask``: see
        ``Attention.forward``) gives the same outputs as the full sequence."""
        if self.shared_statistic:
            return self._forward_shared_statistic(x, cos, sin, cache, mask)
        a, c = self.residual_scale, self.branch_scale
        h = _scaled(_norm(self.input_layernorm, x), c)
        attn = self.self_attn(h, cos, sin, cache, mask)
        y = _norm(self.attn_residual_norm, _scaled(x, a) + _norm(self.attn_output_layernorm, attn))
        h = _scaled(_norm(self.post_attention_layernorm, y), c)
        return _norm(self.ffn_residual_norm, _scaled(y, a) + _norm(self.post_feedforward_layernorm, self.mlp(h)))

    def _forward_shared_statistic(self, x, cos, sin, cache=None, mask=None) -> torch.Tensor:
        """Pre-Norm block with one reduction: Y = X + Attn(N1(X; s)), X' = Y + FFN(N2(Y; s_ffn))."""
        y, s_ffn = self.shared_statistic_attention(x, cos, sin, cache, mask)
        return y + self.mlp(self.post_attention_layernorm.apply(y, s_ffn))

    def shared_statistic_attention(self, x, cos, sin, cache=None, mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(Y, s_ffn): Y = X + Attn(N1(X; s)) with s = N1.statistic(X), and the FFN site's
        statistic s_ffn = N1.statistic_after_attention(s, c_attn) (BHyT: approximates ms(Y))."""
        site1 = self.input_layernorm
        if hasattr(site1, "apply_with_statistic"):  # optional: both in one pass
            normed, stat = site1.apply_with_statistic(x)
        else:
            stat = site1.statistic(x)
            normed = site1.apply(x, stat)
        y = x + self.self_attn(normed, cos, sin, cache, mask)
        return y, site1.statistic_after_attention(stat, self.c_attn)

    @torch.no_grad()
    def refresh_c_attn(self, context_len: int) -> None:
        """c_attn = ||W_V^exp W_O||_F^2 / (T d) from the current weights (shared-statistic blocks)."""
        product = self.self_attn.value_output_product().float()
        self.c_attn.fill_(product.pow(2).sum().item() / (context_len * product.shape[0]))


def _norm(norm: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    return x if norm is None else norm(x)


def _scaled(x: torch.Tensor, scale: float) -> torch.Tensor:
    return x if scale == 1.0 else x * scale
