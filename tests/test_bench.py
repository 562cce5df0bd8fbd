"""normlab bench runs end to end on tiny sizes (timings themselves are not asserted)."""

from __future__ import annotations

import json

import pytest

from normlab.bench import interleaved, run_bench


def test_interleaved_times_every_candidate():
    calls = {"a": 0, "b": 0}

    def make(name):
        def fn():
            calls[name] += 1
        return fn

    times = interleaved({"a": make("a"), "b": make("b")}, rounds=3, number=2)
    assert set(times) == {"a", "b"} and all(t > 0 for t in times.values())
    assert calls["a"] == calls["b"] >= 3 * 2  # both treated alike, at least rounds x number calls
    assert len(times.samples["a"]) == 3


def test_rounds_alternate_and_ratio_spread():
    from normlab.bench import Timings

    order = []
    interleaved({name: (lambda name=name: order.append(name)) for name in "xyz"}, rounds=2, number=1)
    runs = [order[i] for i in range(len(order)) if i == 0 or order[i] != order[i - 1]]
    assert runs == ["x", "y", "z", "y", "x"]  # x, y, z then z, y, x: the second round is reversed
    timings = Timings({"a": [2.0, 3.0, 4.0, 10.0, 6.0], "b": [1.0, 1.0, 1.0, 1.0, 1.0]})
    result = timings.ratio("a", "b")
    assert result["ratio"] == 4.0  # median(a) / median(b)
    assert result["iqr"] == pytest.approx([2.5, 8.0])  # quartiles of the per-round ratios 2, 3, 4, 6, 10


def test_bench_reports_ratios(tmp_path, capsys):
    result = run_bench(d_model=32, n_layers=1, n_heads=2, seq_len=16, batch_size=2, vocab_size=64, rounds=1,
                       strategies=["pre_norm", "bhyt"], out=tmp_path / "bench.json")
    assert result["strategies"]["pre_norm"]["ratio_to_pre_norm"] == {"ratio": 1.0, "iqr": [1.0, 1.0]}
    assert result["norms"]["rmsnorm"]["ratio_to_rmsnorm"]["ratio"] == 1.0
    moe = result["moe"]["active_params"]
    assert moe["moe"] - moe["dense"] == 8 * 32  # the router (8 experts x d 32, 1 layer) is the only extra
    assert set(result["norms"]) == {"rmsnorm", "layernorm", "dyt", "bhyt_star"}
    if pytest.importorskip("transformers"):
        assert result["vs_transformers"]["train_ratio"]["ratio"] > 0
        assert result["generation"]["new_tokens"] == 8 and result["generation"]["same_tokens"]
    assert json.loads((tmp_path / "bench.json").read_text())["setup"]["d_model"] == 32
    assert "train step relative to pre_norm" in capsys.readouterr().out
