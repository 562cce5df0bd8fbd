"""Strategies, model API, init, Hugging Face parity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from normlab import STRATEGIES, ModelConfig, build_model
from normlab.config import dyt_alpha_rule

SIZES = dict(vocab_size=64, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=32)


def test_thirteen_strategies_are_registered():
    assert sorted(STRATEGIES) == sorted([
        "pre_norm", "post_norm", "qk_norm", "peri_norm", "output_norm", "deepnorm", "mixln", "lns",
        "hybridnorm", "hybridnorm_star", "dyt", "bhyt", "bhyt_star"])
    for strategy in STRATEGIES.values():
        assert "=" in strategy.formula or ":" in strategy.formula


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategy_trains_a_step_with_gradients_everywhere(name):
    cfg = ModelConfig.from_strategy(name, **SIZES)
    model = build_model(cfg, seed=0)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    out = model(ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient reaches {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient in {pname}"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient in {pname}"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) == len(list(model.parameters()))
    assert torch.isfinite(model(ids, labels=ids).loss)


def test_forward_returns_logits_and_loss_matches_cross_entropy():
    model = build_model(ModelConfig.from_strategy("pre_norm", **SIZES))
    ids = torch.randint(0, 64, (3, 10))
    logits = model(ids)
    assert logits.shape == (3, 10, 64)
    labels = ids.clone()
    labels[0, 4] = -100
    out = model(ids, labels=labels)
    torch.testing.assert_close(out.logits, logits)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_hidden_states_are_block_inputs():
    model = build_model(ModelConfig.from_strategy("pre_norm", **SIZES))
    ids = torch.randint(0, 64, (2, 8))
    out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == SIZES["n_layers"] + 1
    torch.testing.assert_close(out.hidden_states[0], model.model.embed_tokens(ids))
    cos, sin = model.model.rope_cos[:8], model.model.rope_sin[:8]
    torch.testing.assert_close(out.hidden_states[2], model.model.layers[1](out.hidden_states[1], cos, sin))


def test_too_long_input_is_rejected():
    model = build_model(ModelConfig(**SIZES))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_init_is_deterministic_given_seed_and_shared_across_strategies():
    a = build_model(ModelConfig.from_strategy("pre_norm", **SIZES), seed=7).state_dict()
    b = build_model(ModelConfig.from_strategy("pre_norm", **SIZES), seed=7).state_dict()
    c = build_model(ModelConfig.from_strategy("pre_norm", **SIZES), seed=8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], c["model.layers.0.self_attn.q_proj.weight"])
    # Only the normalization differs between strategies with the same init scheme.
    post = build_model(ModelConfig.from_strategy("post_norm", **SIZES), seed=7).state_dict()
    shared = [k for k in a if k in post and "norm" not in k]
    assert len(shared) == len([k for k in a if "norm" not in k])
    assert all(torch.equal(a[k], post[k]) for k in shared)


def test_init_schemes_scale_output_projections():
    cfg = dict(vocab_size=64, d_model=256, n_layers=8, n_heads=4)
    sigma = 1 / (2.5 * 256) ** 0.5
    normal = build_model(ModelConfig(**cfg, init="normal"), seed=0)
    megatron = build_model(ModelConfig(**cfg, init="megatron"), seed=0)
    depth = build_model(ModelConfig(**cfg, init="depth_scaled"), seed=0)
    q = normal.model.layers[0].self_attn.q_proj.weight
    assert q.std().item() == pytest.approx(sigma * 0.986, rel=0.03)  # 3-sigma truncation
    assert q.abs().max().item() <= 3 * sigma + 1e-7
    for layer in (0, 5):
        n_o = normal.model.layers[layer].self_attn.o_proj.weight
        torch.testing.assert_close(megatron.model.layers[layer].self_attn.o_proj.weight, n_o / 16 ** 0.5)
        torch.testing.assert_close(depth.model.layers[layer].mlp.down_proj.weight,
                                   normal.model.layers[layer].mlp.down_proj.weight / (2 * (layer + 1)) ** 0.5)
    torch.testing.assert_close(megatron.model.layers[3].mlp.up_proj.weight, normal.model.layers[3].mlp.up_proj.weight)


def test_dyt_alpha_width_rule_and_sites():
    assert dyt_alpha_rule(512) == (1.0, 1.0)
    assert dyt_alpha_rule(1024) == (1.0, 1.0)
    assert dyt_alpha_rule(2048) == (1.0, 0.5)
    assert dyt_alpha_rule(4096) == (0.8, 0.2)
    assert dyt_alpha_rule(5120) == (0.6, 0.15)
    assert dyt_alpha_rule(8192) == (0.2, 0.05)
    cfg = ModelConfig(vocab_size=8, d_model=2048, n_heads=16, n_layers=1, norm="dyt")
    assert (cfg.dyt_alpha_attn, cfg.dyt_alpha_other) == (1.0, 0.5)
    model = build_model(ModelConfig.from_strategy("dyt", **SIZES, dyt_alpha_attn=0.7, dyt_alpha_other=0.3))
    block = model.model.layers[2]
    assert block.input_layernorm.alpha.item() == pytest.approx(0.7)
    assert block.post_attention_layernorm.alpha.item() == pytest.approx(0.3)
    assert model.model.norm.alpha.item() == pytest.approx(0.3)
    assert model.model.embed_scale.item() == pytest.approx(64 ** 0.5)
    ids = torch.randint(0, 64, (1, 4))
    out = model(ids, output_hidden_states=True)
    torch.testing.assert_close(out.hidden_states[0], 8.0 * model.model.embed_tokens(ids))


def test_bhyt_defaults():
    model = build_model(ModelConfig.from_strategy("bhyt", **SIZES))
    block = model.model.layers[0]
    assert block.input_layernorm.lam.item() == 2.0 and block.post_attention_layernorm.lam.item() == 1.0
    assert block.input_layernorm.kappa == 10.0 and block.input_layernorm.eps == 1e-6
    assert type(model.model.norm).__name__ == "RMSNorm"


def test_num_params_counts_tied_head_once():
    untied = build_model(ModelConfig(**SIZES))
    tied = build_model(ModelConfig(**SIZES, tie_embeddings=True))
    assert untied.num_params() - tied.num_params() == 64 * 64
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert untied.num_params(exclude_embeddings=True) == untied.num_params() - 2 * 64 * 64
    assert untied.num_params() == sum(p.numel() for p in untied.parameters())


def test_state_dict_and_logits_match_hf_llama():
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig.from_strategy("pre_norm", **SIZES)
    model = build_model(cfg, seed=1)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    assert set(hf.state_dict()) == set(model.state_dict())
    hf.load_state_dict(model.state_dict())
    ids = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=1e-4, atol=1e-4)
