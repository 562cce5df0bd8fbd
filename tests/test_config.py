"""Config validation (one-line ConfigError naming the field), YAML round trip, CLI exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from normlab import ConfigError, ModelConfig, layer_plans
from normlab.config import apply_overrides

SIZES = dict(vocab_size=64, d_model=64, n_layers=4, n_heads=4)


@pytest.mark.parametrize("fields,match", [
    ({"n_layer": 4}, r"model\.n_layer: unknown key \(did you mean 'n_layers'\?\)"),
    ({"norm": "rmsnrom"}, r"norm: unknown value 'rmsnrom' \(did you mean 'rmsnorm'\?\)"),
    ({"placement": "prenorm"}, r"placement: unknown value 'prenorm' \(did you mean 'pre'"),
    ({"qk_norm": "qvk"}, r"qk_norm: unknown value 'qvk'"),
    ({"qk_norm_scope": "heads"}, r"qk_norm_scope: .*did you mean 'head'"),
    ({"init": "megatrn"}, r"init: .*did you mean 'megatron'"),
    ({"d_model": 66}, r"d_model: 66 is not divisible by n_heads=4"),
    ({"n_kv_heads": 3}, r"n_kv_heads: n_heads=4 is not divisible by n_kv_heads=3"),
    ({"mixln_alpha": 1.5}, r"mixln_alpha: 1.5 is outside \[0, 1\]"),
    ({"mixln_alpha": -0.1}, r"mixln_alpha: -0.1 is outside \[0, 1\]"),
    ({"n_layers": 0}, r"n_layers: expected a positive integer, got 0"),
    ({"d_model": -64}, r"d_model: expected a positive integer"),
    ({"vocab_size": 2.5}, r"vocab_size: expected a positive integer"),
    ({"ffn_hidden": 0}, r"ffn_hidden: expected a positive integer"),
    ({"max_seq_len": "long"}, r"max_seq_len: expected a positive integer"),
    ({"norm_eps": 0}, r"norm_eps: expected a positive number"),
    ({"tie_embeddings": "yes"}, r"tie_embeddings: expected true or false"),
    ({"norm": "bhyt", "placement": "post"}, r"norm: 'bhyt' shares its statistic .* layer 0 is 'post'"),
    ({"norm": "bhyt", "qk_norm": "qkv"}, r"qk_norm: 'bhyt' approximates"),
    ({"layer_overrides": {4: {"placement": "pre"}}}, r"layer_overrides: layer 4 is out of range"),
    ({"layer_overrides": {0: {"placment": "pre"}}}, r"layer_overrides\.0\.placment: unknown key \(did you mean 'placement'"),
    ({"layer_overrides": {0: {"placement": "mixln"}}}, r"layer_overrides\.0\.placement: unknown value 'mixln'"),
    ({"layer_overrides": {"x": {}}}, r"layer_overrides: layer index 'x' is not an integer"),
])
def test_validation_errors_name_the_field(fields, match):
    with pytest.raises(ConfigError, match=match) as info:
        ModelConfig.from_dict({**SIZES, **fields})
    assert "\n" not in str(info.value)


def test_unknown_strategy_and_override_key():
    with pytest.raises(ConfigError, match=r"strategy: unknown value 'hybridnrom' \(did you mean 'hybridnorm'\?\)"):
        ModelConfig.from_strategy("hybridnrom")
    with pytest.raises(ConfigError, match=r"model\.d_modle: unknown key \(did you mean 'd_model'\?\)"):
        ModelConfig.from_strategy("pre_norm", d_modle=32)


def test_any_field_can_be_overridden_on_a_strategy():
    cfg = ModelConfig.from_strategy("hybridnorm", **SIZES, norm="layernorm", init="normal", qk_norm="qk")
    assert (cfg.placement, cfg.norm, cfg.init, cfg.qk_norm) == ("hybrid", "layernorm", "normal", "qk")
    assert cfg.strategy == "hybridnorm"


def test_placement_defaults_for_qk_norm():
    assert ModelConfig(placement="hybrid").qk_norm == "qkv"
    out = ModelConfig(placement="output")
    assert (out.qk_norm, out.qk_norm_scope) == ("qk", "full")
    assert ModelConfig(placement="pre").qk_norm == "none"
    assert ModelConfig(placement="hybrid", qk_norm="qk").qk_norm == "qk"  # QK-Post ablation


@pytest.mark.parametrize("strategy", ["pre_norm", "hybridnorm_star", "bhyt", "dyt", "mixln"])
def test_yaml_round_trip(tmp_path, strategy):
    cfg = ModelConfig.from_strategy(strategy, **SIZES, layer_overrides={-1: {"qk_norm": "qk"}})
    cfg.to_yaml(tmp_path / "m.yaml")
    back = ModelConfig.from_yaml(tmp_path / "m.yaml")
    assert back == cfg
    assert layer_plans(back)[-1].qk_norm == "qk"
    assert back.layer_overrides == {3: {"qk_norm": "qk"}}


def test_yaml_strategy_key_applies_preset(tmp_path):
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"strategy": "hybridnorm_star", "n_layers": 6}))
    cfg = ModelConfig.from_yaml(tmp_path / "m.yaml")
    assert (cfg.placement, cfg.qk_norm, cfg.init, cfg.n_layers) == ("hybrid_star", "qkv", "megatron", 6)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        ModelConfig.from_yaml(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        ModelConfig.from_yaml(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        ModelConfig.from_yaml(tmp_path / "list.yaml")


def test_dotted_overrides():
    data = apply_overrides({"model": {"n_layers": 2}}, ["model.n_layers=8", "model.norm=dyt",
                           "train.lr=3e-4", "model.layer_overrides.0.placement=pre"], ("model", "train"))
    assert data == {"model": {"n_layers": 8, "norm": "dyt", "layer_overrides": {"0": {"placement": "pre"}}},
                    "train": {"lr": 3e-4}}
    with pytest.raises(ConfigError, match=r"unknown section 'modl' \(did you mean 'model'\?\)"):
        apply_overrides({}, ["modl.n_layers=3"], ("model", "train"))
    with pytest.raises(ConfigError, match="expected SECTION.KEY=VALUE"):
        apply_overrides({}, ["n_layers"], ("model",))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "normlab.cli", *args], capture_output=True, text=True)


def test_cli_user_error_is_one_line_and_exit_2():
    result = run_cli("model", "--strategy", "hybridnrom")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "normlab: error: strategy: unknown value 'hybridnrom' (did you mean 'hybridnorm'?); choose one of "
        + ", ".join(["pre_norm", "post_norm", "qk_norm", "peri_norm", "output_norm", "deepnorm", "mixln",
                     "lns", "hybridnorm", "hybridnorm_star", "dyt", "bhyt", "bhyt_star"]))
    result = run_cli("model", "model.n_heads=3")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "d_model: 128 is not divisible by n_heads=3" in result.stderr


def test_more_user_errors_are_one_line_exit_2(tmp_path, capsys):
    """Argument errors without the usage block, files that are not UTF-8, flags a verb sets that an
    override would contradict, a preset mixed with a config, an unknown bench device."""
    from normlab.cli import main

    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00 model")
    for args, message in [
        (["model", "--strategy"], "normlab model: error: argument --strategy: expected one argument "
                                  "(see normlab model --help)"),
        (["nonsense"], "normlab: error: argument VERB: invalid choice: 'nonsense'"),
        (["model", "--config", str(binary)], f"config file '{binary}': not UTF-8 text (byte 0)"),
        (["model", "--config", "configs/tiny.yaml", "--preset", "hybridnorm-550m"], "give --config or --preset, not both"),
        (["stability", "--strategies", "pre_norm", "--depths", "2", "--out", str(tmp_path / "s"), "model.n_layers=3"],
         "model.n_layers=3: --depths sets model.n_layers for every run; drop the override"),
        (["stability", "--strategies", "pre_norm", "--lrs", "1e-3", "--out", str(tmp_path / "s"), "train.lr=5"],
         "train.lr=5: --lrs sets train.lr"),
        (["bench", "--device", "tpu", "--sections", "norms"], "--device: 'tpu' is not auto, cpu, cuda, cuda:N or mps"),
        (["data", "prepare", "--out", str(binary)], f"--out: '{binary}' is a file; expected a directory"),
    ]:
        try:
            code = main(args)
        except SystemExit as exit_:  # argparse's own errors
            code = exit_.code
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and message in err, (args, err)
    assert not (tmp_path / "s").exists()


def test_cli_model_prints_plan():
    result = run_cli("model", "--strategy", "mixln", "model.n_layers=8", "model.d_model=32")
    assert result.returncode == 0, result.stderr
    assert "#   layers 0-1: post\n#   layers 2-7: pre" in result.stdout
    assert ModelConfig.from_dict(yaml.safe_load(result.stdout)).n_layers == 8


def test_yaml_reads_scientific_notation_and_empty_sections(tmp_path):
    from normlab.config import RunConfig

    (tmp_path / "run.yaml").write_text("model:\ndata:\ntrain:\n  lr: 3e-4\n  min_lr_ratio: 1E-1\n")
    raw = RunConfig.load(tmp_path / "run.yaml", ["model.n_layers=3"])
    cfg = RunConfig.from_dict(raw, vocab_size=50)
    assert cfg.train.lr == 3e-4 and cfg.train.min_lr_ratio == 0.1 and cfg.model.n_layers == 3
    (tmp_path / "bad.yaml").write_text("model: [1, 2]\n")
    with pytest.raises(ConfigError, match="override 'model.n_layers=3': model is not a mapping"):
        RunConfig.load(tmp_path / "bad.yaml", ["model.n_layers=3"])
    with pytest.raises(ConfigError, match="model: expected a mapping"):
        RunConfig.from_dict(RunConfig.load(tmp_path / "bad.yaml"))


def test_layer_overrides_from_yaml_and_command_line_merge():
    cfg = ModelConfig.from_dict({**SIZES, "placement": "hybrid",
                                 "layer_overrides": {0: {"placement": "pre"}, "0": {"qk_norm": "qk"}}})
    assert cfg.layer_overrides == {0: {"placement": "pre", "qk_norm": "qk"}}
    assert layer_plans(cfg)[0].placement == "pre" and layer_plans(cfg)[0].qk_norm == "qk"
    with pytest.raises(ConfigError, match="layer 0 is given placement='pre' and placement='post'"):
        ModelConfig(**SIZES, layer_overrides={0: {"placement": "pre"}, -4: {"placement": "post"}})
    for key in (1.7, True):
        with pytest.raises(ConfigError, match="is not an integer"):
            ModelConfig(**SIZES, layer_overrides={key: {"placement": "pre"}})


def test_placement_override_drops_the_schedules_scalars():
    cfg = ModelConfig.from_strategy("deepnorm", **SIZES, layer_overrides={0: {"placement": "pre"}})
    plans = layer_plans(cfg)
    assert plans[0].residual_scale == 1.0 and plans[1].residual_scale == pytest.approx(8 ** 0.25)
    explicit = ModelConfig.from_strategy("lns", **SIZES, layer_overrides={3: {"placement": "post", "branch_scale": 0.5}})
    assert layer_plans(explicit)[3].branch_scale == 0.5


def test_bhyt_with_scaled_layers_names_the_scale():
    with pytest.raises(ConfigError, match="layer 1 has residual scale 1 and branch scale 0.7071"):
        ModelConfig.from_strategy("bhyt", **SIZES, placement="lns")


def test_post_norm_strategies_have_no_separate_final_norm():
    from normlab import build_model

    for name in ("post_norm", "deepnorm"):
        cfg = ModelConfig.from_strategy(name, **SIZES)
        assert cfg.final_norm == "none"
        assert "model.norm.weight" not in build_model(cfg).state_dict()
    assert ModelConfig.from_strategy("mixln", **SIZES).final_norm == "rmsnorm"  # last layers are Pre-Norm


def test_cli_lists_must_hold_the_right_type(capsys):
    from normlab.cli import main

    assert main(["compare", "--out", "/tmp/never", "--seeds", "1.5"]) == 2
    assert "--seeds: '1.5' is not a comma-separated list of ints" in capsys.readouterr().err
    assert main(["stability", "--out", "/tmp/never", "--depths", "2.5"]) == 2
    assert "--depths" in capsys.readouterr().err


def test_shipped_config_and_demo_strategies_are_valid():
    import re
    from pathlib import Path

    from normlab.compare import parse_variants
    from normlab.config import RunConfig

    root = Path(__file__).resolve().parents[1]
    cfg = RunConfig.from_dict(RunConfig.load(root / "configs" / "tiny.yaml"), vocab_size=257)
    assert cfg.train.seq_len <= cfg.model.max_seq_len and cfg.model.strategy == "pre_norm"
    makefile = (root / "Makefile").read_text()
    strategies = re.search(r"^DEMO_STRATEGIES \?= (\S+)$", makefile, re.M).group(1)
    assert len(parse_variants(strategies)) == 7


def test_output_dir_rule(tmp_path):
    """New, empty (hidden files aside) or marked by the verb's own file; nothing else."""
    from normlab.errors import check_output_dir

    assert check_output_dir(tmp_path / "new", "--out", ("plan.json",)) == tmp_path / "new"
    (tmp_path / "mac").mkdir()
    (tmp_path / "mac" / ".DS_Store").write_text("")
    assert check_output_dir(tmp_path / "mac", "--out", ("plan.json",)) == tmp_path / "mac"
    (tmp_path / "project" / "runs").mkdir(parents=True)  # another verb's output or a user's project
    with pytest.raises(ConfigError, match=r"--out: '.*project' holds other files \(it has no plan.json\)"):
        check_output_dir(tmp_path / "project", "--out", ("plan.json",))
    (tmp_path / "project" / "plan.json").write_text("{}")
    assert check_output_dir(tmp_path / "project", "--out", ("plan.json",)) == tmp_path / "project"
    assert check_output_dir(tmp_path / "project", "--cache") == tmp_path / "project"  # no marks: any folder
