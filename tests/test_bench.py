"""normlab bench: the timing loop, the arithmetic of its figures, the profiler classification,
the memory peak, and an end-to-end run on tiny sizes (timings themselves are not asserted)."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest
import torch

from normlab.bench import (
    COPY_PASSES,
    Sizes,
    Timings,
    TrainStep,
    bench_norms,
    copy_fraction,
    default_norm_paths,
    interleaved,
    op_class,
    profile_step,
    run_bench,
    running_peak,
    step_memory,
    step_shares,
)
from normlab.cli import main
from normlab.nn.model import build_model

TINY = Sizes(d_model=32, n_layers=1, n_heads=2, seq_len=16, batch=2, vocab=64)


def test_interleaved_times_every_candidate():
    calls = {"a": 0, "b": 0}

    def make(name):
        def fn():
            calls[name] += 1
        return fn

    times = interleaved({"a": make("a"), "b": make("b")}, rounds=3, number=2)
    assert set(times) == {"a", "b"} and all(t > 0 for t in times.values())
    assert calls == {"a": 1 + 3 * 2, "b": 1 + 3 * 2}  # one warm-up call, then rounds x number
    assert len(times.samples["a"]) == 3


def test_rounds_alternate_and_ratio_spread():
    order = []
    interleaved({name: (lambda name=name: order.append(name)) for name in "xyz"}, rounds=2, number=1)
    assert order == ["x", "y", "z", "x", "y", "z", "z", "y", "x"]  # warm-up, then a round and its reverse
    timings = Timings({"a": [2.0, 3.0, 4.0, 10.0, 6.0], "b": [1.0, 1.0, 1.0, 1.0, 1.0]})
    result = timings.ratio("a", "b")
    assert result["ratio"] == 4.0  # median(a) / median(b)
    assert result["iqr"] == pytest.approx([3.0, 6.0])  # inclusive quartiles of the per-round ratios 2, 3, 4, 6, 10
    two_rounds = Timings({"a": [1.0, 3.0], "b": [1.0, 1.0]}).ratio("a", "b")
    assert two_rounds["iqr"] == pytest.approx([1.5, 2.5])  # never outside the observed ratios
    # the machine slowed down 10x in round 2 for both: paired per round, the ratio is 1, not 3
    drifting = Timings({"a": [1.0, 10.0, 3.0], "b": [1.0, 10.0, 1.0]})
    assert drifting.ratio("a", "b") == {"ratio": 1.0, "iqr": [1.0, 2.0]}
    figure = drifting.figure("s", "a / b", "a", "b", {})
    assert figure.value == 1.0 and figure.seconds == {"a": 3.0, "b": 1.0}
    assert figure.rounds == {"a": [1.0, 10.0, 3.0], "b": [1.0, 10.0, 1.0]}


def test_copy_fraction_arithmetic():
    # per round the norm takes 2.5, 10 and 5 copies' time: fractions 2.5 x copy / norm = 1, 0.25, 0.5
    timings = Timings({"copy": [1.0, 2.0, 1.0], "norm": [2.5, 20.0, 5.0]})
    result = copy_fraction(timings, "norm")
    assert COPY_PASSES == 2.5
    assert result["fraction"] == pytest.approx(0.5)
    assert result["iqr"] == pytest.approx([0.375, 0.75])  # inclusive quartiles of 0.25, 0.5, 1
    at_copy_speed = copy_fraction(Timings({"copy": [2.0], "norm": [5.0]}), "norm")
    assert at_copy_speed == {"fraction": 1.0, "iqr": [1.0, 1.0]}  # 5 passes in 2.5 copies' time


def test_profiler_classes_count_self_time_once():
    events = [
        ("aten::linear", 1.0), ("aten::addmm", 40.0), ("aten::matmul", 1.0), ("aten::mm", 19.0),
        ("autograd::engine::evaluate_function: MmBackward0", 1.0), ("MmBackward0", 2.0),
        ("aten::scaled_dot_product_attention", 1.0), ("aten::_scaled_dot_product_flash_attention_for_cpu", 14.0),
        ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", 5.0),
        ("autograd::engine::evaluate_function: ScaledDotProductFlashAttentionForCpuBackward0", 1.0),
        ("aten::_fused_rms_norm", 3.0), ("aten::copy_", 1.0), ("aten::view", 0.5), ("aten::mul", 0.5),
    ]
    optimizer = [("Optimizer.step#AdamW.step", 1.0), ("aten::mul_", 6.0), ("aten::mm", 3.0)]
    assert op_class("aten::t") == "other" and op_class("TBackward0") == "other"
    assert op_class("aten::_efficient_attention_backward") == "attention"
    shares = step_shares([(name, t, False) for name, t in events] + [(name, t, True) for name, t in optimizer])
    assert shares == pytest.approx({"matmul": 0.64, "attention": 0.21, "other": 0.05, "optimizer": 0.10})
    with pytest.raises(ValueError):
        step_shares([])


def test_profiled_train_step_finds_matmul_and_attention():
    """The operator names of a real step under this torch: a renamed kernel fails here."""
    step = TrainStep(build_model(TINY.model_config()), TINY.ids(torch.device("cpu")))
    step()
    events, wall = profile_step(step)
    shares = step_shares(events)
    assert all(share > 0 for share in shares.values()), shares
    assert sum(t for _, t, _ in events) <= wall * 1.05


def test_memory_peak():
    assert running_peak([100, -50, 200, -250, 30]) == 250
    assert running_peak([-10, 5]) == 0
    model = build_model(TINY.model_config())
    step = TrainStep(model, TINY.ids(torch.device("cpu")))
    step()  # creates AdamW's state
    memory = step_memory(step, torch.device("cpu"))
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert memory["resident"] >= 3 * param_bytes  # weights, exp_avg, exp_avg_sq
    assert memory["step_peak"] >= param_bytes  # at least the gradients are held at once


@pytest.mark.skipif(not any(map(shutil.which, ("g++", "c++", "clang++"))), reason="inductor needs a C++ compiler")
def test_compiled_norm_path():
    figures = bench_norms(((64, 32),), rounds=1, device=torch.device("cpu"), paths=("reference", "compiled"),
                          kinds=["rmsnorm"], number=1)
    assert [f.name for f in figures] == ["elementwise ceiling (neg + add), 64x32", "rmsnorm, reference, 64x32",
                                         "rmsnorm, compiled, 64x32"]
    assert "first call" in figures[2].seconds and "first call" not in figures[1].seconds
    assert all(f.value > 0 and f.unit == "fraction of copy" for f in figures)


def test_cuda_kernel_paths_do_not_apply_on_the_cpu():
    """The explicit 'triton' and 'liger' paths are CUDA's: on the CPU the candidate list leaves
    them out, and the default paths are the CPU's three."""
    assert default_norm_paths(torch.device("cpu")) == ("reference", "fast", "compiled")
    assert default_norm_paths(torch.device("cuda")) == ("reference", "fast", "compiled", "triton", "liger")
    figures = bench_norms(((64, 32),), rounds=1, device=torch.device("cpu"), paths=("reference", "triton", "liger"),
                          kinds=["rmsnorm", "dyt"], number=1)
    assert [f.name for f in figures][1:] == ["rmsnorm, reference, 64x32", "dyt, reference, 64x32"]


def test_bench_writes_json_and_markdown(tmp_path, capsys):
    targets = {"tiny": Sizes(d_model=32, n_layers=2, n_heads=2, seq_len=16, batch=2, vocab=64, ffn_hidden=64)}
    sections = ["transformers", "generation", "moe", "strategies", "memory", "norms"]
    result = run_bench(TINY, rounds=1, strategies=["bhyt", "bhyt_star"], sections=sections,
                       out=tmp_path / "out", targets=targets, norm_shapes=((64, 32),), norm_paths=("fast",))
    saved = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert saved["figures"] == result["figures"] and saved["setup"]["sizes"]["d_model"] == 32
    assert saved["machine"]["matmul_gflops_fp32"] > 0 and saved["machine"]["threads"] >= 1
    figures = {f["name"]: f for f in saved["figures"]}
    assert figures["train step bhyt / bhyt"]["value"] == 1.0  # without pre_norm the first is the reference
    assert "train step bhyt / bhyt_star (one statistic per block vs two)" in figures
    assert {f["name"] for f in saved["figures"] if f["section"] == "memory"} == {
        f"peak memory of a train step, {n}" for n in ("bhyt", "bhyt_star")}
    memory = figures["peak memory of a train step, bhyt"]
    assert memory["value"] == pytest.approx(memory["parts"]["resident"] + memory["parts"]["step_peak"])
    norms = [f["name"] for f in saved["figures"] if f["section"] == "norms"]
    assert norms == ["elementwise ceiling (neg + add), 64x32", "rmsnorm, fast, 64x32", "layernorm, fast, 64x32",
                     "dyt, fast, 64x32",
                     "bhyt_star, fast, 64x32", "bhyt (attention site), fast, 64x32", "bhyt (FFN site), fast, 64x32"]
    assert all(f["iqr"][0] <= f["value"] <= f["iqr"][1] for f in saved["figures"] if f["iqr"])
    if pytest.importorskip("transformers"):
        shares = [f for f in saved["figures"] if f["unit"] == "share"]
        assert len(shares) == 2 and all(0 <= f["value"] <= 1 for f in shares)
        assert all(f["parts"]["matmul"] + f["parts"]["attention"] + f["value"] == pytest.approx(1) for f in shares)
        assert all(f["value"] == pytest.approx(f["parts"]["other"] + f["parts"]["optimizer"]) for f in shares)
        assert figures["train step normlab / LlamaForCausalLM, config tiny"]["config"]["ffn_hidden"] == 64
    table = (tmp_path / "out" / "bench.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| ") and not line.startswith("| section")]
    assert len(rows) == len(saved["figures"]) and all(line.count(" | ") == 5 for line in rows)
    printed = capsys.readouterr().out
    assert "\nstrategies\n" in printed and "wrote" in printed


def test_bench_rejects_bad_input(tmp_path, capsys):
    assert main(["bench", "--sections", "norms,speed"]) == 2
    assert "unknown section 'speed'" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main(["bench", "--sections", "norms", "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["bench", "--strategies", "pre_norm,nonsense"]) == 2


def test_cpu_profile_silences_stderr_inside_only(capfd):
    """kineto's C++ lines on fd 2 are dropped while profiling, Python warnings kept; stderr works
    again after, also when the profiled code raised."""
    from normlab.bench import cpu_profile

    with pytest.warns(UserWarning, match="kept"), cpu_profile() as prof:
        os.write(2, b"inside\n")
        warnings.warn("kept", stacklevel=1)  # a Python warning is shown after the block
        torch.ones(3).add(1)
    assert any(e.name == "aten::add" for e in prof.events())
    with pytest.raises(RuntimeError), cpu_profile():
        raise RuntimeError("step failed")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n"


def test_compiled_train_step_is_a_third_candidate(monkeypatch):
    """``--compile``: normlab's train step on torch.compile's module (a stand-in that counts its
    calls here: compiling is test_norm_paths' job), against eager and against transformers, the
    first call timed apart; the shares stay those of the eager sides."""
    pytest.importorskip("transformers")
    from normlab import bench

    calls = []

    class Compiled(torch.nn.Module):  # holds the model's parameters, as torch.compile's OptimizedModule does
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            calls.append(1)
            return self.module(*args, **kwargs)

    monkeypatch.setattr(bench.torch, "compile", Compiled)
    target = Sizes(d_model=32, n_layers=1, n_heads=2, seq_len=16, batch=2, vocab=64, ffn_hidden=64)
    figures = {f.name: f for f in bench.bench_transformers({"t": target}, rounds=2, device=torch.device("cpu"),
                                                           compiled=True)}
    assert len(calls) == 1 + 1 + 2  # the first call, interleaved's warm-up, two rounds
    for name in ("train step normlab compiled / eager, config t", "train step normlab compiled / LlamaForCausalLM, config t"):
        assert figures[name].value > 0 and "the first compiled step took" in figures[name].note
    assert set(figures["train step normlab compiled / eager, config t"].seconds) == {"normlab compiled", "normlab"}
    assert [n for n in figures if "outside matmul" in n] == [
        "normlab train step outside matmul and attention, config t",
        "transformers train step outside matmul and attention, config t"]


def test_a_compiled_step_that_fails_is_left_out(monkeypatch, capsys):
    """No C++ compiler for inductor: the compiled candidate is reported and left out, the
    section's other figures stay."""
    pytest.importorskip("transformers")
    from normlab import bench

    class Failing(torch.nn.Module):  # compiles on its first call, as torch.compile's module does
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(bench.torch, "compile", Failing)
    target = Sizes(d_model=32, n_layers=1, n_heads=2, seq_len=16, batch=2, vocab=64, ffn_hidden=64)
    names = [f.name for f in bench.bench_transformers({"t": target}, rounds=1, device=torch.device("cpu"), compiled=True)]
    assert names[:2] == ["train step normlab / LlamaForCausalLM, config t", "forward normlab / LlamaForCausalLM, config t"]
    assert not any("compiled" in name for name in names)
    assert "normlab compiled: left out, its first call failed: RuntimeError: InvalidCxxCompiler" in capsys.readouterr().out
