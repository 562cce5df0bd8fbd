"""The per-layer slot plan: which norm slots one block switches on (a plain value object)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerPlan:
    """Which norm slots one block uses, and its two scalars.

    Block maths (slots that are off are the identity, ``a`` = residual_scale, ``c`` = branch_scale)::

        Y  = attn_residual_norm( a*X + attn_output_norm( Attn( c*input_norm(X) ) ) )
        X' = ffn_residual_norm ( a*Y + ffn_output_norm ( FFN ( c*ffn_input_norm(Y) ) ) )
    """

    placement: str
    input_norm: bool = False  # module input_layernorm
    ffn_input_norm: bool = False  # module post_attention_layernorm (HF Llama name)
    attn_output_norm: bool = False  # module attn_output_layernorm
    ffn_output_norm: bool = False  # module post_feedforward_layernorm
    attn_residual_norm: bool = False  # module attn_residual_norm
    ffn_residual_norm: bool = False  # module ffn_residual_norm
    qk_norm: str = "none"
    residual_scale: float = 1.0
    branch_scale: float = 1.0
