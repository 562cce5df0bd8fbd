"""The language model (Hugging Face Llama module names), generation with a KV cache, and the
init schemes."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from normlab.config import ModelConfig
from normlab.nn.attention import KVCache
from normlab.nn.backbone import Backbone
from normlab.nn.loss import linear_cross_entropy
from normlab.nn.moe import MoE
from normlab.nn.registry import is_norm
from normlab.strategies import layer_plans


@dataclass
class CausalLMOutput:
    """``loss`` is the mean next-token cross-entropy (None without labels or targets); ``logits``
    is None when the loss was computed from ``targets`` (they are never made whole)."""

    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class NormLM(nn.Module):
    """Decoder-only language model; ``forward(ids)`` gives logits (B, T, V),
    ``forward(ids, labels=ids)`` a :class:`CausalLMOutput` with the shifted next-token loss and
    ``forward(ids, targets=next_ids)`` one with the loss alone (no logits: the trainer's call)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg, layer_plans(cfg))
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor | CausalLMOutput:
        """Labels follow the Hugging Face convention: ``labels[t]`` is the token at position t
        (shifted inside), ``-100`` is ignored. ``targets[t]`` is the token that should follow
        position t (the trainer's batches): the loss then comes from ``linear_cross_entropy``,
        head and loss in one step without the logits. ``cache``, ``position_ids`` and
        ``attention_mask``: see ``Backbone.forward``."""
        x, hidden = self.model(input_ids, output_hidden_states, position_ids=position_ids,
                               attention_mask=attention_mask, cache=cache)
        if targets is not None:
            if labels is not None:
                raise ValueError("NormLM.forward: give labels (shifted inside) or targets (already shifted), not both")
            return CausalLMOutput(logits=None, loss=linear_cross_entropy(x, self.lm_head.weight, targets),
                                  hidden_states=hidden)
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

    def num_active_params(self) -> int:
        """Parameters a token uses: all of them, less the (E - k) experts an MoE layer skips."""
        skipped = sum((m.n_experts - m.top_k) * (m.experts.gate_up_proj[0].numel() + m.experts.down_proj[0].numel())
                      for m in (b.mlp for b in self.model.layers) if isinstance(m, MoE))
        return self.num_params() - skipped

    def moe_losses(self) -> dict[str, torch.Tensor] | None:
        """Mean over MoE layers of the last forward's load-balancing loss and router z-loss
        (None for a dense model); the trainer adds them, weighted, to the next-token loss."""
        layers = [b.mlp for b in self.model.layers if isinstance(b.mlp, MoE)]
        if not layers:
            return None
        return {"load_balance": torch.stack([m.load_balance_loss for m in layers]).mean(),
                "z_loss": torch.stack([m.z_loss for m in layers]).mean()}

    def new_cache(self, batch: int, capacity: int | None = None) -> KVCache:
        """An empty KV cache for ``batch`` sequences of up to ``capacity`` (default max_seq_len) tokens."""
        cfg, weight = self.config, self.lm_head.weight
        return KVCache(cfg.n_layers, batch, cfg.n_kv_heads, cfg.head_dim, capacity or cfg.max_seq_len,
                       weight.dtype, weight.device)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
                 seed: int | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Prompt plus continuation, (B, T + n). ``temperature`` 0 is greedy decoding; otherwise
        sample from softmax(logits / temperature) restricted to the ``top_k`` most likely tokens
        and to the smallest set whose probability reaches ``top_p``. A sequence that emits
        ``eos_token_id`` is padded with it; all of them doing so stops early. Prompts of
        different lengths are left-padded, with ``attention_mask`` (B, T) 0 on the padding."""
        new = list(self.stream(input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, seed,
                               attention_mask))
        return torch.cat([input_ids, torch.stack(new, 1)], 1) if new else input_ids

    @torch.inference_mode()
    def stream(self, input_ids: torch.Tensor, max_new_tokens: int = 64, temperature: float = 0.0,
               top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
               seed: int | None = None, attention_mask: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
        """``generate`` one step at a time: yields the next token of every sequence, (B,).
        The prompt is run once; each new token attends to the cached keys and values."""
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError("input_ids: expected a (batch, length) tensor with at least one token")
        batch, length = input_ids.shape
        if length + max_new_tokens > self.config.max_seq_len:
            raise ValueError(f"prompt ({length} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"max_seq_len ({self.config.max_seq_len})")
        generator = None
        if temperature > 0:
            generator = torch.Generator(input_ids.device).manual_seed(0 if seed is None else seed)
        cache = self.new_cache(batch, length + max_new_tokens)
        finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        tokens = input_ids
        keys = positions = None
        if attention_mask is not None:  # left padding: real tokens count positions from 0
            if attention_mask.shape != input_ids.shape:
                raise ValueError("attention_mask: expected the shape of input_ids")
            keys = torch.ones(batch, length + max_new_tokens, dtype=torch.bool, device=input_ids.device)
            keys[:, :length] = attention_mask.bool()
            positions = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
        for _ in range(max_new_tokens):
            if keys is None:
                hidden, _ = self.model(tokens, cache=cache)
            else:
                seen = cache.get_seq_length() + tokens.shape[1]
                hidden, _ = self.model(tokens, cache=cache, position_ids=positions, attention_mask=keys[:, :seen])
                positions = positions[:, -1:] + 1
            logits = self.lm_head(hidden[:, -1]).float()
            tokens = sample_next(logits, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                tokens = tokens.masked_fill(finished, eos_token_id)
                finished |= tokens == eos_token_id
            yield tokens
            if eos_token_id is not None and bool(finished.all()):
                return
            tokens = tokens[:, None]

    @torch.no_grad()
    def refresh_bhyt_constants(self) -> None:
        """Recompute every shared-statistic (BHyT) block's c_attn from the current weights (no-op otherwise)."""
        for block in self.model.layers:
            if block.shared_statistic:
                block.refresh_c_attn(self.config.bhyt_context_len)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row of ``logits`` (B, V): argmax at temperature 0, else a draw from the
    top-k / top-p (nucleus) filtered softmax(logits / temperature)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def meta_model(cfg: ModelConfig) -> NormLM:
    """The model's structure on the meta device: shapes and parameter counts of any size, no
    memory and no init."""
    with torch.device("meta"):
        return NormLM(cfg)


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
      gain 1 for q_proj, k_proj and an MoE router; embedding and head as normal.

    MoE layers: the router and the stacked gate/up expert weights are input-side, the stacked
    down projections output-side (Xavier per expert).

    Norm gains start at 1, LayerNorm biases at 0, DyT alpha / BHyT lambda at their configured
    values, the embedding scalar at sqrt(d); BHyT's c_attn is computed from the new weights.
    """
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    sigma, n_layers = cfg.init_std, cfg.n_layers

    def normal(weight: torch.Tensor, std: float) -> None:
        weight.copy_(_trunc_normal(weight.shape, std, gen))

    def xavier(weight: torch.Tensor, gain: float) -> None:
        fan_out, fan_in = weight.shape[-2:]  # per expert for stacked expert weights
        normal(weight, gain * math.sqrt(2.0 / (fan_in + fan_out)))

    normal(model.model.embed_tokens.weight, sigma)
    for layer, block in enumerate(model.model.layers):
        attn = block.self_attn
        router, ffn_in, ffn_out = _ffn_weights(block.mlp)
        if cfg.init == "deepnorm":
            beta = cfg.deepnorm_beta
            for weight in (attn.q_proj.weight, attn.k_proj.weight, *router):
                xavier(weight, 1.0)
            for weight in (attn.v_proj.weight, attn.o_proj.weight, *ffn_in, *ffn_out):
                xavier(weight, beta)
            continue
        out_std = {
            "normal": sigma,
            "megatron": sigma / math.sqrt(2 * n_layers),
            "depth_scaled": sigma / math.sqrt(2 * (layer + 1)),
        }[cfg.init]
        for weight in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, *router, *ffn_in):
            normal(weight, sigma)
        for weight in (attn.o_proj.weight, *ffn_out):
            normal(weight, out_std)
    if not cfg.tie_embeddings:
        normal(model.lm_head.weight, sigma)
    for module in model.modules():
        if is_norm(module):
            module.reset_parameters()
    if model.model.embed_scale is not None:
        model.model.embed_scale.fill_(math.sqrt(cfg.d_model))
    model.refresh_bhyt_constants()


def _ffn_weights(mlp: nn.Module) -> tuple[tuple[torch.Tensor, ...], ...]:
    """(router, input-side, output-side) weights of a dense SwiGLU or an MoE FFN, in draw order."""
    if isinstance(mlp, MoE):
        return (mlp.gate.weight,), (mlp.experts.gate_up_proj,), (mlp.experts.down_proj,)
    return (), (mlp.gate_proj.weight, mlp.up_proj.weight), (mlp.down_proj.weight,)


def _trunc_normal(shape: torch.Size, std: float, gen: torch.Generator) -> torch.Tensor:
    """N(0, std) truncated at +-3 std, drawn from ``gen`` (a pure function of its state)."""
    out = torch.empty(shape)
    nn.init.trunc_normal_(out, std=1.0, a=-3.0, b=3.0, generator=gen)
    return out * std
