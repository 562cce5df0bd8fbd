"""normlab: transformer normalization research toolkit.

>>> import normlab
>>> cfg = normlab.ModelConfig.from_strategy("hybridnorm_star", d_model=64, n_layers=4)
>>> model = normlab.build_model(cfg, seed=0)

New norm types, placements and strategies register with ``register_norm``, ``register_placement``
and ``register_strategy`` (docs/extending.md); the built-in ones do so too.
"""

from normlab.config import ModelConfig
from normlab.errors import CheckpointError, ConfigError, DataError, NormlabError
from normlab.hf import from_hf
from normlab.nn.model import CausalLMOutput, NormLM, build_model
from normlab.nn.plan import LayerPlan
from normlab.nn.registry import register_norm
from normlab.plugins import load_plugins
from normlab.strategies import (
    STRATEGIES,
    layer_plans,
    plan_for,
    register_placement,
    register_strategy,
)
from normlab.version import __version__ as __version__

__all__ = [
    "STRATEGIES", "CausalLMOutput", "CheckpointError", "ConfigError", "DataError", "LayerPlan",
    "ModelConfig", "NormLM", "NormlabError", "build_model", "from_hf", "layer_plans", "load_plugins",
    "plan_for", "register_norm", "register_placement", "register_strategy",
]
