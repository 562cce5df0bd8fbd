"""The language model (Hugging Face Llama module names) and its init schemes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from normlab.config import ModelConfig
from normlab.nn.attention import rope_tables
from normlab.nn.block import Block
from normlab.nn.norms import NORM_CLASSES, make_norm
from normlab.strategies import layer_plans


@dataclass
class CausalLMOutput:
    """``loss`` is the mean next-token cross-entropy (None without labels)."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class Backbone(nn.Module):
    """Embedding, blocks, final norm: the ``model.`` prefix of a Llama state dict."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.embed_scale:
            self.embed_scale = nn.Parameter(torch.tensor(math.sqrt(cfg.d_model)))
        else:
            self.embed_scale = None
        plans = layer_plans(cfg)
        self.layers = nn.ModuleList(Block(cfg, i, plan) for i, plan in enumerate(plans))
        self.norm = (
            nn.Identity()
            if cfg.final_norm == "none"
            else make_norm(cfg.final_norm, cfg.d_model, eps=cfg.norm_eps, site="other", cfg=cfg)
        )
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(
        self, input_ids: torch.Tensor, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Final hidden states; with ``output_hidden_states`` also the residual stream entering
        each block plus the final normed output (the Hugging Face convention, L+1 entries)."""
        seq_len = input_ids.shape[-1]
        if seq_len > self.rope_cos.shape[0]:
            raise ValueError(
                f"input has {seq_len} tokens but max_seq_len is {self.rope_cos.shape[0]}"
            )
        x = self.embed_tokens(input_ids)
        if self.embed_scale is not None:
            x = x * self.embed_scale.to(x.dtype)
        cos, sin = self.rope_cos[:seq_len], self.rope_sin[:seq_len]
        hidden: list[torch.Tensor] = []
        for block in self.layers:
            if output_hidden_states:
                hidden.append(x)
            x = block(x, cos, sin)
        x = self.norm(x)
        if output_hidden_states:
            hidden.append(x)
        return x, tuple(hidden) if output_hidden_states else None


class NormLM(nn.Module):
    """Decoder-only language model; ``forward(ids)`` gives logits (B, T, V),
    ``forward(ids, labels=ids)`` a :class:`CausalLMOutput` with the shifted next-token loss."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> torch.Tensor | CausalLMOutput:
        """Labels follow the Hugging Face convention: ``labels[t]`` is the token at position t
        (shifted inside), ``-100`` is ignored."""
        x, hidden = self.model(input_ids, output_hidden_states)
        logits = self.lm_head(x)
        if labels is None and not output_hidden_states:
            return logits
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutput(logits=logits, loss=loss, hidden_states=hidden)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (a tied head counts once)."""
        params = {id(p): p for p in self.parameters()}
        if exclude_embeddings:
            params.pop(id(self.model.embed_tokens.weight), None)
            params.pop(id(self.lm_head.weight), None)
        return sum(p.numel() for p in params.values())

    @torch.no_grad()
    def refresh_bhyt_constants(self) -> None:
        """Recompute every BHyT block's c_attn from the current weights (no-op otherwise)."""
        for block in self.model.layers:
            if block.shared_statistic:
                block.refresh_c_attn(self.config.bhyt_context_len)


def build_model(cfg: ModelConfig, seed: int = 0) -> NormLM:
    """Build and initialise a model. The init depends only on (cfg.init, sizes, seed): every
    linear layer draws from one generator in a fixed order, so two strategies with the same
    init scheme start from identical projection weights and differ only in their norms."""
    model = NormLM(cfg)
    init_weights(model, seed)
    return model


@torch.no_grad()
def init_weights(model: NormLM, seed: int = 0) -> None:
    """Initialise in place with ``cfg.init``; sigma = ``cfg.init_std`` (default 1/sqrt(2.5 d)).

    - ``normal``: every weight ~ N(0, sigma) truncated at +-3 sigma.
    - ``megatron``: as normal, o_proj and down_proj use sigma / sqrt(2L).
    - ``depth_scaled``: as normal, o_proj and down_proj of layer l use sigma / sqrt(2(l+1)).
    - ``deepnorm``: Xavier-normal with gain beta = (8L)^(-1/4) for v_proj, o_proj and the FFN,
      gain 1 for q_proj and k_proj; embedding and head as normal.

    Norm gains start at 1, LayerNorm biases at 0, DyT alpha / BHyT lambda at their configured
    values, the embedding scalar at sqrt(d); BHyT's c_attn is computed from the new weights.
    """
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    sigma, n_layers = cfg.init_std, cfg.n_layers

    def normal(weight: torch.Tensor, std: float) -> None:
        weight.copy_(_trunc_normal(weight.shape, std, gen))

    def xavier(weight: torch.Tensor, gain: float) -> None:
        fan_out, fan_in = weight.shape
        normal(weight, gain * math.sqrt(2.0 / (fan_in + fan_out)))

    normal(model.model.embed_tokens.weight, sigma)
    for layer, block in enumerate(model.model.layers):
        attn, mlp = block.self_attn, block.mlp
        inputs = (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj)
        outputs = (attn.o_proj, mlp.down_proj)
        if cfg.init == "deepnorm":
            beta = cfg.deepnorm_beta
            for linear in (attn.q_proj, attn.k_proj):
                xavier(linear.weight, 1.0)
            for linear in (attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                xavier(linear.weight, beta)
            continue
        out_std = {
            "normal": sigma,
            "megatron": sigma / math.sqrt(2 * n_layers),
            "depth_scaled": sigma / math.sqrt(2 * (layer + 1)),
        }[cfg.init]
        for linear in inputs:
            normal(linear.weight, sigma)
        for linear in outputs:
            normal(linear.weight, out_std)
    if not cfg.tie_embeddings:
        normal(model.lm_head.weight, sigma)
    for module in model.modules():
        if isinstance(module, NORM_CLASSES):
            module.reset_parameters()
    if model.model.embed_scale is not None:
        model.model.embed_scale.fill_(math.sqrt(cfg.d_model))
    model.refresh_bhyt_constants()


def _trunc_normal(shape: torch.Size, std: float, gen: torch.Generator) -> torch.Tensor:
    """N(0, std) truncated at +-3 std, drawn from ``gen`` (a pure function of its state)."""
    out = torch.empty(shape)
    nn.init.trunc_normal_(out, std=1.0, a=-3.0, b=3.0, generator=gen)
    return out * std
