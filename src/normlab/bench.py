"""``normlab bench``: speed ratios measured side by side in one run.

Absolute times on shared machines are noisy, so every benchmark times its candidates in
interleaved rounds with ``torch.utils.benchmark.Timer``, the order reversed every other round
(A, B, C, C, B, A, ...: whichever runs first in a pair tends to measure slower), and reports the
median time of each candidate divided by the reference's median, with the interquartile range of
the per-round ratios as its spread.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from normlab.config import ModelConfig
from normlab.nn.model import build_model
from normlab.nn.registry import NORMS, make_norm, shares_statistic
from normlab.strategies import STRATEGIES


class Timings(dict):
    """Median seconds per call of each candidate (the mapping), with the per-round samples."""

    def __init__(self, samples: dict[str, list[float]]) -> None:
        super().__init__({name: statistics.median(times) for name, times in samples.items()})
        self.samples = samples

    def ratio(self, name: str, reference: str) -> dict[str, Any]:
        """median(name) / median(reference), and the interquartile range of the ratios of the
        two within each round."""
        per_round = sorted(a / b for a, b in zip(self.samples[name], self.samples[reference], strict=True))
        quartiles = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else per_round * 3
        return {"ratio": self[name] / self[reference], "iqr": [quartiles[0], quartiles[-1]]}


def interleaved(candidates: dict[str, Callable[[], Any]], rounds: int, number: int) -> Timings:
    """Seconds per call of each candidate, timed in rounds whose order alternates between
    forward and reversed (``Timer.timeit`` warms up before each measurement)."""
    timers = {name: Timer(stmt="fn()", globals={"fn": fn}) for name, fn in candidates.items()}
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for index in range(rounds):
        order = list(timers) if index % 2 == 0 else list(reversed(timers))
        for name in order:
            samples[name].append(timers[name].timeit(number).mean)
    return Timings(samples)


def _ratio_text(entry: dict[str, Any]) -> str:
    """'0.992 (IQR 0.97-1.01)'."""
    low, high = entry["iqr"]
    return f"{entry['ratio']:.3f} (IQR {low:.3f}-{high:.3f})"


def _train_step(model, ids: torch.Tensor, logits_of: Callable) -> Callable[[], None]:
    def step() -> None:
        logits = logits_of(model, ids)
        F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten()).backward()
        model.zero_grad(set_to_none=True)
    return step


def _llama_twin(cfg: ModelConfig, device: torch.device):
    """(normlab Pre-Norm model, transformers.LlamaForCausalLM with the same weights), or None
    when transformers is not installed."""
    try:
        import transformers
    except ImportError:
        return None
    ours = build_model(cfg).to(device)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings, attn_implementation="sdpa")
    hf = transformers.LlamaForCausalLM(hf_cfg).to(device)
    hf.load_state_dict(ours.state_dict())
    return ours, hf


def bench_vs_hf(cfg: ModelConfig, ids: torch.Tensor, rounds: int) -> dict[str, Any] | None:
    """normlab Pre-Norm vs transformers.LlamaForCausalLM with the same weights: train step and
    forward. None when transformers is not installed."""
    twin = _llama_twin(cfg, ids.device)
    if twin is None:
        return None
    ours, hf = twin

    def ours_logits(m, x):
        return m(x)

    def hf_logits(m, x):
        return m(input_ids=x, use_cache=False).logits

    train = interleaved({"normlab": _train_step(ours, ids, ours_logits),
                         "transformers": _train_step(hf, ids, hf_logits)}, rounds, 1)
    with torch.no_grad():
        forward = interleaved({"normlab": lambda: ours(ids), "transformers": lambda: hf_logits(hf, ids)}, rounds, 1)
    return {"train_step": train, "forward": forward, "train_ratio": train.ratio("normlab", "transformers"),
            "forward_ratio": forward.ratio("normlab", "transformers")}


def bench_generation(cfg: ModelConfig, rounds: int, device: torch.device, new_tokens: int = 128,
                     prompt_len: int = 16) -> dict[str, Any] | None:
    """Greedy KV-cache generation at batch 1: ``NormLM.generate`` vs ``LlamaForCausalLM.generate``
    with the same weights, ``new_tokens`` tokens each (no early stop). None without transformers."""
    twin = _llama_twin(cfg, device)
    if twin is None:
        return None
    ours, hf = twin
    ours.eval()
    hf.eval()
    prompt_len = min(prompt_len, cfg.max_seq_len // 2)
    new_tokens = min(new_tokens, cfg.max_seq_len - prompt_len)
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), device=device,
                           generator=torch.Generator(device).manual_seed(0))
    # no eos token: both generate exactly new_tokens tokens
    same = torch.equal(ours.generate(prompt, new_tokens), hf.generate(prompt, max_new_tokens=new_tokens, do_sample=False))
    times = interleaved({
        "normlab": lambda: ours.generate(prompt, new_tokens),
        "transformers": lambda: hf.generate(prompt, max_new_tokens=new_tokens, do_sample=False),
    }, rounds, 1)
    return {"seconds": times, "new_tokens": new_tokens, "same_tokens": same,
            **times.ratio("normlab", "transformers")}


def bench_scoring(cfg: ModelConfig, rounds: int, device: torch.device, items: int = 200,
                  batch_size: int = 32) -> dict[str, Any] | None:
    """Multiple-choice scoring of the same items: ``normlab.eval.evaluate`` vs lm-eval's ``hf``
    backend (``HFLM.loglikelihood``, tokenization included on both sides) on the same model
    exported to a Hugging Face directory, one batch size for both. The items are ARC-Easy from
    ``$NORMLAB_DATA`` when it is there, else made-up questions; the tokenizer a byte-level BPE of
    ``cfg.vocab_size`` ids trained on them. None without transformers or lm-eval."""
    try:
        import transformers  # noqa: F401
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        return None
    import os
    import tempfile

    from normlab.data import train_bpe
    from normlab.eval import evaluate, load_task
    from normlab.hf import export

    source = Path(os.environ.get("NORMLAB_DATA", "")) / "arc_easy" / "arc_easy.jsonl"
    if source.is_file():
        lines = source.read_text().splitlines()[:items]
    else:
        lines = [json.dumps({"query": f"Question: what is {i} plus {i}?", "gold": 0,
                             "choices": [str(2 * i), str(2 * i + 1), "a number", "none of these"]})
                 for i in range(items)]
    records = [json.loads(line) for line in lines]
    tokenizer = train_bpe([r["query"] + " " + " ".join(r["choices"]) for r in records], max(cfg.vocab_size, 300))
    model = build_model(ModelConfig.from_strategy("pre_norm", **{**_sizes(cfg), "vocab_size": tokenizer.vocab_size}))
    model = model.to(device).eval()
    with tempfile.TemporaryDirectory() as tmp:
        task_file = Path(tmp) / "mc.jsonl"
        task_file.write_text("\n".join(lines) + "\n")
        export(model, Path(tmp) / "hf", tokenizer, format="auto")
        lm = HFLM(pretrained=str(Path(tmp) / "hf"), batch_size=batch_size, device=str(device), dtype="float32")
        task = load_task(task_file)
        requests = [Instance("loglikelihood", {}, pair, i) for i in range(len(lines)) for pair in task.pairs(i)]
        times = interleaved({
            "normlab": lambda: evaluate(model, tokenizer, [str(task_file)], batch_size=batch_size, progress=False),
            "lm-eval": lambda: lm.loglikelihood(requests, disable_tqdm=True),
        }, rounds, 1)
    return {"seconds": times, "items": len(lines), "choices": len(requests), "batch_size": batch_size,
            "tokenizer": tokenizer.name, "data": "arc_easy" if source.is_file() else "synthetic",
            **times.ratio("normlab", "lm-eval")}


def bench_moe(cfg: ModelConfig, ids: torch.Tensor, rounds: int, experts: int = 8, top_k: int = 2) -> dict[str, Any]:
    """Train step of an MoE model (``experts`` experts, top-``top_k``, each ffn_hidden / top_k
    wide) against the dense model with the same active parameters (one FFN of ffn_hidden)."""
    hidden = cfg.ffn_hidden // top_k
    dense = build_model(cfg).to(ids.device)
    moe = build_model(cfg.replace(moe_experts=experts, moe_top_k=top_k, moe_ffn_hidden=hidden)).to(ids.device)

    def moe_step() -> None:
        logits = moe(ids)
        losses = moe.moe_losses()
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())
        (loss + 0.01 * losses["load_balance"] + 0.001 * losses["z_loss"]).backward()
        moe.zero_grad(set_to_none=True)

    times = interleaved({"dense": _train_step(dense, ids, lambda m, x: m(x)), "moe": moe_step}, rounds, 1)
    return {"seconds": times, "experts": experts, "top_k": top_k, "expert_hidden": hidden,
            "active_params": {"dense": dense.num_active_params(), "moe": moe.num_active_params()},
            **times.ratio("moe", "dense")}


def bench_strategies(cfg: ModelConfig, ids: torch.Tensor, rounds: int, names: list[str]) -> Timings:
    """Train-step time of each strategy (same sizes) in seconds."""
    steps = {}
    for name in names:
        model = build_model(ModelConfig.from_strategy(name, **_sizes(cfg))).to(ids.device)
        steps[name] = _train_step(model, ids, lambda m, x: m(x))
    return interleaved(steps, rounds, 1)


def bench_norms(cfg: ModelConfig, tokens: int, rounds: int, device: torch.device) -> Timings:
    """Forward + backward of one norm of each registered type on (tokens, d_model) in seconds
    (a shared-statistic type is timed as its per-site twin, 'none' is left out)."""
    x = torch.randn(tokens, cfg.d_model, device=device, requires_grad=True)
    grad = torch.randn_like(x)
    calls = {}
    for kind in [k for k in NORMS if k != "none" and not shares_statistic(k)]:
        norm = make_norm(kind, cfg.d_model, cfg, "attn").to(device)

        def call(norm=norm) -> None:
            norm(x).backward(grad)
            x.grad = None
        calls[kind] = call
    return interleaved(calls, rounds, 5)


def _sizes(cfg: ModelConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                                          "ffn_hidden", "max_seq_len")}


def run_bench(d_model: int = 256, n_layers: int = 4, n_heads: int = 4, seq_len: int = 256, batch_size: int = 8,
              vocab_size: int = 4096, rounds: int = 7, device: str = "cpu", strategies: list[str] | None = None,
              out: str | Path | None = None) -> dict[str, Any]:
    """Run every benchmark, print ratio tables, optionally save JSON."""
    dev = torch.device(device)
    torch.manual_seed(0)
    cfg = ModelConfig.from_strategy("pre_norm", vocab_size=vocab_size, d_model=d_model, n_layers=n_layers,
                                    n_heads=n_heads, max_seq_len=seq_len)
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), device=dev)
    names = strategies or list(STRATEGIES)
    result: dict[str, Any] = {
        "setup": {"device": str(dev), "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "d_model": d_model, "n_layers": n_layers, "n_heads": n_heads, "seq_len": seq_len,
                  "batch_size": batch_size, "vocab_size": vocab_size, "rounds": rounds},
    }
    _say(f"normlab bench on {dev} ({torch.get_num_threads()} threads): d_model {d_model}, {n_layers} layers, "
         f"batch {batch_size} x {seq_len} tokens; median of {rounds} interleaved rounds")
    result["vs_transformers"] = bench_vs_hf(cfg, ids, rounds)
    if result["vs_transformers"]:
        r = result["vs_transformers"]
        _say("\nnormlab pre_norm / transformers LlamaForCausalLM (same weights; < 1 = normlab faster)")
        _say(f"  train step (fwd+bwd)  {_ratio_text(r['train_ratio'])}   ({r['train_step']['normlab'] * 1e3:.1f} ms "
             f"vs {r['train_step']['transformers'] * 1e3:.1f} ms)")
        _say(f"  forward               {_ratio_text(r['forward_ratio'])}")
    else:
        _say("\n(transformers not installed: skipping the Hugging Face comparison)")
    generation = result["generation"] = bench_generation(cfg, rounds, dev)
    if generation:
        _say(f"\ngreedy generation, batch 1, {generation['new_tokens']} new tokens, KV cache: "
             f"normlab / transformers = {_ratio_text(generation)} "
             f"({generation['seconds']['normlab'] * 1e3 / generation['new_tokens']:.2f} vs "
             f"{generation['seconds']['transformers'] * 1e3 / generation['new_tokens']:.2f} ms per token; "
             f"same tokens: {generation['same_tokens']})")
    scoring = result["scoring"] = bench_scoring(cfg, max(1, rounds // 2), dev)
    if scoring:
        _say(f"\nmultiple-choice scoring, {scoring['items']} {scoring['data']} items ({scoring['choices']} choices), "
             f"{scoring['tokenizer']}, batch {scoring['batch_size']}: normlab evaluate / lm-eval hf = {_ratio_text(scoring)} "
             f"({scoring['seconds']['normlab']:.2f} s vs {scoring['seconds']['lm-eval']:.2f} s)")
    moe = result["moe"] = bench_moe(cfg, ids, rounds)
    _say(f"\nMoE train step ({moe['experts']} experts, top-{moe['top_k']}, width {moe['expert_hidden']}) / dense "
         f"step with the same active parameters = {_ratio_text(moe)}")
    steps = bench_strategies(cfg, ids, rounds, names)
    base = "pre_norm" if "pre_norm" in steps else next(iter(steps))
    result["strategies"] = {n: {"seconds": t, "ratio_to_pre_norm": steps.ratio(n, base)} for n, t in steps.items()}
    _say(f"\ntrain step relative to {base}")
    for name, entry in result["strategies"].items():
        _say(f"  {name:<16} {_ratio_text(entry['ratio_to_pre_norm'])}")
    norms = bench_norms(cfg, batch_size * seq_len, rounds, dev)
    result["norms"] = {n: {"seconds": t, "ratio_to_rmsnorm": norms.ratio(n, "rmsnorm")} for n, t in norms.items()}
    _say("\nnorm forward+backward relative to rmsnorm (eager, no fused kernels)")
    for name, entry in result["norms"].items():
        _say(f"  {name:<16} {_ratio_text(entry['ratio_to_rmsnorm'])}")
    if out is not None:
        Path(out).write_text(json.dumps(result, indent=1) + "\n")
        _say(f"\nsaved {out}")
    return result


def _say(text: str) -> None:
    print(text, file=sys.stdout, flush=True)
