"""Named normalization strategies and the per-layer slot plan.

A *placement* is a rule that switches norm slots on per layer; a *strategy* is a preset over
(placement, norm type, qk-norm, init). Notation: X block input, Y after the attention sub-layer,
X' block output, N a norm of the configured type, Attn_QKV attention with per-head Q/K/V norms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from normlab.config import check_choice
from normlab.errors import ConfigError
from normlab.nn.plan import LayerPlan

if TYPE_CHECKING:
    from normlab.config import ModelConfig


@dataclass(frozen=True)
class Strategy:
    name: str
    formula: str
    fields: dict[str, Any]
    source: str


STRATEGIES: dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy(
            "pre_norm",
            "Y = X + Attn(N(X));  X' = Y + FFN(N(Y))",
            {"placement": "pre", "norm": "rmsnorm", "init": "normal"},
            "GPT-2 / LLaMA",
        ),
        Strategy(
            "post_norm",
            "Y = N(X + Attn(X));  X' = N(Y + FFN(Y))",
            {"placement": "post", "norm": "rmsnorm", "final_norm": "none", "init": "normal"},
            "original Transformer",
        ),
        Strategy(
            "qk_norm",
            "Y = X + Attn(N(X)) with softmax(N(Q) N(K)^T / sqrt(d_k));  X' = Y + FFN(N(Y))",
            {"placement": "pre", "norm": "rmsnorm", "qk_norm": "qk", "init": "normal"},
            "Henry et al. 2020; Dehghani et al. 2023",
        ),
        Strategy(
            "peri_norm",
            "Y = X + N(Attn(N(X)));  X' = Y + N(FFN(N(Y)))",
            {"placement": "peri", "norm": "rmsnorm", "init": "normal"},
            "Peri-LN (Kim et al. 2025) / Sandwich-LN",
        ),
        Strategy(
            "output_norm",
            "Y = X + N(Attn_QK(X));  X' = Y + N(FFN(Y)),  full-width QK-norm",
            {"placement": "output", "norm": "rmsnorm", "qk_norm": "qk", "qk_norm_scope": "full",
             "init": "normal"},
            "OLMo 2 reordered norm",
        ),
        Strategy(
            "deepnorm",
            "Y = N(a X + Attn(X));  X' = N(a Y + FFN(Y)),  a = (2L)^(1/4), init gain b = (8L)^(-1/4)",
            {"placement": "deepnorm", "norm": "rmsnorm", "final_norm": "none", "init": "deepnorm"},
            "DeepNet (Wang et al. 2022)",
        ),
        Strategy(
            "mixln",
            "layers l < floor(alpha L): Post-Norm;  others: Pre-Norm  (alpha = 0.25)",
            {"placement": "mixln", "norm": "rmsnorm", "mixln_alpha": 0.25, "init": "normal"},
            "Mix-LN (Li et al. 2025)",
        ),
        Strategy(
            "lns",
            "Y = X + Attn(N(X) / sqrt(l+1));  X' = Y + FFN(N(Y) / sqrt(l+1))",
            {"placement": "lns", "norm": "rmsnorm", "init": "normal"},
            "LayerNorm Scaling (Sun et al. 2025)",
        ),
        Strategy(
            "hybridnorm",
            "Y = X + Attn_QKV(X);  X' = N(Y) + FFN(N(Y)),  Megatron init",
            {"placement": "hybrid", "norm": "rmsnorm", "qk_norm": "qkv", "init": "megatron"},
            "HybridNorm (Zhuo et al. 2025)",
        ),
        Strategy(
            "hybridnorm_star",
            "layer 0: Y = X + Attn_QKV(N(X)), X' = Y + FFN(N(Y));  layers >= 1: HybridNorm",
            {"placement": "hybrid_star", "norm": "rmsnorm", "qk_norm": "qkv", "init": "megatron"},
            "HybridNorm* (Zhuo et al. 2025)",
        ),
        Strategy(
            "dyt",
            "Pre-Norm with N(x) = g * tanh(alpha x); embedding scaled by a learnable sqrt(d)",
            {"placement": "pre", "norm": "dyt", "embed_scale": True, "init": "normal"},
            "DyT (Zhu et al. 2025)",
        ),
        Strategy(
            "bhyt",
            "Pre-Norm with N(x) = g * tanh(lambda x / (kappa sqrt(s^2 + eps))), s^2 = ms(X) once per "
            "block; FFN site uses s^2 + c_attn sg(lambda_attn)^2 / kappa^2",
            {"placement": "pre", "norm": "bhyt", "init": "normal"},
            "BHyT (Byun et al. 2026)",
        ),
        Strategy(
            "bhyt_star",
            "Pre-Norm with N(x) = g * tanh(lambda x / (kappa sqrt(ms(x) + eps))), exact at both sites",
            {"placement": "pre", "norm": "bhyt_star", "init": "normal"},
            "BHyT* ablation (Byun et al. 2026)",
        ),
    )
}


def strategy_fields(name: str) -> dict[str, Any]:
    """The config fields a named strategy sets."""
    check_choice("strategy", name, tuple(STRATEGIES))
    return dict(STRATEGIES[name].fields)


_LAYER_SLOTS: dict[str, dict[str, bool]] = {
    "pre": {"input_norm": True, "ffn_input_norm": True},
    "post": {"attn_residual_norm": True, "ffn_residual_norm": True},
    "peri": {"input_norm": True, "ffn_input_norm": True, "attn_output_norm": True,
             "ffn_output_norm": True},
    "output": {"attn_output_norm": True, "ffn_output_norm": True},
    "hybrid": {"attn_residual_norm": True},
}


def _base_layer(cfg: ModelConfig, layer: int) -> tuple[str, dict[str, Any]]:
    """The per-layer placement a model-level placement assigns to ``layer`` plus scalars."""
    p = cfg.placement
    if p in _LAYER_SLOTS:
        return p, {}
    if p == "deepnorm":
        return "post", {"residual_scale": cfg.deepnorm_alpha}
    if p == "mixln":
        return ("post" if layer < mixln_post_layers(cfg) else "pre"), {}
    if p == "hybrid_star":
        return ("pre" if layer == 0 else "hybrid"), {}
    if p == "lns":
        return "pre", {"branch_scale": 1.0 / math.sqrt(layer + 1)}
    raise AssertionError(p)


def mixln_post_layers(cfg: ModelConfig) -> int:
    """Mix-LN: the first floor(alpha * L) layers are Post-Norm."""
    return math.floor(cfg.mixln_alpha * cfg.n_layers + 1e-9)


def layer_plans(cfg: ModelConfig) -> list[LayerPlan]:
    """The slot plan of every layer: model-level placement, then ``layer_overrides``."""
    plans = []
    for layer in range(cfg.n_layers):
        placement, scalars = _base_layer(cfg, layer)
        override = cfg.layer_overrides.get(layer, {})
        if "placement" in override:  # the schedule's scalars belong to the schedule's placement
            placement, scalars = override["placement"], {}
        scalars.update({k: float(v) for k, v in override.items() if k.endswith("_scale")})
        plan = LayerPlan(
            placement=placement,
            qk_norm=override.get("qk_norm", cfg.qk_norm),
            **_LAYER_SLOTS[placement],
            **scalars,
        )
        _check_plan(cfg, layer, plan)
        plans.append(plan)
    return plans


def _check_plan(cfg: ModelConfig, layer: int, plan: LayerPlan) -> None:
    if cfg.norm == "bhyt":
        if plan.placement != "pre":
            raise ConfigError(
                f"norm: 'bhyt' shares its statistic between the two Pre-Norm sites, but layer "
                f"{layer} is '{plan.placement}'; use placement 'pre' or norm 'bhyt_star'"
            )
        if plan.residual_scale != 1.0 or plan.branch_scale != 1.0:
            raise ConfigError(
                f"norm: 'bhyt' approximates the FFN-site statistic for unscaled Pre-Norm blocks, but "
                f"layer {layer} has residual scale {plan.residual_scale:.4g} and branch scale "
                f"{plan.branch_scale:.4g}; use norm 'bhyt_star'"
            )
        if plan.qk_norm == "qkv":
            raise ConfigError(
                "qk_norm: 'bhyt' approximates the attention-output variance from W_V W_O, which "
                "V-norm breaks; use qk_norm 'qk' or norm 'bhyt_star'"
            )


def describe_plan(cfg: ModelConfig) -> str:
    """One line per run of identical layers, e.g. ``layers 0-2: post``."""
    plans = layer_plans(cfg)
    lines: list[str] = []
    start = 0
    for i in range(1, len(plans) + 1):
        if i == len(plans) or plans[i] != plans[start]:
            p = plans[start]
            span = f"layer {start}" if i - start == 1 else f"layers {start}-{i - 1}"
            extras = [f"qk_norm={p.qk_norm}"] if p.qk_norm != "none" else []
            if p.residual_scale != 1.0:
                extras.append(f"residual_scale={p.residual_scale:.4g}")
            if p.branch_scale != 1.0:
                extras.append(f"branch_scale={p.branch_scale:.4g}")
            lines.append(f"{span}: {p.placement}" + (f" ({', '.join(extras)})" if extras else ""))
            start = i
    return "\n".join(lines)
