"""``normlab bench``: speed ratios measured side by side in one run.

Absolute times on shared machines are noisy, so every benchmark calls each candidate once to
warm up and then times them in interleaved rounds, the order reversed every other round
(A, B, C, C, B, A, ...: whichever runs first tends to measure slower). A figure is the median
over rounds of the candidate's time divided by the reference's in the same round (a drift of
the machine's speed between rounds cancels), with the interquartile range of those per-round
ratios as its spread. ``--out DIR`` writes every figure, with the machine it was measured on,
to DIR/bench.json and DIR/bench.md.

Sections (``SECTIONS``, run in this order):

- transformers: normlab pre_norm against ``LlamaForCausalLM`` with the same weights on the two
  configs of ``TARGET_SIZES``: train step (``TrainStep``) and forward, and each side's share of
  a train step spent outside matrix multiplications and attention (``step_shares``);
- generation: greedy KV-cache decoding against ``LlamaForCausalLM.generate``;
- scoring: multiple-choice scoring against lm-eval's ``hf`` backend;
- moe: an MoE train step against the dense one with the same active parameters;
- strategies: each strategy's train step / pre_norm, and bhyt / bhyt_star;
- memory: peak memory of one train step per strategy (``step_memory``);
- norms: each norm type's forward+backward as a fraction of copy bandwidth (``copy_fraction``;
  on CUDA ``copy_`` runs near HBM bandwidth, so about the fraction of it), once per way of
  running it (``NORM_PATHS``: reference, fast, compiled; on CUDA also triton and liger, the
  kernels the fast path chooses between, each alone: ``default_norm_paths``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from normlab.config import ModelConfig, TrainConfig
from normlab.device import pick_device
from normlab.errors import ConfigError, check_output_dir
from normlab.nn import reference_norms
from normlab.nn.fused import cuda_kernels
from normlab.nn.model import build_model
from normlab.nn.norms import BHyT, DyT, RMSNorm
from normlab.nn.registry import NORMS, make_norm, shares_statistic
from normlab.strategies import STRATEGIES
from normlab.train.optim import build_optimizer

CPU = torch.device("cpu")
SECTIONS = ("transformers", "generation", "scoring", "moe", "strategies", "memory", "norms")


@dataclass(frozen=True)
class Sizes:
    """A model and batch to benchmark; ``ffn_hidden`` None takes ModelConfig's default."""

    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    seq_len: int = 256
    batch: int = 8
    vocab: int = 4096
    ffn_hidden: int | None = None

    def model_config(self, strategy: str = "pre_norm", **overrides: Any) -> ModelConfig:
        fields_ = {"vocab_size": self.vocab, "d_model": self.d_model, "n_layers": self.n_layers,
                   "n_heads": self.n_heads, "max_seq_len": self.seq_len}
        if self.ffn_hidden is not None:
            fields_["ffn_hidden"] = self.ffn_hidden
        return ModelConfig.from_strategy(strategy, **{**fields_, **overrides})

    def ids(self, device: torch.device) -> torch.Tensor:
        """A fixed batch of token ids, (batch, seq_len)."""
        generator = torch.Generator().manual_seed(0)
        return torch.randint(0, self.vocab, (self.batch, self.seq_len), generator=generator).to(device)


#: the two configs of issue 10's speed targets: A a typical small model, B the thin and deep
#: kind that depth experiments on a CPU use
TARGET_SIZES = {
    "A": Sizes(d_model=256, n_layers=8, n_heads=4, seq_len=256, batch=16, vocab=2048, ffn_hidden=688),
    "B": Sizes(d_model=64, n_layers=16, n_heads=4, seq_len=256, batch=16, vocab=257, ffn_hidden=176),
}

#: (tokens, width) of the norm section's inputs, fp32
NORM_SHAPES = ((4096, 512), (4096, 2048))

#: tensor passes of a norm's forward+backward (read x twice, write y, read dy, write dx) per
#: pass of a copy (read src, write dst = 2 passes): 5 / 2
COPY_PASSES = 2.5

def _reference(module: nn.Module) -> Callable:
    """``module`` run on its eager formulas (``normlab.nn.reference_norms``)."""
    def call(*args: torch.Tensor) -> torch.Tensor:
        with reference_norms():
            return module(*args)
    return call


def _kernel_op(norm: nn.Module) -> str | None:
    """The fast-path op (``normlab.nn.fused.FastPath.kernel``) that calling ``norm`` runs."""
    ops = ((RMSNorm, "rms_norm"), (DyT, "dyt"), (BHyT, "bhyt"))
    return next((op for cls, op in ops if isinstance(norm, cls)), None)


def _on_cuda_kernels(backend: str) -> Callable[[nn.Module], Callable | None]:
    """The path running a CUDA module on ``backend``'s kernels alone ('triton': normlab's,
    'liger': liger-kernel's), or None off CUDA, without triton, and where the backend has no
    kernel for the module's norm type."""
    def path(module: nn.Module) -> Callable | None:
        if next(module.parameters()).device.type != "cuda":
            return None
        try:
            from normlab.nn import triton_norms
        except ImportError:
            return None
        ops = {"triton": triton_norms.TRITON_OPS, "liger": triton_norms.LIGER_OPS}[backend]
        if _kernel_op(getattr(module, "norm", module)) not in ops:  # getattr: _StatisticGiven
            return None

        def call(*args: torch.Tensor) -> torch.Tensor:
            with cuda_kernels(ops):
                return module(*args)
        return call
    return path


#: how the norm section runs a norm module: name -> function of the module returning what is
#: called, or None where the path does not apply. "fast" is what normlab runs by default (the
#: fused CPU kernels of normlab.nn.fused; on CUDA the kernels ``triton_norms.OPS`` picks) where
#: they take the call; "reference" the eager formulas; "compiled" torch.compile of them;
#: "triton" and "liger" (CUDA) one kernel library alone, the candidates of "fast".
NORM_PATHS: dict[str, Callable[[nn.Module], Callable | None]] = {
    "reference": _reference,
    "fast": lambda module: module,
    "compiled": functools.partial(torch.compile, dynamic=False),
    "triton": _on_cuda_kernels("triton"),
    "liger": _on_cuda_kernels("liger"),
}


def default_norm_paths(device: torch.device) -> tuple[str, ...]:
    """The norm section's paths on ``device``: on CUDA also the fast path's candidates alone."""
    return ("reference", "fast", "compiled") + (("triton", "liger") if device.type == "cuda" else ())


RATIO, FRACTION, SHARE, MEGABYTES = "ratio", "fraction of copy", "share", "MB"


@dataclass
class Figure:
    """One number of the bench: ``value`` in ``unit``, its interquartile range over the rounds
    (None for a single measurement), the candidates' median seconds, the sizes it was measured
    at, the parts a share or a memory figure is made of, and the candidates' seconds per round."""

    section: str
    name: str
    value: float
    unit: str
    iqr: list[float] | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    parts: dict[str, float] = field(default_factory=dict)
    rounds: dict[str, list[float]] = field(default_factory=dict)

    def value_text(self) -> str:
        return _number(self.value, self.unit)

    def iqr_text(self) -> str:
        return "" if self.iqr is None else "-".join(_number(v, self.unit) for v in self.iqr)

    def seconds_text(self) -> str:
        return ", ".join(f"{name} {_duration(s)}" for name, s in self.seconds.items())


def _number(value: float, unit: str) -> str:
    return {RATIO: f"{value:.3f}", FRACTION: f"{value:.2f}", SHARE: f"{value:.0%}",
            MEGABYTES: f"{value:.1f} MB"}[unit]


def _duration(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


class Timings(dict):
    """Median seconds per call of each candidate (the mapping), with the per-round samples."""

    def __init__(self, samples: dict[str, list[float]]) -> None:
        super().__init__({name: statistics.median(times) for name, times in samples.items()})
        self.samples = samples

    def per_round(self, name: str, reference: str) -> list[float]:
        """time(name) / time(reference) within each round (the two measured close together)."""
        return [a / b for a, b in zip(self.samples[name], self.samples[reference], strict=True)]

    def ratio(self, name: str, reference: str) -> dict[str, Any]:
        """The median and interquartile range of the per-round ratios name / reference."""
        return _median_and_iqr(self.per_round(name, reference), "ratio")

    def figure(self, section: str, name: str, candidate: str, reference: str, config: dict[str, Any],
               note: str = "") -> Figure:
        """The figure candidate / reference (``ratio``), with both candidates' median seconds and
        per-round seconds."""
        ratio = self.ratio(candidate, reference)
        return Figure(section, name, ratio["ratio"], RATIO, ratio["iqr"],
                      {candidate: self[candidate], reference: self[reference]}, config, note,
                      rounds={candidate: self.samples[candidate], reference: self.samples[reference]})


def _median_and_iqr(values: list[float], key: str) -> dict[str, Any]:
    """{key: median, 'iqr': [first quartile, third quartile]}; inclusive quartiles, which stay
    within the observed values (the exclusive method extrapolates, below 0 with two rounds)."""
    values = sorted(values)
    quartiles = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {key: statistics.median(values), "iqr": [quartiles[0], quartiles[-1]]}


def interleaved(candidates: dict[str, Callable[[], Any]], rounds: int, number: int,
                device: torch.device = CPU) -> Timings:
    """Seconds per call of each candidate: one untimed warm-up call each, then ``rounds`` rounds
    of ``number`` calls per candidate, the order reversed every other round."""

    def seconds_per_call(fn: Callable[[], Any], calls: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / calls

    for fn in candidates.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for index in range(rounds):
        order = list(candidates) if index % 2 == 0 else list(reversed(candidates))
        for name in order:
            samples[name].append(seconds_per_call(candidates[name], number))
    return Timings(samples)


class TrainStep:
    """One optimizer step as ``normlab train`` takes it with its default settings
    (``TrainConfig()``: fp32, no compile): forward, cross-entropy in fp32 (+ ``extra_loss()``),
    backward, gradient clipping at ``grad_clip``, AdamW from ``build_optimizer``, gradients set
    to None. A normlab model's loss comes from ``model(ids, targets=ids)`` (head and loss in one
    step, as in training); another model's from the cross-entropy of ``logits_of(ids)``."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, logits_of: Callable | None = None,
                 extra_loss: Callable[[], torch.Tensor] | None = None) -> None:
        self.model, self.ids = model, ids
        self.logits_of = logits_of
        self.extra_loss = extra_loss
        self.train = TrainConfig()
        self.optimizer = build_optimizer(model, self.train)
        self.params = [p for p in model.parameters() if p.requires_grad]

    def __call__(self) -> None:
        if self.logits_of is None:  # a normlab model: its loss from targets, as the trainer takes it
            loss = self.model(self.ids, targets=self.ids).loss
        else:
            loss = F.cross_entropy(self.logits_of(self.ids).flatten(0, 1).float(), self.ids.flatten())
        if self.extra_loss is not None:
            loss = loss + self.extra_loss()
        loss.backward()
        with torch.profiler.record_function(OPTIMIZER_REGION):
            torch.nn.utils.clip_grad_norm_(self.params, self.train.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def resident_bytes(self) -> int:
        """Bytes held between steps: parameters and optimizer state (each storage once)."""
        tensors = list(self.model.parameters()) + [
            value for state in self.optimizer.state.values() for value in state.values()
            if isinstance(value, torch.Tensor)]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())


# ------------------------------------------------------------------ where a step's time goes

#: the profiler label around a TrainStep's gradient clipping and optimizer update
OPTIMIZER_REGION = "normlab.bench: clip + optimizer"
_AUTOGRAD_NODE_PREFIX = "autograd::engine::evaluate_function: "
#: operators (and their autograd nodes) that are matrix multiplications
MATMUL_OPS = frozenset({
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::matmul", "aten::linear",
    "aten::mv", "aten::dot", "aten::_addmm_activation",
    "MmBackward0", "AddmmBackward0", "BmmBackward0", "BaddbmmBackward0", "MvBackward0", "DotBackward0",
})
#: substrings (lower case, underscores removed) of the attention kernels' names: SDPA and the
#: flash / memory-efficient kernels it dispatches to, forward, backward and autograd node
ATTENTION_MARKS = ("scaleddotproduct", "flashattention", "efficientattention")


def op_class(name: str) -> str:
    """'matmul', 'attention' or 'other' for a profiler event name. An autograd engine event
    ('autograd::engine::evaluate_function: MmBackward0') belongs with its node."""
    name = name.removeprefix(_AUTOGRAD_NODE_PREFIX)
    flat = name.replace("_", "").lower()
    if any(mark in flat for mark in ATTENTION_MARKS):
        return "attention"
    return "matmul" if name in MATMUL_OPS else "other"


def step_shares(events: Iterable[tuple[str, float, bool]]) -> dict[str, float]:
    """Shares of a step's operator time, summing to 1, from (event name, self time, inside the
    optimizer region) triples: 'optimizer' for everything in ``OPTIMIZER_REGION`` (gradient
    clipping and the AdamW update, whatever their operators), else by ``op_class``: 'matmul',
    'attention', 'other' (norms, RoPE, SwiGLU's elementwise part, residual adds,
    softmax/cross-entropy, copies). Outside matmul and attention = other + optimizer.

    Self time is an event's time minus its children's, so every microsecond belongs to exactly
    one event and nothing is counted twice: the time ``aten::linear`` spends in its child
    ``aten::addmm`` is addmm's (matmul), linear's own dispatch is linear's (matmul too), and a
    ``aten::copy_`` or ``aten::view`` that a matmul wrapper calls is 'other' (it is not a
    multiplication)."""
    totals = dict.fromkeys(("matmul", "attention", "other", "optimizer"), 0.0)
    for name, self_time, in_optimizer in events:
        totals["optimizer" if in_optimizer else op_class(name)] += self_time
    whole = sum(totals.values())
    if whole <= 0:
        raise ValueError("step_shares: no operator time in the events")
    return {kind: total / whole for kind, total in totals.items()}


@contextlib.contextmanager
def cpu_profile(**options):
    """``torch.profiler.profile`` of CPU activity, with the process's stderr (file descriptor 2)
    sent to /dev/null inside: kineto prints 'USDT: profiler_start/stop' lines from C++ on every
    profile, which would bury the bench's figures. Python warnings raised inside are kept and
    shown after."""
    from torch.profiler import ProfilerActivity, profile

    if sys.stderr is not None:
        sys.stderr.flush()
    with contextlib.ExitStack() as stack:
        saved = os.dup(2)
        stack.callback(os.close, saved)
        devnull = os.open(os.devnull, os.O_WRONLY)
        stack.callback(os.close, devnull)
        with warnings.catch_warnings(record=True) as caught:
            os.dup2(devnull, 2)
            try:
                with profile(activities=[ProfilerActivity.CPU], **options) as prof:
                    yield prof
            finally:
                os.dup2(saved, 2)
        for warning in caught:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def profile_step(step: Callable[[], Any]) -> tuple[list[tuple[str, float, bool]], float]:
    """(event name, self CPU µs, whether it is inside ``OPTIMIZER_REGION``) of every event in
    one call of ``step`` under torch.profiler, and the call's wall time in µs."""
    with cpu_profile() as prof:
        start = time.perf_counter()
        step()
        wall = (time.perf_counter() - start) * 1e6

    def in_optimizer(event) -> bool:
        while event is not None and event.name != OPTIMIZER_REGION:
            event = event.cpu_parent
        return event is not None

    return [(event.name, event.self_cpu_time_total, in_optimizer(event)) for event in prof.events()], wall


def _share_figure(side: str, label: str, sizes: Sizes, step: Callable[[], Any]) -> Figure:
    events, wall = profile_step(step)
    shares = step_shares(events)
    seen = sum(t for _, t, _ in events) / wall
    return Figure("transformers", f"{side} train step outside matmul and attention, config {label}",
                  shares["other"] + shares["optimizer"], SHARE, config=asdict(sizes),
                  note=f"matmul {shares['matmul']:.0%}, attention {shares['attention']:.0%}, other operators "
                  f"{shares['other']:.0%}, clipping + AdamW {shares['optimizer']:.0%}; operators cover {seen:.0%} "
                  "of the profiled step's wall time",
                  parts={**shares, "operator_coverage": seen})


# ------------------------------------------------------------------ peak memory

def running_peak(deltas: Iterable[int]) -> int:
    """The largest running sum of allocation deltas (bytes, + allocated / - freed, in time
    order), at least 0: the most memory held above the starting point."""
    held = peak = 0
    for delta in deltas:
        held += delta
        peak = max(peak, held)
    return peak


def step_memory(step: TrainStep, device: torch.device) -> dict[str, int]:
    """Bytes of one train step: 'resident' (parameters and optimizer state, held between
    steps) and 'step_peak' (the most allocated above that during the step: activations,
    gradients, temporaries). On CUDA the allocator's peak (``max_memory_allocated``); on the CPU
    the running peak of every allocation and free that torch.profiler records
    (``profile_memory=True``), in time order."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        with cpu_profile(profile_memory=True) as prof:
            step()
        records = sorted((e for e in prof.profiler.kineto_results.events()
                          if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU),
                         key=lambda e: e.start_ns())
        peak = running_peak(e.nbytes() for e in records)
    return {"resident": step.resident_bytes(), "step_peak": peak}


# ------------------------------------------------------------------ sections

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


def bench_transformers(targets: dict[str, Sizes], rounds: int, device: torch.device,
                       compiled: bool = False) -> list[Figure]:
    """normlab pre_norm / LlamaForCausalLM with the same weights, per config: train step
    (``TrainStep`` on both sides) and forward; on the CPU also each side's share of a train step
    outside matmul and attention (one profiled step each). With ``compiled`` also normlab's
    train step with ``train.compile: true`` (``torch.compile`` of the model, as the trainer
    does; a third model with the same weights) against the eager one and against
    transformers, its first call (the compilation) timed apart. Empty without transformers."""
    figures = []
    for label, sizes in targets.items():
        twin = _llama_twin(sizes.model_config(), device)
        if twin is None:
            return []
        ours, hf = twin
        ids = sizes.ids(device)

        def hf_logits(x: torch.Tensor, hf=hf) -> torch.Tensor:
            return hf(input_ids=x, use_cache=False).logits

        steps = {"normlab": TrainStep(ours, ids), "transformers": TrainStep(hf, ids, hf_logits)}
        compile_seconds = None
        if compiled and (first := _first_compiled_step(sizes, ids, device)) is not None:
            steps["normlab compiled"], compile_seconds = first
        train = interleaved(steps, rounds, 1, device)
        with torch.no_grad():
            forward = interleaved({"normlab": functools.partial(ours, ids),
                                   "transformers": functools.partial(hf_logits, ids)}, rounds, 1, device)
        config = asdict(sizes)
        figures += [train.figure("transformers", f"train step normlab / LlamaForCausalLM, config {label}",
                                 "normlab", "transformers", config),
                    forward.figure("transformers", f"forward normlab / LlamaForCausalLM, config {label}",
                                   "normlab", "transformers", config)]
        if compile_seconds is not None:
            note = (f"the first compiled step took {_duration(compile_seconds)} (compiling, or reading torch's "
                    "compile cache of an earlier process), not in the ratio")
            figures += [train.figure("transformers", f"train step normlab compiled / eager, config {label}",
                                     "normlab compiled", "normlab", config, note),
                        train.figure("transformers", f"train step normlab compiled / LlamaForCausalLM, config {label}",
                                     "normlab compiled", "transformers", config, note)]
        if device.type == "cpu":
            figures += [_share_figure(side, label, sizes, steps[side]) for side in ("normlab", "transformers")]
    return figures


def _first_compiled_step(sizes: Sizes, ids: torch.Tensor, device: torch.device) -> tuple[TrainStep, float] | None:
    """A TrainStep on torch.compile of a model with the same weights, called once, and the
    seconds of that first call, which compiles; None, with a line saying why, when compiling
    fails (inductor without a C++ compiler)."""
    step = TrainStep(torch.compile(build_model(sizes.model_config()).to(device)), ids)
    start = time.perf_counter()
    try:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as err:  # e.g. no C++ compiler for inductor: report, go on without it
        _say(f"  (normlab compiled: left out, its first call failed: {type(err).__name__}: "
             f"{str(err).splitlines()[0] if str(err) else ''})")
        return None
    return step, time.perf_counter() - start


def bench_generation(sizes: Sizes, rounds: int, device: torch.device, new_tokens: int = 128,
                     prompt_len: int = 16) -> list[Figure]:
    """Greedy KV-cache generation at batch 1: ``NormLM.generate`` / ``LlamaForCausalLM.generate``
    with the same weights, ``new_tokens`` tokens each (no early stop). Empty without transformers."""
    twin = _llama_twin(sizes.model_config(), device)
    if twin is None:
        return []
    ours, hf = twin
    ours.eval()
    hf.eval()
    prompt_len = min(prompt_len, sizes.seq_len // 2)
    new_tokens = min(new_tokens, sizes.seq_len - prompt_len)
    prompt = torch.randint(0, sizes.vocab, (1, prompt_len), generator=torch.Generator().manual_seed(0)).to(device)
    # no eos token: both generate exactly new_tokens tokens
    same = torch.equal(ours.generate(prompt, new_tokens), hf.generate(prompt, max_new_tokens=new_tokens, do_sample=False))
    times = interleaved({
        "normlab": lambda: ours.generate(prompt, new_tokens),
        "transformers": lambda: hf.generate(prompt, max_new_tokens=new_tokens, do_sample=False),
    }, rounds, 1, device)
    return [times.figure("generation", f"greedy generation normlab / LlamaForCausalLM.generate, batch 1, "
                         f"{new_tokens} tokens", "normlab", "transformers", {**asdict(sizes), "new_tokens": new_tokens},
                         f"same tokens: {same}")]


def bench_scoring(sizes: Sizes, rounds: int, device: torch.device, items: int = 200,
                  batch_size: int = 32) -> list[Figure]:
    """Multiple-choice scoring of the same items: ``normlab.eval.evaluate`` / lm-eval's ``hf``
    backend (``HFLM.loglikelihood``, tokenization included on both sides) on the same model
    exported to a Hugging Face directory, one batch size for both. The items are ARC-Easy from
    ``$NORMLAB_DATA`` when it is there, else made-up questions; the tokenizer a byte-level BPE of
    ``sizes.vocab`` ids trained on them. Empty without transformers or lm-eval."""
    try:
        import transformers  # noqa: F401
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        return []
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
    tokenizer = train_bpe([r["query"] + " " + " ".join(r["choices"]) for r in records], max(sizes.vocab, 300))
    model = build_model(sizes.model_config(vocab_size=tokenizer.vocab_size)).to(device).eval()
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
        }, rounds, 1, device)
    data = "ARC-Easy" if source.is_file() else "synthetic"
    return [times.figure("scoring", f"multiple-choice scoring normlab evaluate / lm-eval hf, {len(lines)} {data} "
                         f"items ({len(requests)} choices)", "normlab", "lm-eval",
                         {**asdict(sizes), "vocab": tokenizer.vocab_size, "batch_size": batch_size},
                         f"tokenizer {tokenizer.name}")]


def bench_moe(sizes: Sizes, rounds: int, device: torch.device, experts: int = 8, top_k: int = 2) -> list[Figure]:
    """Train step of an MoE model (``experts`` experts, top-``top_k``, each ffn_hidden / top_k
    wide, its objective the trainer's: + aux-loss weight x load balance + z-loss weight x z-loss)
    / the dense model's with the same active parameters (one FFN of ffn_hidden)."""
    cfg = sizes.model_config()
    hidden = cfg.ffn_hidden // top_k
    ids = sizes.ids(device)
    dense = build_model(cfg).to(device)
    moe_cfg = cfg.replace(moe_experts=experts, moe_top_k=top_k, moe_ffn_hidden=hidden)
    moe = build_model(moe_cfg).to(device)

    def moe_objective() -> torch.Tensor:
        losses = moe.moe_losses()
        return moe_cfg.moe_aux_loss_weight * losses["load_balance"] + moe_cfg.moe_z_loss_weight * losses["z_loss"]

    times = interleaved({"dense": TrainStep(dense, ids), "moe": TrainStep(moe, ids, extra_loss=moe_objective)},
                        rounds, 1, device)
    return [times.figure("moe", f"MoE train step ({experts} experts, top-{top_k}, width {hidden}) / dense with the "
                         "same active parameters", "moe", "dense", asdict(sizes),
                         f"active parameters {moe.num_active_params()} vs {dense.num_active_params()}")]


def bench_strategies(sizes: Sizes, rounds: int, device: torch.device, names: list[str]) -> list[Figure]:
    """Each strategy's train step (``TrainStep``) / pre_norm's (the first name's when pre_norm is
    not among them), and bhyt / bhyt_star when both are: the cost of BHyT*'s second reduction."""
    ids = sizes.ids(device)
    steps = {name: TrainStep(build_model(sizes.model_config(name)).to(device), ids) for name in names}
    times = interleaved(steps, rounds, 1, device)
    base = "pre_norm" if "pre_norm" in steps else names[0]
    config = asdict(sizes)
    figures = [times.figure("strategies", f"train step {name} / {base}", name, base, config) for name in names]
    if "bhyt" in times and "bhyt_star" in times:
        figures.append(times.figure("strategies", "train step bhyt / bhyt_star (one statistic per block vs two)",
                                    "bhyt", "bhyt_star", config))
    return figures


def bench_memory(sizes: Sizes, device: torch.device, names: list[str]) -> list[Figure]:
    """Peak memory of one train step per strategy (``step_memory``), after one step that
    creates the optimizer state: resident + step peak, in MB (10^6 bytes)."""
    ids = sizes.ids(device)
    figures = []
    for name in names:
        step = TrainStep(build_model(sizes.model_config(name)).to(device), ids)
        step()
        memory = step_memory(step, device)
        figures.append(Figure("memory", f"peak memory of a train step, {name}",
                              (memory["resident"] + memory["step_peak"]) / 1e6, MEGABYTES, config=asdict(sizes),
                              note=f"parameters + optimizer state {memory['resident'] / 1e6:.1f} MB, "
                              f"step peak above them {memory['step_peak'] / 1e6:.1f} MB",
                              parts={kind: nbytes / 1e6 for kind, nbytes in memory.items()}))
    return figures


def copy_fraction(timings: Timings, norm: str, copy: str = "copy") -> dict[str, Any]:
    """A norm's forward+backward as a fraction of copy bandwidth, per round
    COPY_PASSES x copy time / (forward+backward time): 1 = as fast as 5 passes over the tensor
    at the speed of ``dst.copy_(src)``. The median over rounds and the interquartile range."""
    return _median_and_iqr([COPY_PASSES / ratio for ratio in timings.per_round(norm, copy)], "fraction")


class _StatisticGiven(nn.Module):
    """A shared-statistic norm at its block's FFN site: apply(x, s2), s2 computed earlier."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
        return self.norm.apply(x, s2)


#: the norms section's reference kernel pair: the 5 passes of a norm's forward+backward, nothing else
ELEMENTWISE_CEILING = "elementwise ceiling (neg + add)"
CEILING_NOTE = ("torch.neg (read x, write y) and torch.add (read x and dy, write dx): a norm's 5 passes in "
                "ATen's vectorized loops, with no arithmetic and no second read of a row; about what a norm "
                "kernel can reach at this shape on this machine")


def bench_norms(shapes: Iterable[tuple[int, int]], rounds: int, device: torch.device,
                paths: Iterable[str] | None = None, kinds: Iterable[str] | None = None,
                number: int = 5) -> list[Figure]:
    """Forward+backward of one norm of each registered type (all but 'none') on each (tokens,
    width) fp32 shape, run each way of ``paths`` (default ``default_norm_paths(device)``)
    that applies to it, as a fraction of copy bandwidth (``copy_fraction``; on CUDA about the
    fraction of HBM bandwidth), all timed together with ``dst.copy_(src)`` on the same shape. A
    shared-statistic type (bhyt) is timed at both sites: the attention site computes the
    statistic, the FFN site gets it (a 4-pass minimum, so its fraction can exceed 1). The
    ``ELEMENTWISE_CEILING`` pair is timed with them: a fraction of copy bandwidth that a pure
    5-pass elementwise kernel reaches (a copy can stay in cache where 5 passes do not). A path
    that fails on its first call (torch.compile without a C++ compiler) is reported and left
    out; its first call's time (compilation) is in the figure's seconds."""
    kinds = [k for k in (kinds or NORMS) if k != "none"]
    paths = default_norm_paths(device) if paths is None else paths
    note = "the first call builds or loads the kernels (fast) or compiles (compiled); it is not in the timings"
    if device.type == "cuda":
        note = ("the first call compiles the kernels (fast, triton, liger: Triton) or the norm (compiled); it is "
                "not in the timings. On CUDA dst.copy_(src) runs near HBM bandwidth: the fraction is about that "
                "of HBM bandwidth")
    figures = []
    for tokens, width in shapes:
        cfg = ModelConfig.from_strategy("pre_norm", d_model=width)
        x = torch.randn(tokens, width, device=device, requires_grad=True)
        grad = torch.randn_like(x)
        s2 = x.detach().pow(2).mean(-1, keepdim=True).requires_grad_()
        src, dst = torch.randn_like(x), torch.empty_like(x)
        calls: dict[str, Callable[[], None]] = {
            "copy": lambda src=src, dst=dst: dst.copy_(src),
            ELEMENTWISE_CEILING: lambda src=src, grad=grad: (torch.neg(src), torch.add(src, grad))}
        first_call: dict[str, float] = {}
        for kind in kinds:
            sites = {kind: ((x,), None)}
            if shares_statistic(kind):
                sites = {f"{kind} (attention site)": ((x,), None), f"{kind} (FFN site)": ((x, s2), _StatisticGiven)}
            for label, (inputs, wrap) in sites.items():
                for path in paths:
                    norm = make_norm(kind, width, cfg, "attn").to(device)
                    module = wrap(norm) if wrap else norm
                    fn = NORM_PATHS[path](module)
                    if fn is None:  # no such kernel for this type, or not on this device
                        continue
                    call = _norm_call(fn, inputs, grad, list(norm.parameters()))
                    name = f"{label}, {path}"
                    if path != "reference":  # the first call builds/loads the kernels or compiles
                        start = time.perf_counter()
                        try:
                            call()
                        except Exception as err:  # e.g. no C++ compiler for inductor: report, go on
                            _say(f"  ({name}: left out, its first call failed: {type(err).__name__}: "
                                 f"{str(err).splitlines()[0] if str(err) else ''})")
                            continue
                        first_call[name] = time.perf_counter() - start
                    calls[name] = call
        times = interleaved(calls, rounds, number, device)
        for name in [n for n in calls if n != "copy"]:
            fraction = copy_fraction(times, name)
            seconds = {"forward+backward": times[name], "copy": times["copy"]}
            if name in first_call:
                seconds["first call"] = first_call[name]
            figures.append(Figure("norms", f"{name}, {tokens}x{width}", fraction["fraction"], FRACTION,
                                  fraction["iqr"], seconds, {"tokens": tokens, "width": width, "dtype": "float32"},
                                  CEILING_NOTE if name == ELEMENTWISE_CEILING else note if name in first_call else "",
                                  rounds={"forward+backward": times.samples[name], "copy": times.samples["copy"]}))
    return figures


def _norm_call(fn: Callable, inputs: tuple[torch.Tensor, ...], grad: torch.Tensor,
               params: list[torch.Tensor]) -> Callable[[], None]:
    def call() -> None:
        fn(*inputs).backward(grad)
        for tensor in (*inputs, *params):
            tensor.grad = None
    return call


# ------------------------------------------------------------------ machine, runner, output

def matmul_gflops(device: torch.device, n: int = 1024, rounds: int = 10) -> float:
    """fp32 n x n matmul throughput: 2 n^3 / median seconds / 1e9."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    seconds = interleaved({"matmul": lambda: a @ b}, rounds, 1, device)["matmul"]
    return 2 * n**3 / seconds / 1e9


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on, with a measured fp32 matmul GFLOP/s."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    info = {"device": str(device), "cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "matmul_gflops_fp32": matmul_gflops(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_bench(sizes: Sizes = Sizes(), rounds: int = 5, device: str = "cpu", strategies: list[str] | None = None,
              sections: Iterable[str] = SECTIONS, out: str | Path | None = None,
              targets: dict[str, Sizes] = TARGET_SIZES, norm_shapes: Iterable[tuple[int, int]] = NORM_SHAPES,
              norm_paths: Iterable[str] | None = None, compiled: bool = False) -> dict[str, Any]:
    """Run the chosen sections, print each one's figures as it finishes, and with ``out`` write
    DIR/bench.json and DIR/bench.md. Returns what bench.json holds. ``compiled`` adds normlab's
    compiled train step to the transformers section."""
    sections = list(sections)
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ConfigError(f"--sections: unknown section '{unknown[0]}'; choose from {', '.join(SECTIONS)}")
    out_dir = check_output_dir(out, "--out", ("bench.json",)) if out is not None else None
    dev = pick_device(device, "--device")
    norm_paths = default_norm_paths(dev) if norm_paths is None else norm_paths
    started = time.perf_counter()
    torch.manual_seed(0)
    names = strategies or list(STRATEGIES)
    for name in names:  # bad sizes or an unknown strategy: one line now, not after the first sections
        sizes.model_config(name)
    machine = machine_info(dev)
    _say(f"normlab bench on {machine['cpu'] if dev.type == 'cpu' else machine['gpu']} ({machine['threads']} threads, "
         f"fp32 matmul {machine['matmul_gflops_fp32']:.0f} GFLOP/s), torch {machine['torch']}; median of {rounds} "
         "interleaved rounds, IQR of the per-round ratios in brackets")
    runners: dict[str, Callable[[], list[Figure]]] = {
        "transformers": lambda: bench_transformers(targets, rounds, dev, compiled),
        "generation": lambda: bench_generation(sizes, rounds, dev),
        "scoring": lambda: bench_scoring(sizes, max(1, rounds // 2), dev),
        "moe": lambda: bench_moe(sizes, rounds, dev),
        "strategies": lambda: bench_strategies(sizes, rounds, dev, names),
        "memory": lambda: bench_memory(sizes, dev, names),
        "norms": lambda: bench_norms(norm_shapes, rounds, dev, norm_paths),
    }
    figures: list[Figure] = []
    section_seconds: dict[str, float] = {}
    for section in [s for s in SECTIONS if s in sections]:
        _say(f"\n{section}")
        section_started = time.perf_counter()
        found = runners[section]()
        section_seconds[section] = time.perf_counter() - section_started
        if not found:
            _say("  (skipped: transformers or lm-eval is not installed)")
        for figure in found:
            iqr = f" [{figure.iqr_text()}]" if figure.iqr else ""
            details = "; ".join(filter(None, [figure.seconds_text(), figure.note]))
            _say(f"  {figure.name:<72} {figure.value_text()}{iqr}   {details}")
        _say(f"  ({section_seconds[section]:.0f} s)")
        figures += found
    result = {"machine": machine,
              "setup": {"sizes": asdict(sizes), "targets": {k: asdict(v) for k, v in targets.items()},
                        "norm_shapes": [list(s) for s in norm_shapes], "norm_paths": list(norm_paths),
                        "rounds": rounds, "sections": sections, "strategies": names, "compiled": compiled},
              "seconds_total": time.perf_counter() - started, "seconds_by_section": section_seconds,
              "figures": [asdict(f) for f in figures]}
    _say(f"\nbench took {result['seconds_total']:.0f} s")
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "bench.json").write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
        (out_dir / "bench.md").write_text(markdown(result, figures))
        _say(f"wrote {out_dir / 'bench.json'} and {out_dir / 'bench.md'}")
    return result


def markdown(result: dict[str, Any], figures: list[Figure]) -> str:
    """bench.md: the machine, the setup and one table row per figure."""
    machine, setup = result["machine"], result["setup"]
    where = machine.get("gpu", machine["cpu"])
    lines = [
        "# normlab bench", "",
        f"{where}, {machine['threads']} threads, fp32 matmul {machine['matmul_gflops_fp32']:.0f} GFLOP/s "
        f"(1024 x 1024); torch {machine['torch']}, Python {machine['python']}, {machine['platform']}.",
        f"Median of {setup['rounds']} interleaved rounds (order reversed every other round); IQR = interquartile "
        f"range of the per-round ratios. The bench took {result['seconds_total']:.0f} s.", "",
        f"Sizes: {_sizes_text(setup['sizes'])}; transformers section: "
        + "; ".join(f"{k} = {_sizes_text(v)}" for k, v in setup["targets"].items()) + ".", "",
        "| section | figure | value | IQR | median times | note |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {f.section} | {f.name} | {f.value_text()} | {f.iqr_text()} | {f.seconds_text()} | {f.note} |"
              for f in figures]
    return "\n".join(lines) + "\n"


def _sizes_text(sizes: dict[str, Any]) -> str:
    ffn = f", ffn {sizes['ffn_hidden']}" if sizes.get("ffn_hidden") else ""
    return (f"d_model {sizes['d_model']}, layers {sizes['n_layers']}, heads {sizes['n_heads']}{ffn}, "
            f"batch {sizes['batch']} x {sizes['seq_len']}, vocab {sizes['vocab']}")


def _say(text: str) -> None:
    print(text, file=sys.stdout, flush=True)
