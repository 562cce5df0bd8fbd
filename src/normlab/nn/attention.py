"""Causal self-attention: RoPE, grouped-query attention, optional Q/K/V norms, SDPA, KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from normlab.nn.norms import fast_elementwise
from normlab.nn.registry import make_norm

_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def rope_tables(
    head_dim: int, max_seq_len: int, theta: float, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin tables (max_seq_len, head_dim) for ``apply_rope``, in the Hugging Face
    Llama (half-rotation) layout: angle_{t,i} = t * theta^(-2(i mod d/2)/d); the sin table is
    negated on the first half so that rotate_half(x) * sin = roll(x, d/2) * signed_sin."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return torch.cat([freqs, freqs], dim=-1).cos().to(dtype), torch.cat([-freqs, freqs], dim=-1).sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin with rotate_half([a, b]) = [-b, a] on the last dim, computed
    as x * cos + roll(x, d/2) * signed_sin (three kernels instead of six; one fused kernel on
    the CPU fast path, for x (B, H, T, d) and tables (T, d))."""
    if x.dim() == 4 and cos.shape == x.shape[2:] and (kernel := fast_elementwise("rope", x, cos, signed_sin)):
        return kernel(x, cos, signed_sin)
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), signed_sin).to(x.dtype)


class KVCache:
    """Keys and values of every layer, preallocated as (B, n_kv_heads, capacity, d_k).

    ``update(k, v, layer)`` writes the new positions and returns all keys and values so far: the
    interface of Hugging Face's ``Cache.update``, so attention works with either. Keys are
    stored after the Q/K/V norms and RoPE, values after the V norm."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (batch, n_kv_heads, capacity, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.lengths = [0] * n_layers

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def get_seq_length(self, layer: int = 0) -> int:
        """Positions cached so far (before a forward: the number of past tokens)."""
        return self.lengths[layer]

    def update(self, k: torch.Tensor, v: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.lengths[layer], self.lengths[layer] + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; {end} requested")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        self.lengths[layer] = end
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def repeat_interleave(self, repeats: torch.Tensor, capacity: int) -> KVCache:
        """A new cache whose row j copies row i, ``repeats[i]`` times (one context, many
        continuations), with room for ``capacity`` positions."""
        length = self.lengths[0]
        out = KVCache(len(self.keys), int(repeats.sum()), self.keys[0].shape[1], self.keys[0].shape[3],
                      capacity, self.keys[0].dtype, self.keys[0].device)
        for layer in range(len(self.keys)):
            out.keys[layer][:, :, :length] = self.keys[layer][:, :, :length].repeat_interleave(repeats, 0)
            out.values[layer][:, :, :length] = self.values[layer][:, :, :length].repeat_interleave(repeats, 0)
        out.lengths = [length] * len(self.keys)
        return out


class Attention(nn.Module):
    """softmax(N_q(Q) N_k(K)^T / sqrt(d_k)) N_v(V) W_O, causal, RoPE on q and k.

    Q/K/V norms (``qk_norm`` 'qk' or 'qkv') act after the projections and before RoPE: per head
    over d_k with one gain shared by all heads (``scope='head'``), or over the full projection
    width (``scope='full'``, OLMo 2).
    """

    def __init__(self, cfg, qk_norm: str = "none", layer: int = 0) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.full_scope = cfg.qk_norm_scope == "full"
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(cfg.d_model, q_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, kv_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, kv_dim, bias=False)
        self.o_proj = nn.Linear(q_dim, cfg.d_model, bias=False)

        def norm(width: int) -> nn.Module:
            dim = width if self.full_scope else self.head_dim
            return make_norm(cfg.qk_norm_type, dim, cfg, "attn")

        self.q_norm = norm(q_dim) if qk_norm in ("qk", "qkv") else None
        self.k_norm = norm(kv_dim) if qk_norm in ("qk", "qkv") else None
        self.v_norm = norm(kv_dim) if qk_norm == "qkv" else None

    def _heads(self, x: torch.Tensor, norm: nn.Module | None, n: int) -> torch.Tensor:
        """(B, T, n*d_k) -> (B, n, T, d_k), applying the Q/K/V norm at its scope."""
        if norm is not None and self.full_scope:
            x = norm(x)
        x = x.unflatten(-1, (n, self.head_dim)).transpose(1, 2)
        if norm is not None and not self.full_scope:
            x = norm(x)
        return x

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """``cos``/``sin`` are the RoPE tables at the positions of ``x`` ((T, d_k), or
        (B, 1, T, d_k) per row); ``cache`` (KVCache or an HF Cache) holds earlier positions;
        ``mask`` (B, 1, T, T_keys) says which keys each query sees, None: causal."""
        q = self._heads(self.q_proj(x), self.q_norm, self.n_heads)
        k = self._heads(self.k_proj(x), self.k_norm, self.n_kv_heads)
        v = self._heads(self.v_proj(x), self.v_norm, self.n_kv_heads)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer)
        # Without a mask: causal over the new tokens, or one new token that sees every cached key.
        causal = mask is None and q.shape[2] > 1
        if self.n_kv_heads != self.n_heads:
            if _SDPA_HAS_GQA:
                out = F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, enable_gqa=True)
            else:
                group = self.n_heads // self.n_kv_heads
                k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
                out = F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal)
        else:
            out = F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal)
        return self.o_proj(out.transpose(1, 2).flatten(2))

    def value_output_product(self) -> torch.Tensor:
        """W_V^exp W_O in x.W orientation (d, d), W_V expanded to every query head (GQA)."""
        group = self.n_heads // self.n_kv_heads
        w_v = self.v_proj.weight.unflatten(0, (self.n_kv_heads, self.head_dim))
        w_v_exp = w_v.repeat_interleave(group, dim=0).flatten(0, 1)  # (n_heads*d_k, d)
        return w_v_exp.t() @ self.o_proj.weight.t()
