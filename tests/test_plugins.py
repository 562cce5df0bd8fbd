"""Bring your own norm: registries, plugin loading (--plugin, YAML, entry points, run records),
Derf from examples/plugins/derf.py through compare, diagnose and export, docs/extending.md."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch

import normlab
from normlab import ConfigError, LayerPlan, ModelConfig, build_model, layer_plans
from normlab import plugins as plugin_loader
from normlab.nn.registry import NORMS, make_norm
from normlab.strategies import PLACEMENTS, STRATEGIES, plan_for
from normlab.train.saved import load_run
from normlab.train.trainer import run_config, train

ROOT = Path(__file__).resolve().parents[1]
DERF = ROOT / "examples" / "plugins" / "derf.py"
SIZES = dict(vocab_size=64, d_model=32, n_layers=4, n_heads=4, max_seq_len=32)
TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=32",
        "train.batch_size=4", "train.seq_len=32", "train.warmup_steps=2", "train.max_steps=6",
        "train.eval_every=6", "train.eval_batches=1", "train.log_every=2", "train.save_every=6"]


@pytest.fixture(autouse=True)
def registries():
    """Every test starts from the built-ins and leaves them so (plugins register globally)."""
    saved = [dict(table) for table in (NORMS, PLACEMENTS, STRATEGIES, plugin_loader.LOADED)]
    yield
    for table, content in zip((NORMS, PLACEMENTS, STRATEGIES, plugin_loader.LOADED), saved, strict=True):
        table.clear()
        table.update(content)


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "normlab.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def randomized_derf(dim: int = 6):
    normlab.load_plugins([str(DERF)])
    norm = make_norm("derf", dim, ModelConfig(**SIZES), "attn").double()
    with torch.no_grad():
        norm.alpha.fill_(0.8)
        norm.shift.fill_(-0.3)
        norm.weight.copy_(torch.linspace(0.5, 1.5, dim, dtype=torch.float64))
        norm.bias.copy_(torch.linspace(-0.2, 0.3, dim, dtype=torch.float64))
    return norm


def test_derf_output_is_the_formula_and_gradients_reach_alpha_s_gamma_beta():
    norm = randomized_derf()
    x = torch.tensor([[0.3, -1.2, 2.5, 0.0, -0.7, 4.0]], dtype=torch.float64)
    out = norm(x)
    for i, value in enumerate(x[0].tolist()):
        expected = (0.5 + i * 0.2) * math.erf(0.8 * value - 0.3) + (-0.2 + i * 0.1)
        assert out[0, i].item() == pytest.approx(expected, abs=1e-12)
    out.sum().backward()
    # d erf(u)/du = 2/sqrt(pi) exp(-u^2), u = alpha x + s
    slope = [2 / math.sqrt(math.pi) * math.exp(-((0.8 * v - 0.3) ** 2)) for v in x[0].tolist()]
    gains = [0.5 + i * 0.2 for i in range(6)]
    assert norm.alpha.grad.item() == pytest.approx(sum(g * d * v for g, d, v in zip(gains, slope, x[0].tolist(), strict=True)))
    assert norm.shift.grad.item() == pytest.approx(sum(g * d for g, d in zip(gains, slope, strict=True)))
    assert norm.weight.grad.tolist() == pytest.approx([math.erf(0.8 * v - 0.3) for v in x[0].tolist()])
    assert norm.bias.grad.tolist() == pytest.approx([1.0] * 6)


def test_derf_strategy_builds_from_the_plugin_and_trains_a_step():
    normlab.load_plugins([str(DERF)])
    cfg = ModelConfig.from_strategy("derf", **SIZES, qk_norm="qk")
    assert (cfg.norm, cfg.final_norm, cfg.qk_norm_type, cfg.placement) == ("derf", "derf", "derf", "pre")
    model = build_model(cfg, seed=0)
    derfs = [m for m in model.modules() if type(m).__name__ == "Derf"]
    assert len(derfs) == 4 * 4 + 1  # two block sites + Q and K norms per layer, and the final norm
    assert all(m.alpha.item() == 0.5 and m.shift.item() == 0.0 for m in derfs)  # reset_parameters ran
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = model(ids, labels=ids).loss
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    torch.optim.AdamW(model.parameters(), lr=1e-2).step()
    assert model(ids, labels=ids).loss < loss


def even_pre_odd_post(cfg, layer):
    """Pre-Norm in even layers, Post-Norm in odd ones."""
    return plan_for("pre" if layer % 2 == 0 else "post", cfg, layer)


def test_plugin_placement_builds_the_expected_layer_plans():
    normlab.register_placement("even_pre_odd_post", even_pre_odd_post)
    normlab.register_placement("attn_only_pre", LayerPlan("attn_only_pre", input_norm=True))
    cfg = ModelConfig(**SIZES, placement="even_pre_odd_post", qk_norm="qk",
                      layer_overrides={3: {"placement": "attn_only_pre"}})
    pre = LayerPlan("pre", input_norm=True, ffn_input_norm=True, qk_norm="qk")
    post = LayerPlan("post", attn_residual_norm=True, ffn_residual_norm=True, qk_norm="qk")
    assert layer_plans(cfg) == [pre, post, pre, LayerPlan("attn_only_pre", input_norm=True, qk_norm="qk")]
    model = build_model(cfg)
    assert model.model.layers[1].input_layernorm is None and model.model.layers[1].attn_residual_norm is not None
    assert model.model.layers[3].post_attention_layernorm is None
    # a schedule is not a per-layer placement; unknown names get a did-you-mean
    with pytest.raises(ConfigError, match=r"layer_overrides\.0\.placement: unknown value 'even_pre_odd_post'"):
        ModelConfig(**SIZES, layer_overrides={0: {"placement": "even_pre_odd_post"}})
    with pytest.raises(ConfigError, match=r"placement: unknown value 'even_pre_odd' \(did you mean 'even_pre_odd_post'"):
        ModelConfig(**SIZES, placement="even_pre_odd")
    with pytest.raises(ConfigError, match="already registered"):
        normlab.register_placement("pre", even_pre_odd_post)


def test_registration_errors_are_one_line_config_errors():
    class NoDoc(torch.nn.Module):
        def reset_parameters(self):
            pass

    class NoReset(torch.nn.Module):
        """N(x) = x"""

    class Identity(NoDoc):
        """N(x) = x"""

    for cls, match in ((NoDoc, "needs a docstring"), (NoReset, "needs a reset_parameters")):
        with pytest.raises(ConfigError, match=match):
            normlab.register_norm("bad")(cls)
    with pytest.raises(ConfigError, match="'rmsnorm' is already registered by normlab.nn.norms.RMSNorm"):
        normlab.register_norm("rmsnorm")(Identity)
    with pytest.raises(ConfigError, match="strategy: unknown value 'derf'"):
        ModelConfig.from_strategy("derf")  # not loaded: the registries hold only the built-ins


def test_missing_or_broken_plugin_exits_2_with_one_line(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    (tmp_path / "run.yaml").write_text("plugins: [not_a_module_anywhere]\n")
    for args, message in (
        (["train", "--plugin", "missing.py", "--out", str(tmp_path / "a")], "missing.py': no such file"),
        (["diagnose", "--plugin", str(broken), "x", "--out", str(tmp_path / "b")],
         "failed to load: RuntimeError: boom"),
        (["train", "--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "c")],
         "plugin 'not_a_module_anywhere': no such file or importable module"),
    ):
        result = cli(*args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_yaml_plugins_are_relative_to_the_yaml_and_resume_refuses_a_changed_file(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMLAB_CACHE", str(tmp_path / "cache"))
    shutil.copy(DERF, tmp_path / "derf.py")
    (tmp_path / "run.yaml").write_text("plugins: [derf.py]\nmodel: {strategy: derf}\n")
    monkeypatch.chdir(ROOT)  # not the YAML's folder
    raw = normlab.config.RunConfig.load(tmp_path / "run.yaml", TINY)
    assert raw["plugins"] == [str(tmp_path / "derf.py")]
    run = tmp_path / "run"
    assert train(run_config(raw, run), run, progress=False).status == "finished"
    recorded = json.loads((run / "plugins.json").read_text())
    digest = hashlib.sha256((tmp_path / "derf.py").read_bytes()).hexdigest()
    assert recorded == [{"plugin": str(tmp_path / "derf.py"), "file": str(tmp_path / "derf.py"), "sha256": digest}]
    raw_without_plugin = {k: v for k, v in raw.items() if k != "plugins"}
    assert train(run_config(raw_without_plugin, run), run, resume=True, progress=False).status == "finished"
    with open(tmp_path / "derf.py", "a") as fh:
        fh.write("# edited\n")
    with pytest.raises(ConfigError, match=r"plugin '.*derf.py' changed since run '.*run' was trained"):
        run_config(raw_without_plugin, run)
    with pytest.raises(ConfigError, match="changed since"):
        load_run(run)
    (tmp_path / "derf.py").unlink()
    result = cli("generate", str(run), "--max-new-tokens", "2")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "which is missing" in result.stderr


def test_entry_point_plugins_load_by_themselves(monkeypatch):
    monkeypatch.syspath_prepend(str(DERF.parent))
    monkeypatch.setattr(plugin_loader, "_entry_points_loaded", False)
    point = EntryPoint(name="derf", value="derf", group=plugin_loader.ENTRY_POINT_GROUP)
    monkeypatch.setattr(plugin_loader, "entry_points", lambda group: [point] if group == point.group else [])
    monkeypatch.delitem(sys.modules, "derf", raising=False)
    normlab.load_plugins()
    assert "derf" in NORMS and "derf" in STRATEGIES


@pytest.fixture(scope="module")
def derf_compare(tmp_path_factory):
    root = tmp_path_factory.mktemp("derf")
    os.environ["NORMLAB_CACHE"] = str(root / "cache")
    result = cli("compare", "--plugin", "examples/plugins/derf.py", "--strategies", "dyt,derf",
                 "--baseline", "dyt", "--jobs", "2", "--out", str(root / "cmp"), "-q", *TINY)
    return root, result


def test_compare_with_a_plugin_strategy_in_worker_processes(derf_compare):
    root, result = derf_compare
    assert result.returncode == 0, result.stderr[-2000:]
    assert "runs: 2 finished" in result.stderr
    report = (root / "cmp" / "report.md").read_text()
    assert re.search(r"^\| derf \|", report, re.M), report
    recorded = json.loads((root / "cmp" / "runs" / "derf-s0" / "plugins.json").read_text())
    assert [(r["file"], r["sha256"]) for r in recorded] == [
        (str(DERF), hashlib.sha256(DERF.read_bytes()).hexdigest())]


def test_diagnose_reads_the_plugin_norm_from_the_run_record(derf_compare):
    root, _ = derf_compare
    result = cli("diagnose", str(root / "cmp" / "runs" / "derf-s0"), "--out", str(root / "diag"),
                 "--batches", "1", "-q")
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.loads((root / "diag" / "diagnostics.json").read_text())
    assert saved["norm"] == "derf"
    assert all(entry["saturation"] is not None for entry in saved["norm_saturation"])  # Derf.argument


def test_export_of_a_plugin_norm_loads_where_neither_normlab_nor_the_plugin_is_importable(derf_compare):
    from test_hf import run_without_normlab

    root, _ = derf_compare
    run, out = root / "cmp" / "runs" / "derf-s0", root / "hf"
    result = cli("export-hf", str(run), str(out))
    assert result.returncode == 0 and "custom" in result.stdout, result.stderr[-2000:]
    assert (out / "plugin_derf.py").is_file() and "from .plugin_derf import Derf" in (out / "modeling_normlab.py").read_text()
    model = load_run(run).model
    with torch.no_grad():
        for m in model.modules():  # far from init, so that a slot that lost its Derf would show
            if type(m).__name__ == "Derf":
                m.shift.fill_(0.2)
                m.bias.fill_(-0.1)
    normlab.hf.export(model, out, load_run(run).tokenizer())
    ids = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids)}, root / "expected.pt")
    script = """
import json, sys
sys.path += sys.argv[1:]
import importlib.util, torch, transformers
expected = torch.load("expected.pt")
model = transformers.AutoModelForCausalLM.from_pretrained("hf", trust_remote_code=True).eval()
with torch.no_grad():
    diff = (model(expected["ids"]).logits - expected["logits"]).abs().max().item()
print(json.dumps({"normlab": importlib.util.find_spec("normlab") is not None,
                  "derf": importlib.util.find_spec("derf") is not None, "diff": diff,
                  "norm": type(model.model.norm).__module__}))
"""
    report = run_without_normlab(script, root)
    assert report["normlab"] is False and report["derf"] is False
    assert report["norm"].endswith("plugin_derf") and report["diff"] <= 1e-5


def test_extending_walkthrough_runs(tmp_path, monkeypatch):
    text = (ROOT / "docs" / "extending.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    user_code = [b for b in blocks if "register_" in b]
    assert user_code and sum(len(b.strip().splitlines()) for b in user_code) < 40
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/extending.md", "exec"), namespace)  # noqa: S102
