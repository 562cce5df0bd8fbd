"""Building blocks: norm types, attention, SwiGLU, the slot-driven block, the model."""

from normlab.nn.attention import Attention
from normlab.nn.block import Block
from normlab.nn.fused import reference_norms  # importing it installs the fused norm kernels
from normlab.nn.mlp import SwiGLU
from normlab.nn.model import CausalLMOutput, NormLM, build_model, init_weights
from normlab.nn.norms import BHyT, DyT, LayerNorm, RMSNorm
from normlab.nn.registry import make_norm, register_norm

__all__ = [
    "Attention", "BHyT", "Block", "CausalLMOutput", "DyT", "LayerNorm", "NormLM", "RMSNorm",
    "SwiGLU", "build_model", "init_weights", "make_norm", "reference_norms", "register_norm",
]
