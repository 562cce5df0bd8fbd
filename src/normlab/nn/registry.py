"""The norm-type registry: ``@register_norm("name")`` on a module class, ``make_norm`` to build one.

A norm class is constructed as ``cls(dim, cfg, site)``: ``dim`` the width it normalizes,
``cfg`` the model config (read any field, e.g. ``cfg.norm_eps``), ``site`` 'attn' or 'other'
(the attention or FFN side of the block, where per-site initial values differ). It maps
(..., dim) -> (..., dim), states its formula in its docstring and has ``reset_parameters()``.

Optional class attributes and methods the model reads:

- ``slots_only = True``: the type only serves the block's residual-stream slots; the QK-norm
  and final norm then default to RMSNorm and may not use it (BHyT).
- ``statistic(x)``, ``apply(x, stat)`` and ``statistic_after_attention(stat, c_attn)``: the
  block computes the statistic once from its input X at the attention site and hands the FFN
  site ``statistic_after_attention(stat, c_attn)`` instead of a statistic of Y (BHyT);
  with ``apply_with_statistic(x) -> (apply(x, stat), stat)`` it asks for both at once (a fused
  kernel can then read x once).
- ``argument(x)``: what goes into a squashing function (tanh, erf); diagnostics report the
  share of |argument| > 2 as saturation.

This module imports nothing from normlab but its errors, so it is bundled into exported models.
"""

from __future__ import annotations

from normlab.errors import ConfigError

#: norm type name -> module class, in registration order (the built-ins first)
NORMS: dict[str, type] = {}


def register_norm(name: str):
    """Class decorator: make ``cls`` the norm type ``name`` (``norm: name`` in a config).

    Registering a name twice is an error unless it is the same class again (a re-imported
    plugin)."""

    def register(cls: type) -> type:
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"register_norm: name {name!r} is not an identifier")
        if not (cls.__doc__ or "").strip():
            raise ConfigError(f"register_norm('{name}'): {cls.__name__} needs a docstring stating its formula")
        if not callable(getattr(cls, "reset_parameters", None)):
            raise ConfigError(f"register_norm('{name}'): {cls.__name__} needs a reset_parameters() method")
        known = NORMS.get(name)
        if known is not None and _origin(known) != _origin(cls):
            raise ConfigError(f"register_norm: '{name}' is already registered by {_origin(known)}")
        NORMS[name] = cls
        return cls

    return register


def _origin(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def norm_class(kind: str) -> type:
    """The class registered as ``kind``."""
    try:
        return NORMS[kind]
    except KeyError:
        raise ConfigError(f"norm: unknown type '{kind}'; registered: {', '.join(NORMS)}") from None


def make_norm(kind: str, dim: int, cfg, site: str):
    """A norm of type ``kind`` for one slot; ``site`` is 'attn' or 'other'."""
    return norm_class(kind)(dim, cfg, site)


def shares_statistic(kind: str) -> bool:
    """Whether blocks of this type compute one statistic for both sites (see the module doc)."""
    return hasattr(norm_class(kind), "statistic")


def is_norm(module) -> bool:
    """Whether ``module`` is an instance of a registered norm type."""
    return isinstance(module, tuple(NORMS.values()))
