"""Import Llama, Qwen3 and OLMo-2 models from Hugging Face as normlab models.

llama -> ``pre_norm``, qwen3 -> ``qk_norm`` (per-head QK-norm), olmo2 -> ``output_norm`` (OLMo-2
reordered norm, full-width QK-norm). Sizes, GQA, tied embeddings, rope_theta and rms_norm_eps map
onto ModelConfig; the state dicts agree up to OLMo-2's ``post_attention_layernorm`` (normlab:
``attn_output_layernorm``). A feature normlab cannot represent (RoPE scaling, biases, sliding
windows, a head size other than hidden_size / num_attention_heads, an activation other than
SiLU) is refused with a ConfigError that names it; a damaged source (a config.json value of the
wrong type, a truncated or corrupt weights file, missing or misshapen weights) with a one-line
ConfigError or CheckpointError naming the file, before anything is written.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from normlab.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from normlab.errors import CheckpointError, ConfigError, DataError, NormlabError, check_creatable
from normlab.hf.export import STOCK_FAMILIES, StockFamily, write_directory
from normlab.nn.model import NormLM

FAMILIES = {family.model_type: family for family in STOCK_FAMILIES}


def require_transformers() -> Any:
    """The ``transformers`` module, or a one-line ConfigError saying how to install it."""
    try:
        import transformers
    except ImportError:
        raise ConfigError("this needs the optional transformers package: pip install 'normlab[hf]'") from None
    return transformers


def from_hf(source: Any) -> NormLM:
    """A normlab model (eval mode, fp32) whose logits equal those of a Llama, Qwen3, OLMo-2 or
    OLMoE model: a transformers model object, or a directory that ``from_pretrained`` reads."""
    return _load(source)[0]


def model_config_from_hf(hf_config: Any) -> ModelConfig:
    """The normlab ModelConfig of a transformers Llama / Qwen3 / OLMo-2 / OLMoE config: hidden_size ->
    d_model, num_hidden_layers -> n_layers, num_attention_heads -> n_heads, num_key_value_heads ->
    n_kv_heads, intermediate_size -> ffn_hidden, max_position_embeddings -> max_seq_len,
    rope_theta, rms_norm_eps -> norm_eps, tie_word_embeddings -> tie_embeddings."""
    family = _family(hf_config)
    feature = _unsupported_feature(hf_config)
    if feature is not None:
        raise ConfigError(f"{family.architecture}: {feature} cannot be represented in normlab")
    heads = hf_config.num_attention_heads
    moe = {}
    if family.moe:  # OLMoE: intermediate_size is each expert's width
        moe = {"moe_experts": hf_config.num_experts, "moe_top_k": hf_config.num_experts_per_tok,
               "moe_ffn_hidden": hf_config.intermediate_size,
               "moe_renormalize": bool(hf_config.norm_topk_prob),
               "moe_aux_loss_weight": float(getattr(hf_config, "router_aux_loss_coef", 0.01))}
    return ModelConfig.from_strategy(
        family.strategy, vocab_size=hf_config.vocab_size, d_model=hf_config.hidden_size,
        n_layers=hf_config.num_hidden_layers, n_heads=heads,
        n_kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
        ffn_hidden=hf_config.intermediate_size, max_seq_len=hf_config.max_position_embeddings,
        rope_theta=float(_rope(hf_config)["rope_theta"]), norm_eps=float(hf_config.rms_norm_eps),
        tie_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        qk_norm_scope=family.qk_norm_scope, **moe,
    )


def import_run(hf_dir: str | os.PathLike[str], out_run: str | os.PathLike[str]) -> Path:
    """Write a normlab run directory for the Hugging Face model in ``hf_dir``: a complete
    config.yaml whose data.tokenizer is the run's own ``tokenizer/`` (the model's tokenizer.json,
    end-of-text = its eos_token_id), ``checkpoints/step_000000`` and a finished status.json naming
    the source. ``load_run``, evaluate, generate, diagnose and export read it like a trained run."""
    from normlab.train.checkpoint import save_checkpoint
    from normlab.train.rundir import RunDir

    out = Path(out_run).resolve()
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise CheckpointError(f"'{out}' already exists; import into a new or empty directory")
    if not out.exists():
        check_creatable(out)
    source = Path(hf_dir).resolve()
    model, hf_config = _load(source)
    tokenizer = _tokenizer(source, hf_config)
    run_config = RunConfig(
        model=model.config, data=DataConfig(tokenizer=str(out / "tokenizer")),
        train=TrainConfig(seq_len=min(TrainConfig.seq_len, model.config.max_seq_len)),
    )

    def write(directory: Path) -> None:
        run = RunDir(directory)
        run.write_config(run_config.to_dict())
        tokenizer.save(run.tokenizer_path)
        save_checkpoint(run.checkpoints, 0, model, {"step": 0, "imported_from": str(source)}, keep_last=1)
        run.write_status("finished", step=0, reason=f"imported from {source}")

    write_directory(out, write)
    return out


def _load(source: Any) -> tuple[NormLM, Any]:
    """(normlab model, transformers config) of ``source`` (a model object or a directory)."""
    transformers = require_transformers()
    if isinstance(source, (str, os.PathLike)):
        if not Path(source).is_dir():
            raise CheckpointError(f"'{source}' is not a directory (expected a Hugging Face model directory)")
        config_path = Path(source) / "config.json"
        try:
            hf_config = transformers.AutoConfig.from_pretrained(source)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"'{source}' holds no readable Hugging Face model: "
                                  f"{str(err).strip().splitlines()[0]}") from None
        except _config_errors() as err:  # a value of the wrong type, inconsistent sizes
            raise ConfigError(f"'{config_path}': {_one_line(err)}") from None
        try:
            cfg = model_config_from_hf(hf_config)
        except NormlabError as err:
            raise ConfigError(f"'{config_path}': {err}") from None
        except (TypeError, ValueError, AttributeError) as err:
            raise ConfigError(f"'{config_path}': {type(err).__name__}: {_one_line(err)}") from None
        hf_model = _load_weights(transformers, Path(source), hf_config)
    else:
        hf_model, hf_config = source, source.config
        cfg = model_config_from_hf(hf_config)
    family = _family(hf_config)
    model = NormLM(cfg)
    state = {family.normlab_name(key): value for key, value in hf_model.state_dict().items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{family.architecture} weights do not fit normlab's {family.strategy} "
                              f"model: {str(err).strip().splitlines()[-1].strip()}") from None
    return model.eval(), hf_config


def _load_weights(transformers: Any, source: Path, hf_config: Any) -> Any:
    """``from_pretrained`` of the model in ``source`` (fp32, transformers' load report silenced);
    a one-line CheckpointError naming the file for weights that are unreadable (truncated,
    corrupt), missing or of the wrong shape, which transformers would fill with random values."""
    from safetensors import SafetensorError

    _check_safetensors(source)
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()  # its load report and progress bar would be more lines on stderr
    logging.disable_progress_bar()
    try:
        hf_model, info = transformers.AutoModelForCausalLM.from_pretrained(
            source, config=hf_config, dtype=torch.float32, output_loading_info=True,
            ignore_mismatched_sizes=True)
    except (EOFError, pickle.UnpicklingError):  # torch.load's message is a page of advice
        raise CheckpointError(f"'{source}': its PyTorch weights (.bin) cannot be read: truncated, "
                              "corrupt or holding more than tensors") from None
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise CheckpointError(f"'{source}': its weights cannot be loaded: {_one_line(err)}") from None
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
    files = sorted(path.name for path in source.glob("*.safetensors"))
    where = f"'{source / files[0]}'" if len(files) == 1 else f"'{source}'" + (f" ({', '.join(files)})" if files else "")
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{where} is incomplete: missing {', '.join(missing[:3])}{more}")
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        key, theirs, ours = mismatched[0]
        raise CheckpointError(f"{where}: {key} has shape {tuple(theirs)} but config.json gives "
                              f"{tuple(ours)}" + (f" ({len(mismatched) - 1} more mismatched)"
                                                  if len(mismatched) > 1 else ""))
    return hf_model


def _check_safetensors(source: Path) -> None:
    """Read the header of each safetensors file ``from_pretrained`` would read (model.safetensors,
    or the shards its index names); CheckpointError naming a truncated or corrupt one."""
    from safetensors import SafetensorError, safe_open

    paths = [source / "model.safetensors"]
    try:
        index = json.loads((source / "model.safetensors.index.json").read_text())
        paths += [source / name for name in sorted(set(index["weight_map"].values()))]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        pass  # no index, or one from_pretrained will refuse
    for path in paths:
        if not path.is_file():
            continue
        try:
            with safe_open(os.fspath(path), framework="pt") as weights:
                weights.keys()
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"'{path}' is not a valid safetensors file (truncated or corrupt): "
                                  f"{_one_line(err)}") from None


def _config_errors() -> tuple[type[BaseException], ...]:
    """huggingface_hub's strict-dataclass validation errors (transformers 5 configs), if any."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:
        return ()
    return (StrictDataclassError,)


def _one_line(err: BaseException) -> str:
    """The message of ``err`` on one line, its whitespace runs collapsed."""
    return " ".join(str(err).split()) or type(err).__name__


def _family(hf_config: Any) -> StockFamily:
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in FAMILIES:
        raise ConfigError(f"model type '{model_type}' cannot be imported; normlab imports "
                          f"{', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def _rope(hf_config: Any) -> dict[str, Any]:
    """RoPE parameters as transformers 5 stores them (``rope_parameters``) or 4 (``rope_theta``,
    ``rope_scaling``), with ``rope_type`` and ``rope_theta`` always present."""
    rope = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None)
                or {})
    rope.setdefault("rope_type", rope.pop("type", "default"))
    rope.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    return rope


def _unsupported_feature(hf_config: Any) -> str | None:
    """The first feature of ``hf_config`` normlab's model does not have, in words; None if none."""
    rope = _rope(hf_config)
    heads, hidden = hf_config.num_attention_heads, hf_config.hidden_size
    head_dim = getattr(hf_config, "head_dim", None) or hidden // heads
    activation = getattr(hf_config, "hidden_act", "silu")
    layer_types = getattr(hf_config, "layer_types", None) or ()
    checks = (
        (rope["rope_type"] != "default", f"RoPE scaling '{rope['rope_type']}'"),
        (rope.get("partial_rotary_factor", 1.0) != 1.0, "partial rotary embedding"),
        (bool(getattr(hf_config, "attention_bias", False)), "attention bias"),
        (bool(getattr(hf_config, "mlp_bias", False)), "MLP bias"),
        (activation != "silu", f"activation '{activation}' (normlab's FFN is SwiGLU)"),
        (bool(getattr(hf_config, "use_sliding_window", False))
         or getattr(hf_config, "sliding_window", None) is not None
         or any(kind != "full_attention" for kind in layer_types), "sliding-window attention"),
        (getattr(hf_config, "clip_qkv", None) is not None, "clipped Q/K/V (clip_qkv)"),
        (head_dim != hidden // heads,
         f"head_dim {head_dim} (normlab's is hidden_size / num_attention_heads = {hidden // heads})"),
    )
    return next((feature for present, feature in checks if present), None)


def _tokenizer(hf_dir: Path, hf_config: Any):
    """The model's ``tokenizer.json`` as a normlab tokenizer whose end-of-text is eos_token_id."""
    from tokenizers import Tokenizer as HFTokenizer

    from normlab.data import BPETokenizer
    from normlab.data.tokenizers import EOS

    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"'{hf_dir}' has no tokenizer.json; save the model's fast tokenizer there "
                        "(AutoTokenizer.from_pretrained(...).save_pretrained(DIR))")
    try:
        hf_tokenizer = HFTokenizer.from_file(os.fspath(path))
    except Exception as err:
        raise DataError(f"'{path}' is unreadable: {err}") from None
    eos_id = getattr(hf_config, "eos_token_id", None)
    eos_id = eos_id[0] if isinstance(eos_id, (list, tuple)) else eos_id
    eos = EOS if eos_id is None else hf_tokenizer.id_to_token(eos_id)
    if eos is None:
        raise DataError(f"'{path}': eos_token_id {eos_id} is not in the vocabulary")
    return BPETokenizer(hf_tokenizer, name=f"hf:{hf_dir.name}", eos_token=eos)
