"""Hand-written reference maths for the tests: METHODS.md formulas with explicit loops and
matmuls, reading only the weights of normlab modules (never their forward code)."""

from __future__ import annotations

import math

import torch

from normlab.nn.norms import BHyT, DyT, LayerNorm, RMSNorm


def rms(x, g, eps):
    """g * x / sqrt(mean(x^2) + eps)"""
    return g * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def norm(module, x):
    """The formula of one norm module, written out by hand."""
    if isinstance(module, RMSNorm):
        return rms(x, module.weight, module.eps)
    if isinstance(module, LayerNorm):
        mu = x.mean(-1, keepdim=True)
        var = (x - mu).pow(2).mean(-1, keepdim=True)
        return module.weight * (x - mu) / torch.sqrt(var + module.eps) + module.bias
    if isinstance(module, DyT):
        return module.weight * torch.tanh(module.alpha * x)
    if isinstance(module, BHyT):
        return bhyt(module, x, x.pow(2).mean(-1, keepdim=True))
    if module is None or isinstance(module, torch.nn.Identity):
        return x
    raise TypeError(type(module))


def bhyt(module, x, s2):
    """g * tanh(lambda * x / (kappa * sqrt(s2 + eps)))"""
    return module.weight * torch.tanh(module.lam * x / (module.kappa * torch.sqrt(s2 + module.eps)))


def rope(x, theta):
    """Rotate pair (i, i + d/2) of position t by angle t * theta^(-2i/d); x is (..., T, d)."""
    out = x.clone()
    seq_len, dim = x.shape[-2:]
    half = dim // 2
    for t in range(seq_len):
        for i in range(half):
            angle = t * theta ** (-2 * i / dim)
            a, b = x[..., t, i], x[..., t, i + half]
            out[..., t, i] = a * math.cos(angle) - b * math.sin(angle)
            out[..., t, i + half] = b * math.cos(angle) + a * math.sin(angle)
    return out


def attention(attn, x, cfg):
    """Causal multi-head attention with GQA, Q/K/V norms before RoPE, by hand."""
    n_heads, n_kv, dk = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    group = n_heads // n_kv
    q, k, v = x @ attn.q_proj.weight.T, x @ attn.k_proj.weight.T, x @ attn.v_proj.weight.T
    full = cfg.qk_norm_scope == "full"
    if full:
        q = norm(attn.q_norm, q) if attn.q_norm is not None else q
        k = norm(attn.k_norm, k) if attn.k_norm is not None else k
        v = norm(attn.v_norm, v) if attn.v_norm is not None else v
    seq_len = x.shape[1]
    mask = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool), 1)
    heads = []
    for h in range(n_heads):
        kv = h // group
        qh, kh = q[..., h * dk:(h + 1) * dk], k[..., kv * dk:(kv + 1) * dk]
        vh = v[..., kv * dk:(kv + 1) * dk]
        if not full:
            qh = norm(attn.q_norm, qh) if attn.q_norm is not None else qh
            kh = norm(attn.k_norm, kh) if attn.k_norm is not None else kh
            vh = norm(attn.v_norm, vh) if attn.v_norm is not None else vh
        qh, kh = rope(qh, cfg.rope_theta), rope(kh, cfg.rope_theta)
        scores = (qh @ kh.transpose(-1, -2) / math.sqrt(dk)).masked_fill(mask, float("-inf"))
        heads.append(torch.softmax(scores, -1) @ vh)
    return torch.cat(heads, -1) @ attn.o_proj.weight.T


def ffn(mlp, x):
    """W_down (silu(W_gate x) * W_up x)"""
    gate = x @ mlp.gate_proj.weight.T
    return ((gate * torch.sigmoid(gate)) * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T


def tree(root) -> dict:
    """Every path under ``root`` with its bytes (None for a folder): to check that a refused
    command changed nothing."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes()
            for p in sorted(root.rglob("*"))}
