"""Model configuration: one typed dataclass, YAML round-trip, validation with one-line errors.

Every field has a sensible default; ``None`` means "derive it" and is resolved in
``__post_init__`` so that a saved config is complete and loads back to the same model.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from normlab.device import pick_device
from normlab.errors import ConfigError, NormlabError, check_choice, did_you_mean
from normlab.plugins import check_specs, load_plugins, resolve


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader (YAML 1.1) that also reads ``3e-4`` (no dot) as a float, as YAML 1.2
    and every researcher does."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?\.?[0-9_]*[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 (a SafeLoader subclass)


# Norm types, placements and strategies are registries (normlab.nn.registry, normlab.strategies).
QK_NORMS = ("none", "qk", "qkv")
QK_NORM_SCOPES = ("head", "full")
INIT_SCHEMES = ("normal", "megatron", "depth_scaled", "deepnorm")
LAYER_OVERRIDE_KEYS = ("placement", "qk_norm", "residual_scale", "branch_scale")


def dyt_alpha_rule(d_model: int) -> tuple[float, float]:
    """DyT's width rule for alpha0 (attention site, other sites), DyT paper Tables 10-11."""
    if d_model <= 1024:
        return 1.0, 1.0
    if d_model <= 2048:
        return 1.0, 0.5
    if d_model <= 4096:
        return 0.8, 0.2
    if d_model <= 5120:
        return 0.6, 0.15  # LLaMA 13B, DyT paper Table 10
    return 0.2, 0.05


@dataclass
class ModelConfig:
    """A LLaMA-style decoder whose normalization is described by ``norm`` (type) and
    ``placement`` (which norm slots are on in each layer), see ``normlab.strategies``.

    Use ``ModelConfig.from_strategy("hybridnorm", n_layers=8)`` for the named presets.
    """

    vocab_size: int = 257
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: = n_heads (no GQA)
    ffn_hidden: int | None = None  # None: 8/3 * d_model rounded up to a multiple of 32
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    tie_embeddings: bool = False

    norm: str = "rmsnorm"
    placement: str = "pre"
    qk_norm: str | None = None  # None: 'qkv' for hybrid placements, 'qk' for output, else 'none'
    qk_norm_scope: str | None = None  # None: 'full' for output placement (OLMo 2), else 'head'
    qk_norm_type: str | None = None  # None: norm type, or rmsnorm when norm is bhyt/bhyt_star/none
    final_norm: str | None = None  # None: norm type, or rmsnorm for bhyt/bhyt_star; 'none' = off
    mixln_alpha: float = 0.25
    layer_overrides: dict[int, dict[str, Any]] = field(default_factory=dict)

    init: str = "normal"
    init_std: float | None = None  # None: 1 / sqrt(2.5 * d_model)
    norm_eps: float = 1e-5

    dyt_alpha_attn: float | None = None  # None: DyT width rule
    dyt_alpha_other: float | None = None  # None: DyT width rule
    embed_scale: bool = False  # learnable scalar on the embedding output, init sqrt(d_model)

    bhyt_kappa: float = 10.0
    bhyt_lambda_attn: float = 2.0
    bhyt_lambda_ffn: float = 1.0
    bhyt_eps: float = 1e-6
    bhyt_refresh_every: int = 100
    bhyt_context_len: int | None = None  # T in c_attn; None: max_seq_len (the trainer sets seq_len)

    # Mixture of experts (OLMoE style, normlab.nn.moe): 0 experts = dense SwiGLU FFN everywhere.
    moe_experts: int = 0
    moe_top_k: int = 2
    moe_ffn_hidden: int | None = None  # None: ffn_hidden
    moe_renormalize: bool = False  # OLMoE: top-k router probabilities are not renormalised
    moe_layers: list[int] | None = None  # None: every layer; else the MoE layers, dense elsewhere
    moe_aux_loss_weight: float = 0.01  # load-balancing loss weight
    moe_z_loss_weight: float = 0.001  # router z-loss weight

    strategy: str | None = None  # the named strategy this config came from (informational)
    preset: str | None = None  # the paper's model size it came from (informational, normlab.presets)

    # ------------------------------------------------------------------ construction
    def __post_init__(self) -> None:
        self._validate_and_resolve()

    @classmethod
    def from_strategy(cls, name: str, **overrides: Any) -> ModelConfig:
        """Config of a named strategy (see ``normlab.strategies.STRATEGIES``) with any field overridden."""
        from normlab.strategies import strategy_fields

        check_fields(overrides, "model")
        return cls(**{**strategy_fields(name), **overrides, "strategy": name})

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A paper's model size (see ``normlab.presets.PRESETS``) under ``strategy`` (default: the
        paper's own, e.g. hybridnorm_star for the HybridNorm sizes), any field overridden."""
        from normlab.presets import PRESETS, preset_fields

        fields_ = preset_fields(name)
        strategy = overrides.pop("strategy", None) or PRESETS[name].strategy
        return cls.from_strategy(strategy, **{**fields_, **overrides, "preset": name})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from plain data; a ``preset`` key applies that model size first, a ``strategy``
        key that strategy."""
        if not isinstance(data, dict):
            raise ConfigError(f"model: expected a mapping, got {type(data).__name__}")
        data = dict(data)
        preset = data.pop("preset", None)
        if preset is not None:
            return cls.from_preset(preset, **data)
        name = data.pop("strategy", None)
        if name is not None:
            return cls.from_strategy(name, **data)
        check_fields(data, "model")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_yaml(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(load_yaml(path))

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with ``changes`` applied, re-validated (derived fields are kept as resolved)."""
        check_fields(changes, "model")
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ derived values
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def deepnorm_alpha(self) -> float:
        """DeepNet decoder residual scale alpha = (2N)^(1/4)."""
        return (2 * self.n_layers) ** 0.25

    @property
    def deepnorm_beta(self) -> float:
        """DeepNet decoder init gain beta = (8N)^(-1/4)."""
        return (8 * self.n_layers) ** -0.25

    # ------------------------------------------------------------------ validation
    def _validate_and_resolve(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            _check_positive_int(name, getattr(self, name))
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        _check_positive_int("n_kv_heads", self.n_kv_heads)
        if self.ffn_hidden is None:
            self.ffn_hidden = 32 * math.ceil(8 * self.d_model / 3 / 32)
        _check_positive_int("ffn_hidden", self.ffn_hidden)
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"d_model: {self.d_model} is not divisible by n_heads={self.n_heads}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_kv_heads: n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"d_model: head size {self.head_dim} must be even for RoPE")

        # Imported here: the registries' modules import this one.
        from normlab.nn.registry import NORMS
        from normlab.strategies import PLACEMENTS

        check_choice("norm", self.norm, tuple(NORMS))
        check_choice("placement", self.placement, tuple(PLACEMENTS))
        placement = PLACEMENTS[self.placement]
        if self.qk_norm is None:
            self.qk_norm = placement.qk_norm
        check_choice("qk_norm", self.qk_norm, QK_NORMS)
        if self.qk_norm_scope is None:
            self.qk_norm_scope = placement.qk_norm_scope
        check_choice("qk_norm_scope", self.qk_norm_scope, QK_NORM_SCOPES)
        # A slots-only type (BHyT) and 'none' leave the QK-norm to RMSNorm; slots-only also the final norm.
        inner = tuple(name for name, cls in NORMS.items() if not getattr(cls, "slots_only", False))
        if self.qk_norm_type is None:
            self.qk_norm_type = self.norm if self.norm in inner and self.norm != "none" else "rmsnorm"
        check_choice("qk_norm_type", self.qk_norm_type, tuple(name for name in inner if name != "none"))
        if self.final_norm is None:
            self.final_norm = self.norm if self.norm in inner else "rmsnorm"
        check_choice("final_norm", self.final_norm, inner)
        check_choice("init", self.init, INIT_SCHEMES)

        _check_float("mixln_alpha", self.mixln_alpha)
        if not 0.0 <= self.mixln_alpha <= 1.0:
            raise ConfigError(f"mixln_alpha: {self.mixln_alpha} is outside [0, 1]")
        if self.init_std is None:
            self.init_std = 1.0 / math.sqrt(2.5 * self.d_model)
        for name in ("init_std", "norm_eps", "rope_theta", "bhyt_kappa", "bhyt_eps"):
            _check_positive_float(name, getattr(self, name))
        if self.dyt_alpha_attn is None or self.dyt_alpha_other is None:
            attn, other = dyt_alpha_rule(self.d_model)
            self.dyt_alpha_attn = attn if self.dyt_alpha_attn is None else self.dyt_alpha_attn
            self.dyt_alpha_other = other if self.dyt_alpha_other is None else self.dyt_alpha_other
        for name in ("dyt_alpha_attn", "dyt_alpha_other", "bhyt_lambda_attn", "bhyt_lambda_ffn"):
            _check_float(name, getattr(self, name))
        _check_positive_int("bhyt_refresh_every", self.bhyt_refresh_every)
        if self.bhyt_context_len is None:
            self.bhyt_context_len = self.max_seq_len
        _check_positive_int("bhyt_context_len", self.bhyt_context_len)
        for name in ("tie_embeddings", "embed_scale", "moe_renormalize"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        self._validate_moe()
        if self.strategy is not None:
            from normlab.strategies import STRATEGIES

            check_choice("strategy", self.strategy, tuple(STRATEGIES))
        if self.preset is not None:
            from normlab.presets import PRESETS

            check_choice("preset", self.preset, tuple(PRESETS))
        self.layer_overrides = self._normalized_overrides()

        # The plan validates combinations that only make sense per layer (e.g. BHyT needs Pre-Norm).
        from normlab.strategies import layer_plans

        layer_plans(self)

    def _validate_moe(self) -> None:
        if isinstance(self.moe_experts, bool) or not isinstance(self.moe_experts, int) or self.moe_experts < 0:
            raise ConfigError(f"moe_experts: expected an integer >= 0 (0 = dense), got {self.moe_experts!r}")
        _check_positive_int("moe_top_k", self.moe_top_k)
        if self.moe_ffn_hidden is None:
            self.moe_ffn_hidden = self.ffn_hidden
        _check_positive_int("moe_ffn_hidden", self.moe_ffn_hidden)
        for name in ("moe_aux_loss_weight", "moe_z_loss_weight"):
            _check_float(name, getattr(self, name))
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: expected a number >= 0, got {getattr(self, name)!r}")
        if not self.moe_experts:
            if self.moe_layers is not None:
                raise ConfigError("moe_layers: set moe_experts > 0 to have MoE layers")
            return
        if self.moe_top_k > self.moe_experts:
            raise ConfigError(f"moe_top_k: {self.moe_top_k} is above moe_experts={self.moe_experts}")
        if self.moe_layers is not None:
            if not isinstance(self.moe_layers, list) or not all(
                    isinstance(i, int) and not isinstance(i, bool) and -self.n_layers <= i < self.n_layers
                    for i in self.moe_layers):
                raise ConfigError(f"moe_layers: expected a list of layer indices below n_layers="
                                  f"{self.n_layers}, got {self.moe_layers!r}")
            self.moe_layers = sorted({i % self.n_layers for i in self.moe_layers})

    def _normalized_overrides(self) -> dict[int, dict[str, Any]]:
        if not isinstance(self.layer_overrides, dict):
            raise ConfigError("layer_overrides: expected a mapping {layer index: {field: value}}")
        out: dict[int, dict[str, Any]] = {}
        for key, spec in self.layer_overrides.items():
            if isinstance(key, bool) or not (isinstance(key, int) or re.fullmatch(r"-?[0-9]+", str(key))):
                raise ConfigError(f"layer_overrides: layer index '{key}' is not an integer")
            index = int(key)
            if not -self.n_layers <= index < self.n_layers:
                raise ConfigError(
                    f"layer_overrides: layer {index} is out of range for n_layers={self.n_layers}"
                )
            if not isinstance(spec, dict):
                raise ConfigError(f"layer_overrides.{key}: expected a mapping of field: value")
            for name, value in spec.items():
                where = f"layer_overrides.{key}.{name}"
                if name not in LAYER_OVERRIDE_KEYS:
                    raise ConfigError(
                        f"{where}: unknown key{did_you_mean(name, LAYER_OVERRIDE_KEYS)}; "
                        f"allowed: {', '.join(LAYER_OVERRIDE_KEYS)}"
                    )
                if name == "placement":
                    from normlab.strategies import layer_placements

                    check_choice(where, value, layer_placements())
                elif name == "qk_norm":
                    check_choice(where, value, QK_NORMS)
                else:
                    _check_float(where, value)
            merged = out.setdefault(index % self.n_layers, {})
            for name, value in spec.items():  # e.g. {0: ...} from YAML and '0' from the command line
                if name in merged and merged[name] != value:
                    raise ConfigError(f"layer_overrides: layer {index % self.n_layers} is given "
                                      f"{name}={merged[name]!r} and {name}={value!r}")
                merged[name] = value
        return dict(sorted(out.items()))


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name}: expected a positive integer, got {value!r}")


def _check_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name}: expected a number, got {value!r}")


def _check_positive_float(name: str, value: Any) -> None:
    _check_float(name, value)
    if value <= 0:
        raise ConfigError(f"{name}: expected a positive number, got {value!r}")


def check_fields(data: dict[str, Any], section: str, cls: type = ModelConfig) -> None:
    """Reject keys that are not fields of ``cls``, with a did-you-mean."""
    known = [f.name for f in fields(cls)]
    for key in data:
        if key not in known:
            raise ConfigError(f"{section}.{key}: unknown key{did_you_mean(key, known)}")


#: the largest seed anywhere (train.seed, --seeds, --seed): what torch.manual_seed takes (uint64)
MAX_SEED = 2**64 - 1


def check_seed(option: str, seed: int) -> None:
    """A ConfigError naming ``option`` unless 0 <= seed <= MAX_SEED."""
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"{option}: {seed} is outside 0..{MAX_SEED}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, turning a missing or unreadable file, text that is not UTF-8, or bad
    syntax into a one-line ConfigError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' does not exist") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file '{path}': not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"config file '{path}': {err.strerror}") from None
    try:
        data = yaml_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file '{path}'{where}: invalid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}': expected a mapping at the top level")
    return data


def parse_value(text: str) -> Any:
    """A command-line value as YAML: ``4`` -> 4, ``1e-3`` -> 0.001, ``true`` -> True, ``a,b`` -> 'a,b'."""
    try:
        return yaml_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(
    data: dict[str, Any], overrides: list[str], sections: tuple[str, ...]
) -> dict[str, Any]:
    """Apply ``section.key=value`` (or deeper ``section.a.b=value``) overrides to nested data."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ConfigError(f"override '{item}': expected SECTION.KEY=VALUE, e.g. model.n_layers=8")
        if parts[0] not in sections:
            raise ConfigError(
                f"override '{item}': unknown section '{parts[0]}'{did_you_mean(parts[0], sections)}; "
                f"sections: {', '.join(sections)}"
            )
        node = data
        for depth, part in enumerate(parts[:-1]):
            if node.get(part) is None:  # absent, or an empty YAML section
                node[part] = {}
            elif not isinstance(node[part], dict):
                raise ConfigError(f"override '{item}': {'.'.join(parts[:depth + 1])} is not a mapping")
            node = node[part]
        node[parts[-1]] = parse_value(text)
    return data


@dataclass
class DataConfig:
    """Where tokens come from. ``corpus``: 'default' (embedded standard-library docs), a text
    file, a directory, a glob, a JSONL file with a ``text`` field, or a list of those.
    ``tokenizer``: 'byte', a directory with GPT-2 ``vocab.json`` + ``merges.txt`` or a saved
    normlab tokenizer, or 'bpe:N' to train an N-token byte-level BPE on the corpus."""

    corpus: str | list[str] = "default"
    tokenizer: str = "byte"
    val_fraction: float = 0.05
    cache_dir: str | None = None  # None: $NORMLAB_CACHE or ~/.cache/normlab

    def __post_init__(self) -> None:
        if isinstance(self.corpus, list):
            if not self.corpus or not all(isinstance(c, str) for c in self.corpus):
                raise ConfigError("data.corpus: expected a path, a glob, 'default' or a list of those")
        elif not isinstance(self.corpus, str) or not self.corpus:
            raise ConfigError("data.corpus: expected a path, a glob, 'default' or a list of those")
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise ConfigError("data.tokenizer: expected 'byte', 'bpe:N' or a tokenizer directory")
        if self.tokenizer.startswith("bpe:"):
            size = self.tokenizer[4:]
            if not size.isdigit() or int(size) < 260:
                raise ConfigError(f"data.tokenizer: '{self.tokenizer}' needs a vocabulary size >= 260, e.g. bpe:4096")
        if self.cache_dir is not None and not isinstance(self.cache_dir, str):
            raise ConfigError(f"data.cache_dir: expected a directory path, got {self.cache_dir!r}")
        _check_float("data.val_fraction", self.val_fraction)
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(f"data.val_fraction: {self.val_fraction} is outside (0, 0.5)")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping. AdamW (no weight decay on norm parameters and scalars),
    linear warmup then cosine decay to ``lr * min_lr_ratio``."""

    max_steps: int = 200
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    seed: int = 0
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 100
    keep_last: int = 2
    precision: str = "fp32"
    compile: bool | str = False  # true, false or 'auto' (compile where a measured break-even says it pays)
    diverge_loss: float | None = None  # None: 3 * ln(vocab_size); a loss above it = diverged
    record_every: int = 0  # per-layer grad norms + residual RMS to layers.jsonl every N steps; 0 = off
    device: str = "auto"  # auto: cuda when available, else cpu
    distributed: str = "ddp"  # under torchrun: ddp (replicated) or fsdp (FSDP2, sharded)

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "seq_len", "grad_accum", "log_every", "eval_every",
                     "eval_batches", "save_every", "keep_last"):
            _check_positive_int(f"train.{name}", getattr(self, name))
        for name in ("warmup_steps", "seed", "record_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"train.{name}: expected a non-negative integer, got {value!r}")
        check_seed("train.seed", self.seed)
        _check_positive_float("train.lr", self.lr)
        for name in ("min_lr_ratio", "weight_decay", "grad_clip", "beta1", "beta2"):
            _check_float(f"train.{name}", getattr(self, name))
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}: expected a non-negative number, got {getattr(self, name)!r}")
        if self.min_lr_ratio > 1:
            raise ConfigError(f"train.min_lr_ratio: {self.min_lr_ratio} is above 1")
        for name in ("beta1", "beta2"):
            if getattr(self, name) >= 1:
                raise ConfigError(f"train.{name}: {getattr(self, name)} must be below 1")
        check_choice("train.precision", self.precision, ("fp32", "bf16"))
        check_choice("train.distributed", self.distributed, ("ddp", "fsdp"))
        if not (isinstance(self.compile, bool) or self.compile == "auto"):
            raise ConfigError(f"train.compile: expected true, false or auto, got {self.compile!r}")
        if self.diverge_loss is not None:
            _check_positive_float("train.diverge_loss", self.diverge_loss)
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")
        ):
            raise ConfigError(f"train.device: '{self.device}' is not auto, cpu, cuda, cuda:N or mps")


#: train fields that may change when a run is resumed (they do not change its trajectory)
RESUMABLE_TRAIN_FIELDS = ("max_steps", "log_every", "eval_every", "eval_batches", "save_every",
                          "keep_last", "compile", "device", "record_every", "distributed")
SECTIONS = ("model", "data", "train")
#: top-level keys of a run YAML: the sections and the plugin list
TOP_LEVEL_KEYS = (*SECTIONS, "plugins")


@dataclass
class RunConfig:
    """One YAML with sections ``model``, ``data``, ``train`` and an optional ``plugins`` list
    (files or modules that register norm types, placements, strategies; see normlab.plugins).
    ``model.vocab_size`` left out is taken from the tokenizer."""

    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    plugins: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any], vocab_size: int | None = None) -> RunConfig:
        for key in data:
            if key not in TOP_LEVEL_KEYS:
                raise ConfigError(f"{key}: unknown section{did_you_mean(key, TOP_LEVEL_KEYS)}; "
                                  f"top-level keys: {', '.join(TOP_LEVEL_KEYS)}")
        sections: dict[str, Any] = {"plugins": load_plugins(data.get("plugins"))}
        for name, section_cls in (("data", DataConfig), ("train", TrainConfig)):
            values = data.get(name) or {}
            if not isinstance(values, dict):
                raise ConfigError(f"{name}: expected a mapping")
            check_fields(values, name, section_cls)
            sections[name] = section_cls(**values)
        model = data.get("model") or {}
        if not isinstance(model, dict):
            raise ConfigError("model: expected a mapping")
        model = dict(model)
        if vocab_size is not None and "vocab_size" not in model:
            model["vocab_size"] = vocab_size
        sections["model"] = ModelConfig.from_dict(model)
        return cls(**sections)

    @classmethod
    def load(cls, path: str | Path | None, overrides: list[str] = (),
             plugins: list[str] = ()) -> dict[str, Any]:
        """The raw (unresolved) sections of a YAML file with dotted overrides applied, and its
        plugins (paths relative to the YAML file) plus ``plugins`` (relative to the working
        directory) loaded and listed under ``plugins``."""
        data = load_yaml(path) if path is not None else {}
        data = apply_overrides(data, list(overrides), SECTIONS)
        base = Path(path).parent if path is not None else None
        specs = [resolve(spec, base) for spec in check_specs(data.get("plugins"))]
        specs = load_plugins(list(dict.fromkeys(specs + [resolve(spec) for spec in plugins])))
        if specs:
            data["plugins"] = specs
        return data

    @classmethod
    def resolve(cls, raw: dict[str, Any], vocab_size: int) -> RunConfig:
        """The complete run config from raw sections and the tokenizer's vocabulary: vocab_size
        from the tokenizer and BHyT's T from train.seq_len unless given, then the cross-section
        checks (model.vocab_size fits the tokenizer, train.seq_len <= model.max_seq_len, the
        device exists). Resolving a resolved config's dict gives the same config."""
        raw = {k: dict(v or {}) if k in SECTIONS else v for k, v in raw.items()}
        train_seq_len = raw.get("train", {}).get("seq_len")
        model = raw.setdefault("model", {})
        if train_seq_len is not None and "bhyt_context_len" not in model:
            model["bhyt_context_len"] = train_seq_len
        cfg = cls.from_dict(raw, vocab_size=vocab_size)
        if "bhyt_context_len" not in model:
            cfg.model = cfg.model.replace(bhyt_context_len=cfg.train.seq_len)
        if cfg.model.vocab_size < vocab_size:
            raise ConfigError(
                f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
                f"({vocab_size}); leave it out to use the tokenizer's size"
            )
        pick_device(cfg.train.device, "train.device")  # fails now if the device is missing
        if cfg.train.seq_len > cfg.model.max_seq_len:
            raise ConfigError(
                f"train.seq_len: {cfg.train.seq_len} is above model.max_seq_len={cfg.model.max_seq_len}"
            )
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return {"plugins": list(self.plugins), "model": self.model.to_dict(),
                "data": dataclasses.asdict(self.data), "train": dataclasses.asdict(self.train)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Fields that differ between two resolved run configs (as dicts) and would change the
    trajectory.

    ``old`` (a run's config.yaml) is resolved again first, so that a field added to normlab
    after the run was written counts at its default value, not as a change."""
    try:
        old = {**old, **RunConfig.from_dict({k: old[k] for k in SECTIONS if k in old}).to_dict()}
    except NormlabError:
        pass  # compare as written; the differences will be listed
    changes = []
    for section in SECTIONS:
        a, b = old.get(section, {}), new.get(section, {})
        for key in sorted(set(a) | set(b)):
            if section == "train" and key in RESUMABLE_TRAIN_FIELDS:
                continue
            if a.get(key) != b.get(key):
                changes.append(f"{section}.{key} {a.get(key)!r} -> {b.get(key)!r}")
    return changes
