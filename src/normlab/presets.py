"""The papers' model sizes by name. A preset fixes the architecture's sizes (and the paper's
training recipe in ``configs/<name>.yaml``); the normalization strategy stays a separate choice:
``ModelConfig.from_preset("hybridnorm-550m", strategy="pre_norm")`` is that paper's baseline.

Numbers are from the papers and their code: HybridNorm App. C Table 10 (OLMo-2 / OLMoE configs),
Mix-LN App. A.1 Table 7 (its LLaMA configs) and BHyT's Llama-3.2 configs (`normlab presets` prints them
beside the papers' parameter counts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Preset:
    name: str
    source: str
    model: dict[str, Any]
    paper_params: float | None  # total parameters the paper states (None: it gives only a name)
    paper_tokens: float  # training tokens in the paper
    paper_active_params: float | None = None  # MoE: parameters a token uses
    strategy: str = "pre_norm"  # the paper's proposed strategy (its configs/<name>.yaml uses it)
    note: str = ""


_HYBRID_DENSE = {"n_layers": 16, "vocab_size": 100278, "tie_embeddings": True, "max_seq_len": 4096,
                 "rope_theta": 500000.0}
_MIXLN = {"n_layers": 12, "vocab_size": 32000, "max_seq_len": 256}
_LLAMA32 = {"vocab_size": 128256, "tie_embeddings": True, "rope_theta": 500000.0, "max_seq_len": 1024}

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("hybridnorm-550m", "HybridNorm §5.1 (550M dense, all ablations)",
           {**_HYBRID_DENSE, "d_model": 1536, "ffn_hidden": 4096, "n_heads": 16, "n_kv_heads": 4},
           550e6, 400e9, strategy="hybridnorm_star"),
    Preset("hybridnorm-1.2b", "HybridNorm §5.1 (1.2B dense, OLMo-2 / Llama-3.2-like)",
           {**_HYBRID_DENSE, "d_model": 2048, "ffn_hidden": 8192, "n_heads": 32, "n_kv_heads": 8},
           1.2e9, 1e12, strategy="hybridnorm_star",
           note="the paper's FFN '9192' is a typo for 8192"),
    Preset("hybridnorm-moe-1b-7b", "HybridNorm §5.1 (OLMoE-1B-7B)",
           {"d_model": 2048, "n_layers": 16, "n_heads": 16, "n_kv_heads": 16, "vocab_size": 50280,
            "tie_embeddings": False, "max_seq_len": 4096, "rope_theta": 10000.0, "moe_experts": 64,
            "moe_top_k": 8, "moe_ffn_hidden": 1024},
           6.9e9, 500e9, paper_active_params=1.3e9, strategy="hybridnorm_star"),
    Preset("mixln-llama-71m", "Mix-LN Table 7 (LLaMA-71M)",
           {**_MIXLN, "d_model": 512, "ffn_hidden": 1368, "n_heads": 8}, 71e6, 1.1e9, strategy="mixln"),
    Preset("mixln-llama-130m", "Mix-LN Table 7 (LLaMA-130M)",
           {**_MIXLN, "d_model": 768, "ffn_hidden": 2048, "n_heads": 12}, 130e6, 2.2e9, strategy="mixln"),
    Preset("mixln-llama-250m", "Mix-LN Table 7 (LLaMA-250M, the repo's config)",
           {**_MIXLN, "n_layers": 24, "d_model": 768, "ffn_hidden": 2560, "n_heads": 16}, 250e6, 3.9e9,
           strategy="mixln", note="the paper's table says hidden 1024; the repo's config (768) is the "
           "one that has 250M parameters"),
    Preset("mixln-llama-1b", "Mix-LN Table 7 (LLaMA-1B)",
           {**_MIXLN, "n_layers": 24, "d_model": 2048, "ffn_hidden": 5461, "n_heads": 32}, None, 5.0e9,
           strategy="mixln", note="the paper names it 1B; its configuration has 1.34B parameters "
           "(1.21B without embeddings)"),
    Preset("bhyt-llama-374m", "BHyT §3.6 (Llama-374M)",
           {**_LLAMA32, "d_model": 1024, "n_layers": 16, "n_heads": 16, "n_kv_heads": 4, "ffn_hidden": 4096},
           374e6, 7.5e9, strategy="bhyt"),
    Preset("bhyt-llama-1b", "BHyT §3.6 (Llama-3.2-1B)",
           {**_LLAMA32, "d_model": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "ffn_hidden": 8192},
           1.24e9, 20e9, strategy="bhyt", note="Llama 3.2's RoPE frequency scaling is not modelled"),
)}


def preset_fields(name: str) -> dict[str, Any]:
    """The ModelConfig fields a preset sets (sizes, vocabulary, context, RoPE base, MoE)."""
    from normlab.errors import check_choice

    check_choice("preset", name, tuple(PRESETS))
    return dict(PRESETS[name].model)
