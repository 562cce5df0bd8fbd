"""Embedding, blocks and final norm: the ``model.`` prefix of a Hugging Face Llama state dict."""

from __future__ import annotations

import math

import torch
from torch import nn

from normlab.nn.attention import rope_tables
from normlab.nn.block import Block
from normlab.nn.plan import LayerPlan
from normlab.nn.registry import make_norm


class Backbone(nn.Module):
    """x_0 = embed(ids) (* s, DyT's learnable sqrt(d) scalar), x_{l+1} = Block_l(x_l), out = N_final(x_L)."""

    def __init__(self, cfg, plans: list[LayerPlan]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.embed_scale:
            self.embed_scale = nn.Parameter(torch.full((1,), math.sqrt(cfg.d_model)))
        else:
            self.embed_scale = None
        self.layers = nn.ModuleList(Block(cfg, i, plan) for i, plan in enumerate(plans))
        self.norm = make_norm(cfg.final_norm, cfg.d_model, cfg, "other")
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        output_hidden_states: bool = False,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Final hidden states; with ``output_hidden_states`` also the residual stream entering
        each block plus the final normed output (the Hugging Face convention, L+1 entries).

        With a ``cache`` (``KVCache`` or an HF ``Cache``) the tokens continue the cached ones.
        ``position_ids`` (B, T) default to the next positions; ``attention_mask`` (B, past + T),
        1 for real tokens and 0 for padding, hides padded keys."""
        past = cache.get_seq_length() if cache is not None else 0
        seq_len = input_ids.shape[-1]
        limit = self.rope_cos.shape[0]
        if position_ids is None:
            if past + seq_len > limit:
                raise ValueError(f"input reaches position {past + seq_len} but max_seq_len is {limit}")
            cos, sin = self.rope_cos[past:past + seq_len], self.rope_sin[past:past + seq_len]
        else:
            if int(position_ids.max()) >= limit:
                raise ValueError(f"position {int(position_ids.max())} is beyond max_seq_len {limit}")
            cos, sin = self.rope_cos[position_ids].unsqueeze(1), self.rope_sin[position_ids].unsqueeze(1)
        mask = attention_mask_4d(past, seq_len, attention_mask, input_ids.device)
        x = self.embed_tokens(input_ids)
        if self.embed_scale is not None:
            x = x * self.embed_scale.to(x.dtype)
        hidden: list[torch.Tensor] = []
        for block in self.layers:
            if output_hidden_states:
                hidden.append(x)
            x = block(x, cos, sin, cache, mask)
        x = self.norm(x)
        if output_hidden_states:
            hidden.append(x)
        return x, tuple(hidden) if output_hidden_states else None


def attention_mask_4d(past: int, seq_len: int, key_mask: torch.Tensor | None,
                      device: torch.device) -> torch.Tensor | None:
    """Boolean (B, 1, T, past + T) mask, True where query i (position past + i) may see a key:
    keys at or before it that ``key_mask`` marks real. None when plain causal attention is
    exact (no padding, and either no past or a single new token). A query that sees no key (a
    left pad) sees itself, so that softmax stays finite."""
    if key_mask is not None and bool(key_mask.all()):
        key_mask = None
    if key_mask is None and (past == 0 or seq_len == 1):
        return None
    query_pos = torch.arange(past, past + seq_len, device=device)
    allowed = torch.arange(past + seq_len, device=device) <= query_pos[:, None]  # (T, K)
    if key_mask is None:
        return allowed[None, None]
    allowed = allowed[None] & key_mask[:, None, :].bool()  # (B, T, K)
    allowed[:, torch.arange(seq_len, device=device), query_pos] |= ~allowed.any(-1)
    return allowed[:, None]
