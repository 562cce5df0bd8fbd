"""Each placement's block output against its METHODS.md formula, computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

import reference as ref
from normlab import ModelConfig, build_model, layer_plans
from normlab.nn.attention import rope_tables
from normlab.nn.registry import is_norm

SIZES = dict(vocab_size=50, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=16)


def model_with_random_norms(seed=0, **fields):
    """A model whose norm gains/biases/scalars are random, so a swapped slot shows."""
    cfg = ModelConfig(**{**SIZES, **fields})
    model = build_model(cfg, seed=seed).double()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if is_norm(module):
                for p in module.parameters():
                    p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def rope64(cfg, seq_len=5):
    cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, torch.float64)
    return cos[:seq_len], sin[:seq_len]


def block_io(model, layer, seed=0):
    block = model.model.layers[layer]
    x = torch.randn(2, 5, model.config.d_model, generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64)
    return block, x, block(x, *rope64(model.config))


def attn(b, x, cfg):
    return ref.attention(b.self_attn, x, cfg)


def ffn(b, x):
    return ref.ffn(b.mlp, x)


def n(module, x):
    return ref.norm(module, x)


def pre(b, x, cfg, c=1.0):
    """Y = X + Attn(c N(X));  X' = Y + FFN(c N(Y))"""
    y = x + attn(b, c * n(b.input_layernorm, x), cfg)
    return y + ffn(b, c * n(b.post_attention_layernorm, y))


def post(b, x, cfg, a=1.0):
    """Y = N(a X + Attn(X));  X' = N(a Y + FFN(Y))"""
    y = n(b.attn_residual_norm, a * x + attn(b, x, cfg))
    return n(b.ffn_residual_norm, a * y + ffn(b, y))


def peri(b, x, cfg):
    """Y = X + N_out(Attn(N_in(X)));  X' = Y + N_out'(FFN(N_in'(Y)))"""
    y = x + n(b.attn_output_layernorm, attn(b, n(b.input_layernorm, x), cfg))
    return y + n(b.post_feedforward_layernorm, ffn(b, n(b.post_attention_layernorm, y)))


def output(b, x, cfg):
    """Y = X + N(Attn_QK(X));  X' = Y + N(FFN(Y))"""
    y = x + n(b.attn_output_layernorm, attn(b, x, cfg))
    return y + n(b.post_feedforward_layernorm, ffn(b, y))


def hybrid(b, x, cfg):
    """Y = X + Attn_QKV(X);  X' = N(Y) + FFN(N(Y))"""
    z = n(b.attn_residual_norm, x + attn(b, x, cfg))
    return z + ffn(b, z)


CASES = [
    # (placement, extra fields, layer, formula)
    ("pre", {}, 1, pre),
    ("post", {}, 1, post),
    ("peri", {}, 1, peri),
    ("output", {}, 1, output),
    ("deepnorm", {}, 1, lambda b, x, cfg: post(b, x, cfg, a=(2 * cfg.n_layers) ** 0.25)),
    ("mixln", {}, 0, post),  # floor(0.25 * 4) = 1 post layer
    ("mixln", {}, 1, pre),
    ("hybrid", {}, 1, hybrid),
    ("hybrid_star", {}, 0, pre),  # layer 0: Pre-Norm with QKV-norm
    ("hybrid_star", {}, 2, hybrid),
    ("lns", {}, 2, lambda b, x, cfg: pre(b, x, cfg, c=1 / math.sqrt(3))),
    ("pre", {"qk_norm": "qk"}, 1, pre),
    ("pre", {"qk_norm": "qkv", "qk_norm_scope": "full"}, 1, pre),
    ("pre", {"norm": "layernorm"}, 1, pre),
    ("pre", {"norm": "dyt"}, 1, pre),
    ("post", {"norm": "dyt"}, 1, post),
    ("pre", {"norm": "bhyt_star"}, 1, pre),
    ("peri", {"norm": "bhyt_star"}, 1, peri),
]


@pytest.mark.parametrize("placement,extra,layer,formula", CASES,
                         ids=[f"{c[0]}-{c[2]}-{'-'.join(map(str, c[1].values())) or 'rms'}" for c in CASES])
def test_block_matches_formula(placement, extra, layer, formula):
    model = model_with_random_norms(placement=placement, **extra)
    block, x, out = block_io(model, layer)
    expected = formula(block, x, model.config)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


def test_qk_norm_sits_before_rope_and_is_per_head_by_default():
    model = model_with_random_norms(placement="hybrid")
    attn_mod = model.model.layers[0].self_attn
    assert attn_mod.q_norm.weight.shape == (model.config.head_dim,)
    assert attn_mod.v_norm.weight.shape == (model.config.head_dim,)
    full = model_with_random_norms(placement="output")
    assert full.model.layers[0].self_attn.k_norm.weight.shape == (2 * full.config.head_dim,)
    # Norm after RoPE would give a different result: the reference applies it before.
    block, x, out = block_io(model, 1)
    torch.testing.assert_close(out, hybrid(block, x, model.config), rtol=1e-9, atol=1e-9)


def test_bhyt_block_uses_variance_approximation_at_ffn_site():
    """Site 2 uses s^2 + c_attn * lambda_attn^2 / kappa^2 with s^2 = ms(X), not ms(Y)."""
    model = model_with_random_norms(norm="bhyt")
    block = model.model.layers[1]
    block.c_attn.fill_(0.37)  # large enough that dropping the correction term would show
    _, x, out = block_io(model, 1)
    site1, site2 = block.input_layernorm, block.post_attention_layernorm
    s2 = x.pow(2).mean(-1, keepdim=True)
    y = x + attn(block, ref.bhyt(site1, x, s2), model.config)
    s2_hat = s2 + 0.37 * site1.lam**2 / model.config.bhyt_kappa**2
    expected = y + ffn(block, ref.bhyt(site2, y, s2_hat))
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    exact = y + ffn(block, ref.bhyt(site2, y, y.pow(2).mean(-1, keepdim=True)))
    assert not torch.allclose(out, exact, atol=1e-6)


def test_bhyt_correction_does_not_backpropagate_into_lambda_attn():
    model = model_with_random_norms(norm="bhyt")
    block = model.model.layers[0]
    block.c_attn.fill_(0.5)
    site1 = block.input_layernorm
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    # Gradient of the FFN-site output w.r.t. lambda_attn through s2_hat only: with the
    # attention sub-layer removed (o_proj = 0), lambda_attn reaches the output only via s2_hat.
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
    block(x, *rope64(model.config)).sum().backward()
    assert site1.lam.grad is not None and site1.lam.grad.abs().item() == 0.0


def test_c_attn_matches_direct_gqa_computation():
    """c_attn = ||W_V^exp W_O||_F^2 / (T d), W_V expanded per query head (n_heads=4, n_kv=2)."""
    model = build_model(ModelConfig(**SIZES, norm="bhyt", bhyt_context_len=12), seed=3)
    cfg = model.config
    for block in model.model.layers:
        wv = block.self_attn.v_proj.weight.T  # (d, n_kv * d_k), x @ W orientation
        wo = block.self_attn.o_proj.weight.T  # (n_heads * d_k, d)
        group, dk = cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
        wv_exp = torch.cat([wv[:, (h // group) * dk:(h // group + 1) * dk] for h in range(cfg.n_heads)], 1)
        expected = (wv_exp @ wo).pow(2).sum() / (12 * cfg.d_model)
        assert block.c_attn.item() == pytest.approx(expected.item(), rel=1e-5)
        assert block.c_attn.item() > 0


def test_c_attn_refresh_follows_weights_and_is_saved():
    model = build_model(ModelConfig(**SIZES, norm="bhyt"), seed=0)
    block = model.model.layers[0]
    before = block.c_attn.item()
    with torch.no_grad():
        block.self_attn.o_proj.weight.mul_(2.0)
    assert block.c_attn.item() == before  # only changes on refresh
    model.refresh_bhyt_constants()
    assert block.c_attn.item() == pytest.approx(4 * before, rel=1e-5)
    assert "model.layers.0.c_attn" in model.state_dict()


def test_bhyt_star_uses_exact_statistic_and_differs_from_bhyt():
    approx = model_with_random_norms(norm="bhyt")
    exact = model_with_random_norms(norm="bhyt_star")
    exact.load_state_dict({k: v for k, v in approx.state_dict().items() if "c_attn" not in k})
    _, x, out_approx = block_io(approx, 2)
    block, _, out_exact = block_io(exact, 2)
    torch.testing.assert_close(out_exact, pre(block, x, exact.config), rtol=1e-9, atol=1e-9)
    assert not torch.allclose(out_approx, out_exact, atol=1e-6)


def test_hybridnorm_star_differs_from_hybridnorm_only_in_layer_0():
    hybrid_plans = layer_plans(ModelConfig.from_strategy("hybridnorm", **SIZES))
    star_plans = layer_plans(ModelConfig.from_strategy("hybridnorm_star", **SIZES))
    assert hybrid_plans[1:] == star_plans[1:]
    assert hybrid_plans[0] != star_plans[0]
    assert star_plans[0].input_norm and star_plans[0].ffn_input_norm
    assert not star_plans[0].attn_residual_norm and star_plans[0].qk_norm == "qkv"
    a = build_model(ModelConfig.from_strategy("hybridnorm", **SIZES)).state_dict()
    b = build_model(ModelConfig.from_strategy("hybridnorm_star", **SIZES)).state_dict()
    only_a, only_b = set(a) - set(b), set(b) - set(a)
    assert only_a == {"model.layers.0.attn_residual_norm.weight"}
    assert only_b == {"model.layers.0.input_layernorm.weight",
                      "model.layers.0.post_attention_layernorm.weight"}


def test_layer_overrides_reproduce_hybridnorm_star():
    star = ModelConfig.from_strategy("hybridnorm_star", **SIZES)
    manual = ModelConfig.from_strategy(
        "hybridnorm", **SIZES, layer_overrides={0: {"placement": "pre", "qk_norm": "qkv"}}
    )
    assert layer_plans(star) == layer_plans(manual)


@pytest.mark.parametrize("n_layers,alpha,n_post", [(12, 0.25, 3), (24, 0.25, 6), (32, 0.0625, 2),
                                                   (10, 0.25, 2), (4, 0.0, 0), (4, 1.0, 4)])
def test_mixln_plan(n_layers, alpha, n_post):
    cfg = ModelConfig(**{**SIZES, "n_layers": n_layers}, placement="mixln", mixln_alpha=alpha)
    assert [p.placement for p in layer_plans(cfg)] == ["post"] * n_post + ["pre"] * (n_layers - n_post)


@pytest.mark.parametrize("n_layers", [1, 4, 12, 32])
def test_deepnorm_constants(n_layers):
    cfg = ModelConfig.from_strategy("deepnorm", **{**SIZES, "n_layers": n_layers})
    assert cfg.deepnorm_alpha == pytest.approx((2 * n_layers) ** 0.25)
    assert cfg.deepnorm_beta == pytest.approx((8 * n_layers) ** -0.25)
    assert all(p.residual_scale == pytest.approx((2 * n_layers) ** 0.25) for p in layer_plans(cfg))


def test_deepnorm_init_gains():
    """Xavier-normal: std = gain * sqrt(2 / (fan_in + fan_out)); beta on v/o/FFN, 1 on q/k."""
    cfg = ModelConfig.from_strategy("deepnorm", vocab_size=50, d_model=256, n_layers=8, n_heads=4)
    block = build_model(cfg).model.layers[3]
    xavier = math.sqrt(2.0 / (256 + 256))
    beta = (8 * 8) ** -0.25
    assert block.self_attn.q_proj.weight.std().item() == pytest.approx(xavier, rel=0.05)
    assert block.self_attn.v_proj.weight.std().item() == pytest.approx(beta * xavier, rel=0.05)
    assert block.self_attn.o_proj.weight.std().item() == pytest.approx(beta * xavier, rel=0.05)
    ffn_xavier = math.sqrt(2.0 / (256 + cfg.ffn_hidden))
    assert block.mlp.down_proj.weight.std().item() == pytest.approx(beta * ffn_xavier, rel=0.05)


def test_lns_scales_per_layer():
    plans = layer_plans(ModelConfig.from_strategy("lns", **{**SIZES, "n_layers": 6}))
    assert [p.branch_scale for p in plans] == pytest.approx([1 / math.sqrt(i + 1) for i in range(6)])
    assert all(p.placement == "pre" for p in plans)
