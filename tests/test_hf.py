"""Hugging Face bridge: export of all 13 strategies (stock classes where exact, custom code
otherwise), tokenizers for AutoTokenizer, import of Llama / Qwen3 / OLMo-2, run directories and
the errors a user can cause."""

from __future__ import annotations

import ast
import inspect
import json
import subprocess
import sys
import sysconfig
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import torch

from normlab import STRATEGIES, ModelConfig, build_model
from normlab.data import ByteTokenizer, load_tokenizer, train_bpe
from normlab.errors import CheckpointError, ConfigError, DataError
from normlab.hf import export, export_run, from_hf, import_run, model_config_from_hf
from normlab.nn import reference_norms
from normlab.nn.backbone import Backbone
from normlab.nn.block import Block
from normlab.strategies import layer_plans
from normlab.train.rundir import RunDir
from normlab.train.saved import load_run
from reference import tree

transformers = pytest.importorskip("transformers")

SIZES = dict(vocab_size=257, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=64,
             rope_theta=500.0, norm_eps=1e-4)
STOCK_CLASSES = {"pre_norm": "LlamaForCausalLM", "qk_norm": "Qwen3ForCausalLM",
                 "output_norm": "Olmo2ForCausalLM"}
TEXTS = ["Hello, world!", " leading space,  two spaces", "héllo wörld — 日本語 🙂\n\ttab", "x"]
EOS = 256


def _randomized(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight far from its init (matrices ~ N(0, 0.2); gains, scalars and buffers such as
    c_attn times U[0.8, 1.2)), so that a wrong name, eps or scale shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.ndim >= 2:
                tensor.copy_(0.2 * torch.randn(tensor.shape, generator=gen))
            else:
                tensor.mul_(0.8 + 0.4 * torch.rand(tensor.shape, generator=gen))
    return module.eval()


def _model(name: str, tie: bool = False, **overrides) -> torch.nn.Module:
    cfg = ModelConfig.from_strategy(name, **{**SIZES, "tie_embeddings": tie, **overrides})
    return _randomized(build_model(cfg, seed=0), seed=1)


def _ids(batch: int = 2, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, EOS, (batch, length), generator=torch.Generator().manual_seed(seed))


def _load_hf(path: Path) -> torch.nn.Module:
    """AutoModelForCausalLM of an export; fails on any missing, unexpected or mismatched key."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, trust_remote_code=True, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def _assert_same_logits(hf, ours, ids: torch.Tensor) -> None:
    """The export runs the norms' formulas, so ours runs them too: formula against formula,
    1e-5 is tight enough to show a wrong eps. (normlab's fused kernels sum in another order and
    move logits of size 5 by about 1e-5 over 4 layers; tests/test_norm_paths.py checks them.)"""
    with torch.no_grad(), reference_norms():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=0, atol=1e-5)


def _assert_same_greedy(hf, ours, prompt: torch.Tensor, new: int = 8) -> None:
    """HF greedy generate equals normlab's, HF feeds one token per step (its KV cache), and the
    logits of every step equal normlab's over the whole sequence (a cache that HF's generate
    does not pass on would show here even where the greedy tokens happen to agree)."""
    lengths: list[int] = []

    def record(_module, args, kwargs):
        lengths.append((args[0] if args else kwargs["input_ids"]).shape[1])

    hook = hf.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        generated = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                                do_sample=False, output_logits=True, return_dict_in_generate=True)
    finally:
        hook.remove()
    out = generated.sequences
    with torch.no_grad(), reference_norms():
        whole = ours(out[:, :-1])[:, prompt.shape[1] - 1:]
    torch.testing.assert_close(torch.stack(generated.logits, 1), whole, rtol=0, atol=1e-4)
    expected = ours.generate(prompt, new, temperature=0.0, eos_token_id=EOS)
    n = out.shape[1]  # HF stops when every sequence emitted the end-of-text id
    assert torch.equal(out, expected[:, :n]) and bool((expected[:, n:] == EOS).all())
    assert lengths == [prompt.shape[1]] + [1] * (n - prompt.shape[1] - 1)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_exports_with_equal_logits_and_greedy_generation(name, tmp_path):
    tie = sorted(STRATEGIES).index(name) % 2 == 0
    model = _model(name, tie=tie)
    used = export(model, tmp_path / "out", ByteTokenizer())
    assert used == ("stock" if name in STOCK_CLASSES else "custom")
    hf = _load_hf(tmp_path / "out")
    assert type(hf).__name__ == STOCK_CLASSES.get(name, "NormlabForCausalLM")
    assert hf.config.tie_word_embeddings == tie
    _assert_same_logits(hf, model, _ids())
    _assert_same_greedy(hf, model, _ids(1, 5, seed=1))


@pytest.mark.parametrize("name", sorted(STOCK_CLASSES))
def test_stock_exact_strategies_also_export_as_custom_code(name, tmp_path):
    model = _model(name)
    assert export(model, tmp_path / "out", ByteTokenizer(), format="custom") == "custom"
    hf = _load_hf(tmp_path / "out")
    assert type(hf).__name__ == "NormlabForCausalLM"
    _assert_same_logits(hf, model, _ids())


def test_stock_format_is_decided_from_the_layer_plans(tmp_path):
    for model, reason in ((_model("hybridnorm"), "hybrid"), (_model("dyt"), "norm 'dyt'"),
                          (_model("pre_norm", layer_overrides={1: {"placement": "post"}}), "post"),
                          (_model("qk_norm", qk_norm_scope="full"), "scope full")):
        with pytest.raises(ConfigError, match=reason) as err:
            export(model, tmp_path / "out", ByteTokenizer(), format="stock")
        assert "\n" not in str(err.value) and "stock" in str(err.value)
        assert not (tmp_path / "out").exists()
    # Mix-LN over 3 layers has floor(0.25 * 3) = 0 Post-Norm layers: plain Pre-Norm, so Llama.
    mixln = _model("mixln", n_layers=3)
    assert export(mixln, tmp_path / "out", ByteTokenizer(), format="stock") == "stock"
    hf = _load_hf(tmp_path / "out")
    assert type(hf).__name__ == "LlamaForCausalLM"
    _assert_same_logits(hf, mixln, _ids())


def test_custom_config_holds_the_model_config_plans_and_standard_names(tmp_path):
    model = _model("hybridnorm_star", tie=True)
    export(model, tmp_path / "out", ByteTokenizer())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    cfg = model.config
    assert config["model_type"] == "normlab"
    assert config["auto_map"] == {"AutoConfig": "modeling_normlab.NormlabConfig",
                                  "AutoModelForCausalLM": "modeling_normlab.NormlabForCausalLM"}
    assert {f.name for f in fields(ModelConfig)} <= set(config)
    assert ModelConfig.from_dict({key: config[key] for key in cfg.to_dict()}) == cfg
    assert config["layer_plans"] == [asdict(plan) for plan in layer_plans(cfg)]
    assert config["layer_plans"][0]["placement"] == "pre" and config["layer_plans"][1]["placement"] == "hybrid"
    assert (config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]) == (257, 32, 4)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert config["max_position_embeddings"] == cfg.max_seq_len
    assert config["tie_word_embeddings"] is True
    assert config["bos_token_id"] == config["eos_token_id"] == EOS


def test_modeling_file_is_normlab_source_importing_only_torch_transformers_stdlib(tmp_path):
    export(_model("bhyt"), tmp_path / "out", ByteTokenizer())
    source = (tmp_path / "out" / "modeling_normlab.py").read_text()
    for function in (Block.forward, Block.shared_statistic_attention, Backbone.forward):
        assert inspect.getsource(function) in source
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or ".").split(".")[0])
    assert "torch" in imported and "transformers" in imported
    assert imported <= {"torch", "transformers", "__future__", *sys.stdlib_module_names}, imported


def run_without_normlab(script: str, cwd: Path) -> dict:
    """Run ``script`` in ``cwd`` with site-packages but neither normlab nor the working tree
    importable; returns the JSON object it prints last. ``sys.argv[1:]`` are the site-packages
    directories for the script to add to ``sys.path``."""
    paths = sorted({sysconfig.get_paths()[key] for key in ("purelib", "platlib")})
    # -I: no PYTHONPATH, no user site, no cwd on sys.path; -S: no .pth files (normlab's editable
    # install is one); only the site-packages directories are added back.
    result = subprocess.run([sys.executable, "-I", "-S", "-c", script, *paths], cwd=cwd,
                            capture_output=True, text=True, timeout=120,
                            env={"HOME": str(cwd), "HF_HOME": str(cwd / "hf"), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_custom_export_loads_where_normlab_is_not_importable(tmp_path):
    model = _model("bhyt", tie=True)
    export(model, tmp_path / "out", ByteTokenizer())
    ids, prompt = _ids(), _ids(1, 5, seed=1)
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids), "prompt": prompt,
                    "generated": model.generate(prompt, 8, temperature=0.0, eos_token_id=EOS)},
                   tmp_path / "expected.pt")
    script = """
import json, sys
sys.path += sys.argv[1:]
try:
    import normlab
    importable = True
except ModuleNotFoundError:
    importable = False
import torch, transformers
expected = torch.load("expected.pt")
model = transformers.AutoModelForCausalLM.from_pretrained("out", trust_remote_code=True).eval()
with torch.no_grad():
    diff = (model(expected["ids"]).logits - expected["logits"]).abs().max().item()
out = model.generate(expected["prompt"], max_new_tokens=8, do_sample=False)
n = out.shape[1]
print(json.dumps({"normlab": importable, "diff": diff, "class": type(model).__module__,
                  "generated": torch.equal(out, expected["generated"][:, :n])}))
"""
    report = run_without_normlab(script, tmp_path)
    assert report["normlab"] is False
    assert report["class"].startswith("transformers_modules")
    assert report["diff"] <= 1e-5 and report["generated"]


def test_transformers_stays_optional(monkeypatch):
    check = "import sys, normlab, normlab.hf; print('transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr[-2000:]
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'normlab\[hf\]'"):
        from_hf("anything")


def _auto_tokenizer_agrees(path: Path, ours) -> None:
    theirs = transformers.AutoTokenizer.from_pretrained(path)
    assert theirs.eos_token_id == ours.eos_id
    for text in TEXTS:
        ids = ours.encode(text)
        assert theirs(text)["input_ids"] == ids, text
        assert theirs.decode(ids + [ours.eos_id], skip_special_tokens=True) == ours.decode(ids) == text


def test_byte_tokenizer_exports_for_auto_tokenizer(tmp_path):
    byte = ByteTokenizer()
    export(_model("pre_norm"), tmp_path / "out", byte)
    _auto_tokenizer_agrees(tmp_path / "out", byte)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    every_byte = list(range(256))
    assert theirs.decode(every_byte) == byte.decode(every_byte)  # invalid UTF-8 -> U+FFFD alike
    assert theirs.convert_ids_to_tokens(EOS) == "<|endoftext|>"


def test_trained_bpe_exports_for_auto_tokenizer(tmp_path):
    corpus = [" ".join(TEXTS)] * 5 + ["the quick brown fox jumps over the lazy dog"] * 20
    bpe = train_bpe(corpus, 300)
    assert bpe.encode("the quick") != list(b"the quick")  # merges are learnt
    export(_model("qk_norm", vocab_size=300), tmp_path / "out", bpe)
    _auto_tokenizer_agrees(tmp_path / "out", bpe)


def _hf_model(model_type: str, tie: bool, **overrides):
    """A randomly initialised stock model: GQA 4/2 heads, non-default rope_theta and eps."""
    values = dict(vocab_size=257, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  rope_theta=300.0, rms_norm_eps=1e-4, tie_word_embeddings=tie, bos_token_id=EOS,
                  eos_token_id=EOS, pad_token_id=None)
    if model_type == "qwen3":
        values["head_dim"] = 8  # Qwen3's default is 128
    config = transformers.AutoConfig.for_model(model_type, **{**values, **overrides})
    return _randomized(transformers.AutoModelForCausalLM.from_config(config), seed=2)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("model_type", ["llama", "qwen3", "olmo2"])
def test_import_of_stock_models_gives_equal_logits(model_type, tie):
    hf = _hf_model(model_type, tie)
    ours = from_hf(hf)
    cfg = ours.config
    assert cfg.strategy == {"llama": "pre_norm", "qwen3": "qk_norm", "olmo2": "output_norm"}[model_type]
    assert (cfg.rope_theta, cfg.norm_eps, cfg.n_kv_heads, cfg.tie_embeddings) == (300.0, 1e-4, 2, tie)
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tie
    _assert_same_logits(hf, ours, _ids())


def test_import_run_round_trips_through_load_run_and_export(tmp_path):
    bpe = train_bpe(["a small corpus for a small tokenizer, " * 8, " ".join(TEXTS)], 270)
    hf = _hf_model("qwen3", tie=False, vocab_size=bpe.vocab_size, bos_token_id=bpe.eos_id,
                   eos_token_id=bpe.eos_id)
    hf.save_pretrained(tmp_path / "hf")
    with pytest.raises(DataError, match="no tokenizer.json"):
        import_run(tmp_path / "hf", tmp_path / "run")
    bpe.hf_tokenizer().save(str(tmp_path / "hf" / "tokenizer.json"))
    run_dir = import_run(tmp_path / "hf", tmp_path / "run")

    saved = load_run(run_dir)
    assert saved.step == 0 and saved.config.model.strategy == "qk_norm"
    _assert_same_logits(hf, saved.model, _ids())
    status = RunDir(run_dir).read_status()
    assert status["status"] == "finished" and str(tmp_path / "hf") in status["reason"]
    assert saved.config.data.tokenizer == str(run_dir / "tokenizer")
    tokenizer = saved.tokenizer()
    assert tokenizer.eos_id == bpe.eos_id == load_tokenizer(run_dir / "tokenizer").eos_id
    assert all(tokenizer.encode(text) == bpe.encode(text) for text in TEXTS)
    assert saved.model.generate(_ids(1, 4), 4).shape == (1, 8)

    assert export_run(run_dir, tmp_path / "again", step=0) == "stock"
    again = _load_hf(tmp_path / "again")
    assert type(again).__name__ == "Qwen3ForCausalLM"
    _assert_same_logits(again, saved.model, _ids())
    with pytest.raises(CheckpointError, match="already exists"):
        import_run(tmp_path / "hf", run_dir)


@pytest.mark.parametrize(("model_type", "overrides", "feature"), [
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "RoPE scaling 'linear'"),
    ("llama", {"attention_bias": True}, "attention bias"),
    ("llama", {"mlp_bias": True}, "MLP bias"),
    ("llama", {"hidden_act": "gelu"}, "activation 'gelu'"),
    ("llama", {"head_dim": 16}, "head_dim 16"),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
     "sliding-window attention"),
    ("olmo2", {"attention_bias": True}, "attention bias"),
])
def test_import_refuses_what_normlab_cannot_represent(model_type, overrides, feature):
    config = transformers.AutoConfig.for_model(model_type, hidden_size=32, num_attention_heads=4,
                                               num_hidden_layers=2, **overrides)
    with pytest.raises(ConfigError, match=feature) as err:
        model_config_from_hf(config)
    assert "\n" not in str(err.value)


def test_import_refuses_other_model_types_and_missing_checkpoints(tmp_path):
    with pytest.raises(ConfigError, match="model type 'gpt2' cannot be imported"):
        model_config_from_hf(transformers.AutoConfig.for_model("gpt2"))
    with pytest.raises(CheckpointError, match="no readable Hugging Face model"):
        from_hf(tmp_path)
    with pytest.raises(CheckpointError, match="is not a directory"):
        import_run(tmp_path / "missing", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_export_replaces_only_a_previous_export(tmp_path):
    out = tmp_path / "out"
    export(_model("pre_norm"), out, ByteTokenizer())
    second = _model("dyt")
    assert export(second, out, ByteTokenizer()) == "custom"  # a previous export is replaced
    _assert_same_logits(_load_hf(out), second, _ids())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary siblings left
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a normlab export"):
        export(second, foreign, ByteTokenizer())
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    with pytest.raises(ConfigError, match="format: unknown value 'onnx'"):
        export(second, tmp_path / "other", ByteTokenizer(), format="onnx")



def _run(path: Path) -> Path:
    """A run directory at step 1 with a pre_norm model and the byte tokenizer."""
    from normlab.config import DataConfig, RunConfig
    from normlab.train.checkpoint import save_checkpoint

    model = _model("pre_norm")
    run = RunDir(path)
    run.create()
    run.write_config(RunConfig(model=model.config, data=DataConfig(tokenizer="byte")).to_dict())
    ByteTokenizer().save(run.tokenizer_path)
    save_checkpoint(run.checkpoints, 1, model, {"step": 1}, keep_last=1)
    return path


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("normlab: error: ") and err.count("\n") == 1, err
    return err


def test_export_keeps_a_directory_holding_anything_export_does_not_write(tmp_path, capsys):
    from normlab.cli import main

    run, out = _run(tmp_path / "run"), tmp_path / "out"
    assert main(["export-hf", str(run), str(out)]) == 0
    assert main(["export-hf", str(run), str(out)]) == 0  # an earlier export alone is replaced
    capsys.readouterr()
    (out / "README.md").write_text("my notes")
    (out / "extra").mkdir()
    (out / "extra" / "data.txt").write_text("mine")
    (tmp_path / "file").write_text("not a folder")
    before = tree(tmp_path)
    assert main(["export-hf", str(run), str(out)]) == 2
    err = _one_error_line(capsys)
    assert "README.md, extra" in err and "earlier export" in err
    for target, message in ((tmp_path / "file", "is a file"),
                            (tmp_path / "file" / "sub", "is not a directory")):
        assert main(["export-hf", str(run), str(target)]) == 2
        assert message in _one_error_line(capsys)
        with pytest.raises(ConfigError, match=message):
            export_run(run, target)
    with pytest.raises(ConfigError, match="README.md, extra"):
        export_run(run, out)
    assert tree(tmp_path) == before  # nothing deleted, nothing left behind
    (tmp_path / "empty").mkdir()
    assert main(["export-hf", str(run), str(tmp_path / "empty")]) == 0
    assert main(["export-hf", str(run), str(tmp_path / "new" / "nested")]) == 0


def _safetensors_truncated(src: Path) -> None:
    with (src / "model.safetensors").open("r+b") as fh:
        fh.truncate(100)


def _safetensors_random(src: Path) -> None:
    (src / "model.safetensors").write_bytes(torch.randint(0, 256, (4000,), dtype=torch.uint8,
                                                          generator=torch.Generator().manual_seed(0))
                                            .numpy().tobytes())


def _safetensors_half(src: Path) -> None:
    with (src / "model.safetensors").open("r+b") as fh:
        fh.truncate((src / "model.safetensors").stat().st_size // 2)


def _weight_missing(src: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(src / "model.safetensors")
    weights.pop("model.layers.0.mlp.up_proj.weight")
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})


def _weight_misshapen(src: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(src / "model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})


def _config_value(**values):
    def change(src: Path) -> None:
        config = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**config, **values}))
    return change


def _no_weights(src: Path) -> None:
    (src / "model.safetensors").unlink()


@pytest.mark.parametrize("damage, file, message", [
    (_safetensors_truncated, "model.safetensors", "invalid header length"),
    (_safetensors_random, "model.safetensors", "header too large"),
    (_safetensors_half, "model.safetensors", "not a valid safetensors file"),
    (_weight_missing, "model.safetensors", "missing model.layers.0.mlp.up_proj.weight"),
    (_weight_misshapen, "model.safetensors", "model.layers.0.mlp.up_proj.weight has shape (3, 3)"),
    (_no_weights, "", "no file named model.safetensors"),
    (_config_value(num_hidden_layers="two"), "config.json", "num_hidden_layers"),
    (_config_value(num_hidden_layers=0), "config.json", "n_layers"),
    (_config_value(num_attention_heads=3), "config.json", "not a multiple"),
])
def test_import_refuses_damaged_weights_and_config_in_one_line(tmp_path, capsys, damage, file,
                                                               message):
    from normlab.cli import main

    src = tmp_path / "hf"
    _hf_model("llama", tie=False).save_pretrained(src)
    ByteTokenizer().hf_tokenizer().save(str(src / "tokenizer.json"))
    damage(src)
    (tmp_path / "empty").mkdir()
    before = tree(tmp_path)
    capsys.readouterr()
    for run in (tmp_path / "run", tmp_path / "empty"):
        assert main(["import-hf", str(src), str(run)]) == 2
        err = _one_error_line(capsys)
        assert f"{src / file}" in err and message in err, err
    assert tree(tmp_path) == before  # no run, nothing half-written
