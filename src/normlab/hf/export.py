"""Export a normlab model to a Hugging Face directory that ``from_pretrained`` loads.

OUT_DIR gets ``model.safetensors``, ``config.json``, ``generation_config.json``, ``tokenizer.json``
and ``tokenizer_config.json``. Two formats:

- ``stock``: a transformers class that computes exactly the same function, decided from the
  resolved config and the per-layer plans: every layer plain Pre-Norm RMSNorm -> Llama; the same
  with per-head RMSNorm QK-norm -> Qwen3; every layer OLMo-2 output norm with full-width RMSNorm
  QK-norm -> OLMo-2 (all with RMSNorm final norm, scales 1, no embedding scale).
- ``custom``: any strategy. ``modeling_normlab.py`` (written into OUT_DIR, loaded with
  ``trust_remote_code=True``) is normlab's own model source plus a small transformers wrapper;
  ``config.json`` holds every ModelConfig field and the per-layer plans. A norm type from a
  plugin is exported as a copy of the plugin's file (``plugin_NAME.py``, its ``normlab`` imports
  pointed at ``modeling_normlab``) that ``modeling_normlab.py`` imports.

``auto`` picks stock when it is exact. The directory is written next to OUT_DIR and renamed into
place; an existing OUT_DIR is replaced only when it is empty or a previous normlab export
(``exported_by`` in its config.json) holding nothing but the files an export writes; anything
else is refused with a ConfigError before anything is written or deleted.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file

from normlab.config import ModelConfig
from normlab.data import Tokenizer
from normlab.errors import ConfigError, check_choice, check_creatable
from normlab.nn.model import NormLM
from normlab.nn.registry import norm_class
from normlab.strategies import describe_plan, layer_plans
from normlab.version import __version__

FORMATS = ("auto", "stock", "custom")
WEIGHTS_FILE, CONFIG_FILE, MODELING_FILE = "model.safetensors", "config.json", "modeling_normlab.py"
GENERATION_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json")
EXPORT_FILES = (WEIGHTS_FILE, CONFIG_FILE, GENERATION_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE,
                MODELING_FILE)
"""The files an export writes, besides a copy ``plugin_NAME.py`` of each plugin it uses."""

#: normlab modules whose source forms ``modeling_normlab.py``, in dependency order
BUNDLED_MODULES = ("normlab.errors", "normlab.nn.registry", "normlab.nn.plan", "normlab.nn.norms",
                   "normlab.nn.attention", "normlab.nn.mlp", "normlab.nn.moe",
                   "normlab.nn.block", "normlab.nn.backbone", "normlab.hf.modeling_template")


@dataclass(frozen=True)
class StockFamily:
    """A transformers architecture that computes exactly what the normlab ``strategy`` computes
    with QK-norm over ``qk_norm_scope`` and, for ``moe`` families, a mixture of experts in every
    layer; ``renames`` maps normlab module names to the family's."""

    architecture: str
    model_type: str
    strategy: str
    renames: dict[str, str] = dataclasses.field(default_factory=dict)
    qk_norm_scope: str = "head"
    moe: bool = False

    def hf_name(self, name: str) -> str:
        """A normlab state-dict key as this family names it."""
        return ".".join(self.renames.get(part, part) for part in name.split("."))

    def normlab_name(self, name: str) -> str:
        """A state-dict key of this family as normlab names it."""
        back = {theirs: ours for ours, theirs in self.renames.items()}
        return ".".join(back.get(part, part) for part in name.split("."))


STOCK_FAMILIES = (
    StockFamily("LlamaForCausalLM", "llama", "pre_norm"),
    StockFamily("Qwen3ForCausalLM", "qwen3", "qk_norm"),
    StockFamily("Olmo2ForCausalLM", "olmo2", "output_norm",
                {"attn_output_layernorm": "post_attention_layernorm"}, qk_norm_scope="full"),
    StockFamily("OlmoeForCausalLM", "olmoe", "qk_norm", qk_norm_scope="full", moe=True),
)


def stock_family(cfg: ModelConfig) -> tuple[StockFamily | None, str]:
    """The stock family computing exactly ``cfg``'s function, or None and the reason why none does.

    Exact means: RMSNorm slots and final norm, no embedding scale, and every layer's plan (slots,
    QK-norm, scales 1) and QK-norm scope and type equal to the family's strategy preset."""
    if cfg.norm != "rmsnorm" or cfg.final_norm != "rmsnorm":
        return None, f"norm '{cfg.norm}' with final norm '{cfg.final_norm}' (stock classes use RMSNorm)"
    if cfg.embed_scale:
        return None, "the embedding output is scaled (stock classes do not scale it)"
    if cfg.moe_experts and cfg.moe_layers is not None:
        return None, "dense and MoE layers are interleaved (moe_layers); stock OLMoE has MoE everywhere"
    plans = set(layer_plans(cfg))
    for family in STOCK_FAMILIES:
        if family.moe != bool(cfg.moe_experts):
            continue
        (plan,) = layer_plans(ModelConfig.from_strategy(family.strategy, n_layers=1))
        same_qk = plan.qk_norm == "none" or (cfg.qk_norm_scope, cfg.qk_norm_type) == (
            family.qk_norm_scope, "rmsnorm")
        if plans == {plan} and same_qk:
            return family, ""
    plan = "; ".join(describe_plan(cfg).splitlines())
    return None, (f"no stock class has the layer plan ({plan}; QK-norm scope {cfg.qk_norm_scope}, type "
                  f"{cfg.qk_norm_type}{', MoE' if cfg.moe_experts else ''}); stock: Llama = pre, Qwen3 = "
                  "pre + per-head QK-norm, OLMo-2 = output + full-width QK-norm, OLMoE = pre + "
                  "full-width QK-norm + MoE")


def export(model: NormLM, out_dir: str | os.PathLike[str], tokenizer: Tokenizer,
           format: str = "auto") -> str:
    """Write ``model`` and ``tokenizer`` to ``out_dir`` as a Hugging Face model; returns the format
    used ('stock' or 'custom'). ``format='stock'`` raises ConfigError when no stock class is exact;
    an existing ``out_dir`` must be empty or a previous export holding nothing else (it is
    replaced); see ``check_export_dir``."""
    check_choice("format", format, FORMATS)
    out = Path(out_dir).resolve()
    check_export_dir(out)
    cfg = model.config
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ConfigError(f"tokenizer '{tokenizer.name}' has {tokenizer.vocab_size} ids but the model "
                          f"only {cfg.vocab_size}")
    family, reason = stock_family(cfg) if format != "custom" else (None, "")
    moe = {}
    if family is not None and family.moe:
        moe = {"intermediate_size": cfg.moe_ffn_hidden, "num_experts": cfg.moe_experts,
               "num_experts_per_tok": cfg.moe_top_k, "norm_topk_prob": cfg.moe_renormalize,
               "router_aux_loss_coef": cfg.moe_aux_loss_weight, "clip_qkv": None}
    if format == "stock" and family is None:
        raise ConfigError(f"format 'stock': {reason}; use format 'custom' or 'auto'")
    hf_tokenizer = tokenizer.hf_tokenizer()
    eos = hf_tokenizer.id_to_token(tokenizer.eos_id)
    if family is None:
        config = {**_custom_entry_points(), **_standard_config(model, tokenizer.eos_id),
                  **_normlab_fields(cfg)}
        weights = model.state_dict()
    else:
        config = {"architectures": [family.architecture], "model_type": family.model_type,
                  **_standard_config(model, tokenizer.eos_id), **moe}
        weights = {family.hf_name(k): v for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        weights.pop("lm_head.weight")  # transformers ties it to model.embed_tokens.weight
    plugins = plugin_sources(cfg) if family is None else {}
    modeling = modeling_source(plugins) if family is None else None

    def write(directory: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()},
                  os.fspath(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        _write_json(directory / CONFIG_FILE, config)
        _write_json(directory / GENERATION_FILE,
                    {"bos_token_id": tokenizer.eos_id, "eos_token_id": tokenizer.eos_id,
                     "pad_token_id": tokenizer.eos_id})
        hf_tokenizer.save(os.fspath(directory / TOKENIZER_FILE))
        _write_json(directory / TOKENIZER_CONFIG_FILE, {
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eos, "eos_token": eos,
            "unk_token": eos, "model_max_length": cfg.max_seq_len,
            "clean_up_tokenization_spaces": False})
        if modeling is not None:
            (directory / MODELING_FILE).write_text(modeling)
        for name, (source, _) in plugins.items():
            (directory / f"{name}.py").write_text(source)

    write_directory(out, write)
    return "custom" if family is None else "stock"


def export_run(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
               format: str = "auto", step: int | None = None) -> str:
    """``export`` the model of a run directory at checkpoint ``step`` (default: newest) with the
    run's tokenizer; returns the format used."""
    from normlab.train.saved import load_run

    saved = load_run(run_dir, step)
    return export(saved.model, out_dir, saved.tokenizer(), format)


def _standard_config(model: NormLM, eos_id: int) -> dict:
    """config.json keys every format shares: the transformers standard names."""
    cfg = model.config
    return {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.norm_eps, "attention_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": eos_id, "eos_token_id": eos_id,
        "pad_token_id": None, "torch_dtype": str(model.lm_head.weight.dtype).removeprefix("torch."),
        "exported_by": f"normlab {__version__}",
    }


def _custom_entry_points() -> dict:
    """config.json keys that send transformers to ``modeling_normlab.py``."""
    return {
        "architectures": ["NormlabForCausalLM"], "model_type": "normlab",
        "auto_map": {"AutoConfig": "modeling_normlab.NormlabConfig",
                     "AutoModelForCausalLM": "modeling_normlab.NormlabForCausalLM"},
    }


def _normlab_fields(cfg: ModelConfig) -> dict:
    """Every ModelConfig field and one LayerPlan dict per layer (the remote code needs no
    strategy logic)."""
    return {**cfg.to_dict(), "layer_plans": [dataclasses.asdict(plan) for plan in layer_plans(cfg)]}


def modeling_source(plugins: dict[str, tuple[str, list[str]]] | None = None) -> str:
    """``modeling_normlab.py``: the source of BUNDLED_MODULES in order, their ``normlab`` and
    ``__future__`` imports dropped, then an import of each plugin copy (``plugin_sources``) for
    the norm classes it registers. Raises RuntimeError when a dropped import names something
    the bundle does not define, or the bundle imports anything beyond torch, transformers and
    the standard library."""
    parts = [f'"""A normlab {__version__} model for transformers (trust_remote_code=True), generated '
             'by normlab.hf.export from normlab\'s own model source."""\n\nfrom __future__ import annotations\n']
    dropped: list[tuple[str, str]] = []
    for module in BUNDLED_MODULES:
        path = Path(importlib.util.find_spec(module).origin)
        source = path.read_text()
        lines = source.splitlines(keepends=True)
        for node in ast.parse(source).body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("normlab", "__future__"):
                lines[node.lineno - 1:node.end_lineno] = [""] * (node.end_lineno - node.lineno + 1)
                if node.module != "__future__":
                    dropped += [(module, alias.name) for alias in node.names]
        parts.append(f"\n# {'-' * 30} {module} ({path.name})\n\n" + "".join(lines))
    bundle = "".join(parts)
    defined = _check_bundle(bundle, dropped)
    for name, (source, _) in (plugins or {}).items():
        missing = [imported for imported in _bundle_imports(source) if imported not in defined]
        if missing:
            raise ConfigError(f"plugin {name}: imports {', '.join(missing)} from normlab, which an "
                              "exported model does not contain; import from normlab.nn or normlab")
    if plugins:
        bundle += f"\n# {'-' * 30} plugins (importing them registers their norm types)\n\n"
        bundle += "".join(f"from .{name} import {', '.join(classes)}  # noqa: E402, F401\n"
                          for name, (_, classes) in plugins.items())
    return bundle


def plugin_sources(cfg: ModelConfig) -> dict[str, tuple[str, list[str]]]:
    """module name -> (source, norm class names) of each plugin file whose norm types ``cfg``
    uses, the source's ``normlab`` imports rewritten to import from ``modeling_normlab``."""
    files: dict[Path, list[str]] = {}
    for kind in dict.fromkeys((cfg.norm, cfg.qk_norm_type, cfg.final_norm)):
        cls = norm_class(kind)
        if cls.__module__.split(".")[0] != "normlab":
            files.setdefault(Path(sys.modules[cls.__module__].__file__), []).append(cls.__qualname__)
    return {f"plugin_{path.stem}": (_rewrite_normlab_imports(path.read_text(), path), classes)
            for path, classes in files.items()}


def _bundle_imports(source: str) -> list[str]:
    """The names ``source`` imports with ``from .modeling_normlab import ...``."""
    return [alias.name for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module == "modeling_normlab"
            for alias in node.names]


def _rewrite_normlab_imports(source: str, path: Path) -> str:
    """``import normlab [as x]`` -> ``from . import modeling_normlab as x``; ``from normlab.y
    import z`` -> ``from .modeling_normlab import z`` (the bundle defines normlab.nn's names)."""
    lines = source.splitlines(keepends=True)
    for node in ast.parse(source, str(path)).body:
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "normlab" for a in node.names):
            if len(node.names) != 1 or node.names[0].name != "normlab":
                raise ConfigError(f"plugin '{path}' line {node.lineno}: write 'import normlab' alone on "
                                  "its line so that an export can replace it")
            new = f"from . import modeling_normlab as {node.names[0].asname or 'normlab'}\n"
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "normlab":
            names = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in node.names)
            new = f"from .modeling_normlab import {names}\n"
        else:
            continue
        lines[node.lineno - 1:node.end_lineno] = [new] + [""] * (node.end_lineno - node.lineno)
    return "".join(lines)


def _check_bundle(bundle: str, dropped: list[tuple[str, str]]) -> set[str]:
    """The names the bundle defines; RuntimeError when it cannot stand alone."""
    tree = ast.parse(bundle)
    defined: list[str] = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.append(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            defined += [t.id for t in targets if isinstance(t, ast.Name)]
    twice = sorted({name for name in defined if defined.count(name) > 1})
    missing = [f"{name} (imported by {module})" for module, name in dropped if name not in defined]
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or ".")
    allowed = {"torch", "transformers", "__future__", *sys.stdlib_module_names}
    foreign = sorted(name for name in imported if name.split(".")[0] not in allowed)
    if twice or missing or foreign:
        raise RuntimeError(f"{MODELING_FILE} cannot be bundled: defined twice {twice}, "
                           f"not defined {missing}, foreign imports {foreign}")
    return set(defined)


def write_directory(out: Path, write: Callable[[Path], None]) -> None:
    """Run ``write`` on a fresh temporary sibling of ``out``, then rename it to ``out``; an
    existing ``out`` (the caller decides whether it may go) is removed after the rename."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = (out.with_name(f".{out.name}.{tag}-{os.getpid()}") for tag in ("tmp", "old"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def check_export_dir(out: Path) -> None:
    """Raise ConfigError, touching nothing, unless ``out`` may become an export: it does not
    exist (and can be made), or it is an empty directory, or an earlier normlab export holding
    only files an export writes (EXPORT_FILES, ``plugin_*.py``), which is replaced."""
    if not out.exists():
        check_creatable(out)
        return
    if not out.is_dir():
        raise ConfigError(f"OUT_DIR '{out}' is a file, not a directory; choose a new or empty directory")
    entries = sorted(path.name for path in out.iterdir())
    if not entries:
        return
    if not _is_export(out):
        raise ConfigError(f"OUT_DIR '{out}' is not empty and not a normlab export; choose a new or "
                          "empty directory")
    foreign = [name for name in entries if not _written_by_export(out / name)]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConfigError(f"OUT_DIR '{out}' holds {shown} besides an earlier export, which replacing "
                          "the export would delete; move them elsewhere or choose another directory")


def _written_by_export(path: Path) -> bool:
    """Whether ``path`` is a file of the kind an export writes (it may be replaced)."""
    exported = path.name in EXPORT_FILES or (path.name.startswith("plugin_") and path.suffix == ".py")
    return exported and path.is_file() and not path.is_symlink()


def _is_export(directory: Path) -> bool:
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and str(config.get("exported_by", "")).startswith("normlab")


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")



