"""The MoE FFN against a naive per-token loop, its auxiliary losses by hand, and transformers'
OLMoE block with the same weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from normlab.nn.moe import MoE

D, E, K, HIDDEN = 16, 4, 2, 24


def _moe(renormalize=False, seed=0):
    moe = MoE(D, E, K, HIDDEN, renormalize=renormalize).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    return moe


def _naive(moe, x, renormalize):
    """sum over each token's top-k experts of w_e * W_down,e(silu(W_gate,e x) * W_up,e x), one token at a time."""
    hidden = moe.experts.down_proj.shape[-1]
    rows = []
    for token in x.reshape(-1, x.shape[-1]):
        probs = torch.softmax(moe.gate.weight @ token, -1)
        top = torch.topk(probs, K).indices
        weights = probs[top] / (probs[top].sum() if renormalize else 1.0)
        out = torch.zeros_like(token)
        for w, e in zip(weights, top, strict=True):
            gate_w, up_w = moe.experts.gate_up_proj[e, :hidden], moe.experts.gate_up_proj[e, hidden:]
            out = out + w * (moe.experts.down_proj[e] @ (F.silu(gate_w @ token) * (up_w @ token)))
        rows.append(out)
    return torch.stack(rows).reshape(x.shape)


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("grouped", [True, False])
def test_moe_equals_naive_loop_in_values_and_gradients(renormalize, grouped, monkeypatch):
    if grouped and not hasattr(F, "grouped_mm"):
        pytest.skip("torch without F.grouped_mm")
    moe = _moe(renormalize)
    moe.float()  # grouped_mm on CPU runs in fp32; the naive reference in fp64
    reference = _moe(renormalize).double()
    reference.load_state_dict({k: v.double() for k, v in moe.state_dict().items()})
    forward = moe.experts.forward
    monkeypatch.setattr(moe.experts, "forward", lambda x, counts: forward(x, counts, grouped=grouped))
    x = torch.randn(3, 5, D, generator=torch.Generator().manual_seed(1))
    x64 = x.double().requires_grad_()
    x = x.requires_grad_()
    out = moe(x)
    expected = _naive(reference, x64, renormalize)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    out.backward(grad)
    expected.backward(grad.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(moe.named_parameters(), reference.parameters(), strict=True):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad.double(), q.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_experts_with_no_tokens_and_all_tokens_on_one_expert():
    moe = _moe().float()
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[2, 0] = 50.0  # every token with x_0 > 0 prefers expert 2 strongly
    x = torch.rand(6, D) + 0.1
    out = moe(x)
    assert moe.expert_load[2] == pytest.approx(0.5)  # expert 2 gets every token's first slot
    torch.testing.assert_close(out.double(), _naive(moe.double(), x.double(), False), atol=1e-6, rtol=1e-6)


def test_auxiliary_losses_by_hand():
    moe = MoE(2, 2, 1, 4)
    with torch.no_grad():
        moe.gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # logits = x
    moe(x)
    p = torch.softmax(x, -1)  # top-1 experts: 0, 1, 0
    f = torch.tensor([2 / 3, 1 / 3])
    assert moe.load_balance_loss.item() == pytest.approx(2 * (f * p.mean(0)).sum().item())
    lse = [math.log(math.exp(2) + 1), math.log(1 + math.e), math.log(math.e + 1)]
    assert moe.z_loss.item() == pytest.approx(sum(v * v for v in lse) / 3, rel=1e-6)
    assert moe.expert_load.tolist() == pytest.approx(f.tolist())
    # perfectly balanced routing gives a load-balance loss of exactly 1
    with torch.no_grad():
        moe.gate.weight.zero_()
    moe(torch.randn(8, 2))
    assert moe.load_balance_loss.item() == pytest.approx(1.0)


def test_same_function_as_transformers_olmoe_block():
    transformers = pytest.importorskip("transformers")
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    for renormalize in (False, True):
        config = transformers.OlmoeConfig(hidden_size=D, intermediate_size=HIDDEN, num_experts=E,
                                          num_experts_per_tok=K, norm_topk_prob=renormalize)
        theirs = OlmoeSparseMoeBlock(config).float()
        ours = _moe(renormalize).float()
        missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=True)
        assert not missing and not unexpected
        x = torch.randn(2, 7, D, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


MOE_SIZES = dict(vocab_size=61, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=48,
                 moe_experts=4, moe_top_k=2, moe_ffn_hidden=24)


@pytest.mark.parametrize("fields,message", [
    ({"moe_top_k": 5}, "moe_top_k: 5 is above moe_experts=4"),
    ({"moe_layers": [0, 3]}, "moe_layers: expected a list of layer indices below n_layers=3"),
    ({"moe_experts": 0, "moe_layers": [1]}, "moe_layers: set moe_experts > 0"),
    ({"moe_aux_loss_weight": -1.0}, "moe_aux_loss_weight: expected a number >= 0"),
    ({"moe_experts": -2}, "moe_experts: expected an integer >= 0"),
])
def test_moe_config_errors(fields, message):
    from normlab import ConfigError, ModelConfig

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig.from_strategy("pre_norm", **{**MOE_SIZES, **fields})


def test_moe_layers_and_losses_in_the_model():
    from normlab import ModelConfig, build_model
    from normlab.nn.mlp import SwiGLU

    model = build_model(ModelConfig.from_strategy("hybridnorm", **MOE_SIZES, moe_layers=[-1, 1]))
    assert [type(b.mlp) for b in model.model.layers] == [SwiGLU, MoE, MoE]
    assert model.config.moe_layers == [1, 2]
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids)
    losses = model.moe_losses()
    layers = [b.mlp for b in model.model.layers[1:]]
    assert losses["load_balance"].item() == pytest.approx(sum(m.load_balance_loss.item() for m in layers) / 2)
    assert losses["z_loss"].item() == pytest.approx(sum(m.z_loss.item() for m in layers) / 2)
    dense = build_model(ModelConfig.from_strategy("hybridnorm", **{**MOE_SIZES, "moe_experts": 0}))
    assert dense.moe_losses() is None
    assert dense.num_active_params() == dense.num_params()
    per_expert = 3 * 32 * 24  # gate, up and down of one expert
    assert model.num_active_params() == model.num_params() - 2 * (4 - 2) * per_expert


@pytest.mark.parametrize("strategy", ["pre_norm", "hybridnorm_star", "post_norm", "bhyt", "dyt"])
def test_moe_cached_decoding_equals_full_forward(strategy):
    from normlab import ModelConfig, build_model

    model = build_model(ModelConfig.from_strategy(strategy, **MOE_SIZES), seed=2).eval()
    ids = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 16)
        steps = [model(ids[:, :9], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(9, 16)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    out = model.generate(ids[:, :5], 8)
    greedy = ids[:, :5]
    with torch.no_grad():
        for _ in range(8):
            greedy = torch.cat([greedy, model(greedy)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, greedy)


def test_training_adds_and_logs_the_auxiliary_losses(tmp_path, monkeypatch):
    import json

    from normlab.config import RunConfig
    from normlab.train.rundir import RunDir
    from normlab.train.saved import load_run
    from normlab.train.trainer import run_config, train

    monkeypatch.setenv("NORMLAB_CACHE", str(tmp_path / "cache"))
    base = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.max_seq_len=32",
            "model.moe_experts=4", "model.moe_top_k=2", "model.moe_ffn_hidden=32", "train.batch_size=4",
            "train.seq_len=32", "train.max_steps=3", "train.warmup_steps=0", "train.eval_every=3",
            "train.eval_batches=1", "train.log_every=1", "train.record_every=1"]
    train(run_config(RunConfig.load(None, base)), tmp_path / "a", progress=False)
    metrics = RunDir(tmp_path / "a").read_metrics()
    assert all(r["moe_load_balance"] >= 1.0 - 1e-6 and r["moe_z_loss"] > 0 for r in metrics)
    layers = [json.loads(line) for line in (tmp_path / "a" / "layers.jsonl").read_text().splitlines()]
    assert set(layers[-1]["expert_load"]) == {"0", "1"}
    assert all(sum(load) == pytest.approx(1.0) for load in layers[-1]["expert_load"].values())
    # the weights enter the objective: without them the router learns something else
    train(run_config(RunConfig.load(None, [*base, "model.moe_aux_loss_weight=0", "model.moe_z_loss_weight=0"])),
          tmp_path / "b", progress=False)
    with_aux, without = load_run(tmp_path / "a").model, load_run(tmp_path / "b").model
    assert RunDir(tmp_path / "b").read_metrics()[0]["loss"] == pytest.approx(metrics[0]["loss"])  # same start
    assert not torch.equal(with_aux.model.layers[0].mlp.gate.weight, without.model.layers[0].mlp.gate.weight)


def test_moe_model_exports_as_custom_code(tmp_path):
    transformers = pytest.importorskip("transformers")
    from normlab import ModelConfig, build_model
    from normlab.data import ByteTokenizer
    from normlab.hf import export

    model = build_model(ModelConfig.from_strategy("hybridnorm_star", **{**MOE_SIZES, "vocab_size": 257},
                                                  moe_layers=[0, 2]), seed=4).eval()
    assert export(model, tmp_path / "hf", ByteTokenizer()) == "custom"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    ids = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids), atol=1e-5, rtol=1e-5)
        theirs = loaded.generate(ids[:1, :4], max_new_tokens=6, do_sample=False)
    assert torch.equal(theirs, model.generate(ids[:1, :4], 6))


def test_load_balance_loss_is_transformers_over_k():
    pytest.importorskip("transformers")
    from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

    moe = _moe().float()
    x = torch.randn(20, D, generator=torch.Generator().manual_seed(6))
    moe(x)
    theirs = load_balancing_loss_func((moe.gate(x),), E, K)
    assert moe.load_balance_loss.item() == pytest.approx(theirs.item() / K, rel=1e-5)


def test_tiny_moe_config_trains_and_diagnoses(tmp_path, monkeypatch):
    import json
    from pathlib import Path

    from normlab.config import RunConfig
    from normlab.data import TokenShards, eval_batches
    from normlab.diagnostics import diagnose
    from normlab.train.saved import load_run
    from normlab.train.trainer import load_data, run_config, train

    monkeypatch.setenv("NORMLAB_CACHE", str(tmp_path / "cache"))
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny-moe.yaml"
    raw = RunConfig.load(config, ["train.max_steps=4", "train.save_every=2", "train.eval_every=2",
                                  "train.eval_batches=1", "train.warmup_steps=0"])
    assert raw["model"]["moe_experts"] == 8
    run = tmp_path / "moe"
    assert train(run_config(raw), run, progress=False).status == "finished"
    result = diagnose(run, tmp_path / "diag", batches=1, progress=False)
    assert result["moe_reference_step"] == 2
    routing = result["moe_routing"]
    assert [r["layer"] for r in routing] == [0, 1, 2, 3]
    saved = load_run(run)
    shard_dir, _ = load_data(saved.config.data, False)
    x, _ = next(iter(eval_batches(TokenShards(shard_dir, "val"), 16, 128, 1)))  # diagnose's batch
    with torch.no_grad():
        saved.model(x)
    for row, block in zip(routing, saved.model.model.layers, strict=True):
        assert row["load"] == pytest.approx(block.mlp.expert_load.tolist())  # the same batch, routed alike
        assert 0 < row["entropy_normalized"] <= 1 and 0 <= row["top1_changed"] <= 1
    same = diagnose(run, tmp_path / "diag2", batches=1, progress=False, reference_step=4)["moe_routing"]
    assert all(r["top1_changed"] == 0 for r in same)
    assert "moe_routing.png" in json.loads((tmp_path / "diag" / "diagnostics.json").read_text())["plots"]


def test_olmoe_exports_as_stock_and_imports_back(tmp_path):
    transformers = pytest.importorskip("transformers")
    from normlab import ModelConfig, build_model, from_hf
    from normlab.data import ByteTokenizer
    from normlab.hf import export, stock_family

    sizes = {**MOE_SIZES, "vocab_size": 257}
    assert stock_family(ModelConfig.from_strategy("pre_norm", **sizes))[0] is None  # Llama has no experts
    assert stock_family(ModelConfig.from_strategy("qk_norm", qk_norm_scope="full", moe_layers=[1], **sizes))[0] is None
    cfg = ModelConfig.from_strategy("qk_norm", qk_norm_scope="full", rope_theta=500.0, norm_eps=1e-4, **sizes)
    model = build_model(cfg, seed=6).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)  # norm gains away from 1 so that a skipped norm would show
    assert export(model, tmp_path / "olmoe", ByteTokenizer(), format="stock") == "stock"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "olmoe").eval()
    assert type(loaded).__name__ == "OlmoeForCausalLM"
    ids = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids), atol=1e-5, rtol=1e-5)
        assert torch.equal(loaded.generate(ids[:1, :4], max_new_tokens=6, do_sample=False), model.generate(ids[:1, :4], 6))

    for renormalize, tied in ((False, False), (True, True)):
        config = transformers.OlmoeConfig(vocab_size=97, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                          num_experts_per_tok=2, norm_topk_prob=renormalize,
                                          tie_word_embeddings=tied, max_position_embeddings=64)
        theirs = transformers.OlmoeForCausalLM(config).eval()
        ours = from_hf(theirs)
        assert (ours.config.moe_experts, ours.config.moe_renormalize, ours.config.tie_embeddings) == (4, renormalize, tied)
        x = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(8))
        with torch.no_grad():
            torch.testing.assert_close(ours(x), theirs(x).logits, atol=1e-5, rtol=1e-5)


def test_compare_runs_moe_models(tmp_path, monkeypatch):
    import json
    from pathlib import Path

    from normlab.compare import compare, parse_variants
    from normlab.config import RunConfig

    monkeypatch.setenv("NORMLAB_CACHE", str(tmp_path / "cache"))
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny-moe.yaml"
    raw = RunConfig.load(config, ["train.max_steps=3", "train.eval_every=3", "train.eval_batches=1",
                                  "model.n_layers=2", "train.warmup_steps=0"])
    _, statuses = compare(raw, parse_variants("pre_norm,hybridnorm_star"), [0], tmp_path / "out", progress=False)
    assert set(statuses.values()) == {"finished"}
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert all(e["val_loss"]["n"] == 1 for e in summary["strategies"].values())
    metrics = (tmp_path / "out" / "runs" / "hybridnorm_star-s0" / "metrics.jsonl").read_text()
    assert "moe_load_balance" in metrics
