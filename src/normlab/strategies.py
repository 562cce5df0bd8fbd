"""Named normalization strategies and the per-layer slot plan.

A *placement* is a rule that switches norm slots on per layer; a *strategy* is a preset over
(placement, norm type, qk-norm, init). Notation: X block input, Y after the attention sub-layer,
X' block output, N a norm of the configured type, Attn_QKV attention with per-head Q/K/V norms.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from normlab.errors import ConfigError, check_choice
from normlab.nn.plan import LayerPlan
from normlab.nn.registry import shares_statistic

if TYPE_CHECKING:
    from normlab.config import ModelConfig


@dataclass(frozen=True)
class Strategy:
    name: str
    formula: str
    fields: dict[str, Any]
    source: str


#: placement name -> Placement, in registration order
PLACEMENTS: dict[str, Placement] = {}
#: strategy name -> Strategy, in registration order
STRATEGIES: dict[str, Strategy] = {}


@dataclass(frozen=True)
class Placement:
    """A registered placement. ``rule`` is a LayerPlan (the same slots in every layer: a
    *layer placement*, which ``layer_overrides`` may also name) or a function (cfg, layer) ->
    LayerPlan (a schedule over layers). ``qk_norm`` and ``qk_norm_scope`` are the defaults the
    placement implies when a config leaves them out."""

    name: str
    rule: LayerPlan | Callable[[ModelConfig, int], LayerPlan]
    qk_norm: str = "none"
    qk_norm_scope: str = "head"

    @property
    def per_layer(self) -> bool:
        return isinstance(self.rule, LayerPlan)


def register_placement(name: str, rule: LayerPlan | Callable[[ModelConfig, int], LayerPlan],
                       qk_norm: str = "none", qk_norm_scope: str = "head") -> None:
    """Make ``rule`` the placement ``name`` (``placement: name`` in a config).

    ``rule`` is a LayerPlan whose ``placement`` is ``name`` (a layer placement) or a function
    ``(cfg, layer) -> LayerPlan``, usually built from layer placements with ``plan_for``. The
    plan's ``qk_norm`` is replaced by the config's (or a layer override's)."""
    if isinstance(rule, LayerPlan) and rule.placement != name:
        raise ConfigError(f"register_placement('{name}'): its LayerPlan is named '{rule.placement}'")
    if not (isinstance(rule, LayerPlan) or callable(rule)):
        raise ConfigError(f"register_placement('{name}'): rule must be a LayerPlan or a function (cfg, layer)")
    _register(PLACEMENTS, "placement", Placement(name, rule, qk_norm, qk_norm_scope))


def register_strategy(name: str, formula: str, fields: dict[str, Any], source: str) -> None:
    """Make ``name`` a strategy: a preset of ModelConfig ``fields`` (checked when it is used),
    shown by ``normlab strategies`` with its ``formula`` and ``source`` (paper or author)."""
    if not isinstance(fields, dict) or not formula or not source:
        raise ConfigError(f"register_strategy('{name}'): needs a formula, a fields mapping and a source")
    _register(STRATEGIES, "strategy", Strategy(name, formula, dict(fields), source))


def _register(table: dict[str, Any], kind: str, entry: Any) -> None:
    """Add ``entry`` under its name; the same name again must bring an equal entry."""
    if not isinstance(entry.name, str) or not entry.name.isidentifier():
        raise ConfigError(f"register_{kind}: name {entry.name!r} is not an identifier")
    known = table.get(entry.name)
    if known is not None and _identity(known) != _identity(entry):
        raise ConfigError(f"register_{kind}: '{entry.name}' is already registered differently")
    table[entry.name] = entry


def _identity(entry: Any) -> Any:
    """What makes two registrations the same (a function by where it is defined)."""
    rule = getattr(entry, "rule", None)
    if callable(rule):
        return entry.name, f"{rule.__module__}.{rule.__qualname__}", entry.qk_norm, entry.qk_norm_scope
    return entry


def strategy_fields(name: str) -> dict[str, Any]:
    """The config fields a named strategy sets."""
    check_choice("strategy", name, tuple(STRATEGIES))
    return dict(STRATEGIES[name].fields)


def layer_placements() -> tuple[str, ...]:
    """The placements a single layer can take (``layer_overrides``)."""
    return tuple(name for name, p in PLACEMENTS.items() if p.per_layer)


def plan_for(placement: str, cfg: ModelConfig, layer: int) -> LayerPlan:
    """The LayerPlan placement ``placement`` gives ``layer`` of ``cfg``."""
    rule = PLACEMENTS[placement].rule
    plan = rule if isinstance(rule, LayerPlan) else rule(cfg, layer)
    if not isinstance(plan, LayerPlan):
        raise ConfigError(f"placement '{placement}': its rule returned {type(plan).__name__}, not a LayerPlan")
    return plan


def mixln_post_layers(cfg: ModelConfig) -> int:
    """Mix-LN: the first floor(alpha * L) layers are Post-Norm."""
    return math.floor(cfg.mixln_alpha * cfg.n_layers + 1e-9)


def layer_plans(cfg: ModelConfig) -> list[LayerPlan]:
    """The slot plan of every layer: model-level placement, then ``layer_overrides``."""
    plans = []
    for layer in range(cfg.n_layers):
        override = cfg.layer_overrides.get(layer, {})
        # the schedule's scalars belong to the schedule's placement
        plan = plan_for(override.get("placement", cfg.placement), cfg, layer)
        plan = replace(plan, qk_norm=override.get("qk_norm", cfg.qk_norm),
                       **{k: float(v) for k, v in override.items() if k.endswith("_scale")})
        _check_plan(cfg, layer, plan)
        plans.append(plan)
    return plans


def _check_plan(cfg: ModelConfig, layer: int, plan: LayerPlan) -> None:
    if shares_statistic(cfg.norm):
        if plan.placement != "pre":
            raise ConfigError(
                f"norm: '{cfg.norm}' shares its statistic between the two Pre-Norm sites, but layer "
                f"{layer} is '{plan.placement}'; use placement 'pre' or a per-site norm (bhyt_star)"
            )
        if plan.residual_scale != 1.0 or plan.branch_scale != 1.0:
            raise ConfigError(
                f"norm: '{cfg.norm}' approximates the FFN-site statistic for unscaled Pre-Norm blocks, but "
                f"layer {layer} has residual scale {plan.residual_scale:.4g} and branch scale "
                f"{plan.branch_scale:.4g}; use a per-site norm (bhyt_star)"
            )
        if plan.qk_norm == "qkv":
            raise ConfigError(
                f"qk_norm: '{cfg.norm}' approximates the attention-output variance from W_V W_O, which "
                "V-norm breaks; use qk_norm 'qk' or a per-site norm (bhyt_star)"
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


# ---------------------------------------------------------------------------- built-in placements
register_placement("pre", LayerPlan("pre", input_norm=True, ffn_input_norm=True))
register_placement("post", LayerPlan("post", attn_residual_norm=True, ffn_residual_norm=True))
register_placement("peri", LayerPlan("peri", input_norm=True, ffn_input_norm=True, attn_output_norm=True,
                                     ffn_output_norm=True))
register_placement("output", LayerPlan("output", attn_output_norm=True, ffn_output_norm=True),
                   qk_norm="qk", qk_norm_scope="full")
register_placement("hybrid", LayerPlan("hybrid", attn_residual_norm=True), qk_norm="qkv")


def deepnorm_rule(cfg: ModelConfig, layer: int) -> LayerPlan:
    """Post-Norm with residual scale alpha = (2L)^(1/4)."""
    return replace(plan_for("post", cfg, layer), residual_scale=cfg.deepnorm_alpha)


def mixln_rule(cfg: ModelConfig, layer: int) -> LayerPlan:
    """Post-Norm for l < floor(mixln_alpha * L), Pre-Norm after."""
    return plan_for("post" if layer < mixln_post_layers(cfg) else "pre", cfg, layer)


def hybrid_star_rule(cfg: ModelConfig, layer: int) -> LayerPlan:
    """Pre-Norm in layer 0, HybridNorm after."""
    return plan_for("pre" if layer == 0 else "hybrid", cfg, layer)


def lns_rule(cfg: ModelConfig, layer: int) -> LayerPlan:
    """Pre-Norm with both norm outputs scaled by 1/sqrt(l+1)."""
    return replace(plan_for("pre", cfg, layer), branch_scale=1.0 / math.sqrt(layer + 1))


register_placement("deepnorm", deepnorm_rule)
register_placement("mixln", mixln_rule)
register_placement("hybrid_star", hybrid_star_rule, qk_norm="qkv")
register_placement("lns", lns_rule)

# ---------------------------------------------------------------------------- built-in strategies
register_strategy(
    "pre_norm",
    "Y = X + Attn(N(X));  X' = Y + FFN(N(Y))",
    {"placement": "pre", "norm": "rmsnorm", "init": "normal"},
    "GPT-2 / LLaMA",
)
register_strategy(
    "post_norm",
    "Y = N(X + Attn(X));  X' = N(Y + FFN(Y))",
    {"placement": "post", "norm": "rmsnorm", "final_norm": "none", "init": "normal"},
    "original Transformer",
)
register_strategy(
    "qk_norm",
    "Y = X + Attn(N(X)) with softmax(N(Q) N(K)^T / sqrt(d_k));  X' = Y + FFN(N(Y))",
    {"placement": "pre", "norm": "rmsnorm", "qk_norm": "qk", "init": "normal"},
    "Henry et al. 2020; Dehghani et al. 2023",
)
register_strategy(
    "peri_norm",
    "Y = X + N(Attn(N(X)));  X' = Y + N(FFN(N(Y)))",
    {"placement": "peri", "norm": "rmsnorm", "init": "normal"},
    "Peri-LN (Kim et al. 2025) / Sandwich-LN",
)
register_strategy(
    "output_norm",
    "Y = X + N(Attn_QK(X));  X' = Y + N(FFN(Y)),  full-width QK-norm",
    {"placement": "output", "norm": "rmsnorm", "qk_norm": "qk", "qk_norm_scope": "full",
     "init": "normal"},
    "OLMo 2 reordered norm",
)
register_strategy(
    "deepnorm",
    "Y = N(a X + Attn(X));  X' = N(a Y + FFN(Y)),  a = (2L)^(1/4), init gain b = (8L)^(-1/4)",
    {"placement": "deepnorm", "norm": "rmsnorm", "final_norm": "none", "init": "deepnorm"},
    "DeepNet (Wang et al. 2022)",
)
register_strategy(
    "mixln",
    "layers l < floor(alpha L): Post-Norm;  others: Pre-Norm  (alpha = 0.25)",
    {"placement": "mixln", "norm": "rmsnorm", "mixln_alpha": 0.25, "init": "normal"},
    "Mix-LN (Li et al. 2025)",
)
register_strategy(
    "lns",
    "Y = X + Attn(N(X) / sqrt(l+1));  X' = Y + FFN(N(Y) / sqrt(l+1))",
    {"placement": "lns", "norm": "rmsnorm", "init": "normal"},
    "LayerNorm Scaling (Sun et al. 2025)",
)
register_strategy(
    "hybridnorm",
    "Y = X + Attn_QKV(X);  X' = N(Y) + FFN(N(Y)),  Megatron init",
    {"placement": "hybrid", "norm": "rmsnorm", "qk_norm": "qkv", "init": "megatron"},
    "HybridNorm (Zhuo et al. 2025)",
)
register_strategy(
    "hybridnorm_star",
    "layer 0: Y = X + Attn_QKV(N(X)), X' = Y + FFN(N(Y));  layers >= 1: HybridNorm",
    {"placement": "hybrid_star", "norm": "rmsnorm", "qk_norm": "qkv", "init": "megatron"},
    "HybridNorm* (Zhuo et al. 2025)",
)
register_strategy(
    "dyt",
    "Pre-Norm with N(x) = g * tanh(alpha x); embedding scaled by a learnable sqrt(d)",
    {"placement": "pre", "norm": "dyt", "embed_scale": True, "init": "normal"},
    "DyT (Zhu et al. 2025)",
)
register_strategy(
    "bhyt",
    "Pre-Norm with N(x) = g * tanh(lambda x / (kappa sqrt(s^2 + eps))), s^2 = ms(X) once per "
    "block; FFN site uses s^2 + c_attn sg(lambda_attn)^2 / kappa^2",
    {"placement": "pre", "norm": "bhyt", "init": "normal"},
    "BHyT (Byun et al. 2026)",
)
register_strategy(
    "bhyt_star",
    "Pre-Norm with N(x) = g * tanh(lambda x / (kappa sqrt(ms(x) + eps))), exact at both sites",
    {"placement": "pre", "norm": "bhyt_star", "init": "normal"},
    "BHyT* ablation (Byun et al. 2026)",
)
