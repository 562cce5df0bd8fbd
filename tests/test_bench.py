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


def test_bench_reports_ratios(tmp_path, capsys):
    result = run_bench(d_model=32, n_layers=1, n_heads=2, seq_len=16, batch_size=2, vocab_size=64, rounds=1,
                       strategies=["pre_norm", "bhyt"], out=tmp_path / "bench.json")
    assert result["strategies"]["pre_norm"]["ratio_to_pre_norm"] == 1.0
    assert result["norms"]["rmsnorm"]["ratio_to_rmsnorm"] == 1.0
    moe = result["moe"]["active_params"]
    assert moe["moe"] - moe["dense"] == 8 * 32  # the router (8 experts x d 32, 1 layer) is the only extra
    assert set(result["norms"]) == {"rmsnorm", "layernorm", "dyt", "bhyt_star"}
    if pytest.importorskip("transformers"):
        assert result["vs_transformers"]["train_ratio"] > 0
        assert result["generation"]["new_tokens"] == 8 and result["generation"]["same_tokens"]
    assert json.loads((tmp_path / "bench.json").read_text())["setup"]["d_model"] == 32
    assert "train step relative to pre_norm" in capsys.readouterr().out
