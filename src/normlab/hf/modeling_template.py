"""The Hugging Face side of an exported custom model: ``NormlabConfig`` and ``NormlabForCausalLM``.

normlab never imports this module. ``normlab.hf.export`` appends its source to the source of
normlab's own model modules (plan, norms, attention, mlp, block, backbone) and drops the
``normlab`` imports below, which gives ``modeling_normlab.py``: the exported maths is normlab's
code, and the file needs only torch, transformers and the standard library.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from normlab.nn.attention import rope_tables
from normlab.nn.backbone import Backbone
from normlab.nn.block import Block
from normlab.nn.plan import LayerPlan
from normlab.nn.registry import is_norm

#: what this transformers calls the KV cache, as a forward argument and an output field: 'cache'
#: (newer 5.x releases, whose generate passes ``cache=``) or 'past_key_values'
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def register_placement(*args, **kwargs) -> None:
    """Stands in for normlab's: an exported model reads its layer plans from config.json, so a
    plugin's placements and strategies register nothing here (its norm types do)."""


register_strategy = register_placement


class NormlabConfig(PretrainedConfig):
    """Every normlab ``ModelConfig`` field (``d_model``, ``norm``, ``placement``, ...), ``head_dim``
    and ``layer_plans`` (one ``LayerPlan`` dict per layer), read as attributes by the bundled
    modules, next to the Hugging Face standard names (``hidden_size``, ...)."""

    model_type = "normlab"
    keys_to_ignore_at_inference = [CACHE_NAME]


class NormlabForCausalLM(PreTrainedModel, GenerationMixin):
    """normlab's ``Backbone`` (``model.``) and ``lm_head``: the state dict of a normlab ``NormLM``."""

    config_class = NormlabConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: NormlabConfig) -> None:
        super().__init__(config)
        self.model = Backbone(config, [LayerPlan(**plan) for plan in config.layer_plans])
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Values for what a checkpoint does not hold (transformers skips loaded tensors): linear
        and embedding weights ~ N(0, init_std), norms at their initial values, the embedding scale
        at sqrt(d), the RoPE tables (never stored), BHyT's c_attn from the attention weights."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
        elif is_norm(module):
            module.reset_parameters()
        elif isinstance(module, Backbone):
            cos, sin = rope_tables(self.config.head_dim, self.config.max_seq_len, self.config.rope_theta)
            module.rope_cos.copy_(cos)
            module.rope_sin.copy_(sin)
            if module.embed_scale is not None:
                nn.init.constant_(module.embed_scale, math.sqrt(self.config.d_model))
        elif isinstance(module, Block) and module.shared_statistic:
            if not getattr(module.c_attn, "_is_hf_initialized", False):
                module.refresh_c_attn(self.config.bhyt_context_len)

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache=None, past_key_values=None,
                use_cache: bool | None = None, labels: torch.LongTensor | None = None,
                logits_to_keep: int | torch.Tensor = 0, output_hidden_states: bool | None = None,
                **kwargs) -> CausalLMOutputWithPast:
        """Logits of the last ``logits_to_keep`` positions (0: all). ``cache`` (older transformers:
        ``past_key_values``) is any transformers ``Cache``; with ``use_cache`` (default true) and
        none given, a new ``DynamicCache``. ``labels`` as in transformers (shifted inside, -100
        ignored)."""
        if cache is None:
            cache = past_key_values
        if use_cache is None:
            use_cache = getattr(self.config, "use_cache", True)
        if use_cache and cache is None:
            cache = DynamicCache()
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        hidden, hidden_states = self.model(input_ids, bool(output_hidden_states), position_ids=position_ids,
                                           attention_mask=attention_mask, cache=cache)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size,
                                      **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=hidden_states,
                                      **{CACHE_NAME: cache if use_cache else None})
