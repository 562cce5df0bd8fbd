"""The training loop behind ``normlab train``.

One optimizer step = ``grad_accum`` micro-batches; the batch of micro-step k is a pure function
of (seed, k), so a resumed run sees exactly the batches an uninterrupted run would, and every
strategy trained with one seed sees the same data in the same order.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from normlab.config import ConfigError, DataConfig, RunConfig, config_changes
from normlab.data import BatchSampler, TokenShards, eval_batches, load_tokenizer, prepare_or_load
from normlab.device import keep_freed_host_memory, pick_device
from normlab.errors import CheckpointError, NormlabError
from normlab.nn.model import NormLM, build_model
from normlab.plugins import load_recorded, record
from normlab.train import distributed
from normlab.train.callbacks import LayerRecorder, ResidualProbe
from normlab.train.checkpoint import (
    Checkpoint,
    is_sharded,
    latest_verified,
    list_checkpoints,
    load_full_into_sharded,
    load_sharded,
    load_verified,
    save_checkpoint,
    save_sharded_checkpoint,
)
from normlab.train.compile import PROBE_STEPS, CompileLog, CompileMeasurement, measure, signature
from normlab.train.distributed import World
from normlab.train.memory import check_step_fits
from normlab.train.optim import build_optimizer, build_scheduler, lr_factor
from normlab.train.rundir import RunDir

EXIT_DIVERGED = 3


@dataclass
class TrainResult:
    status: str  # finished | diverged | interrupted
    step: int
    reason: str | None = None

    def describe(self) -> str:
        if self.status == "diverged":
            return f"diverged ({self.reason}); last good step {self.step}"
        return f"{self.status} at step {self.step}" + (f" ({self.reason})" if self.reason else "")

    @property
    def exit_code(self) -> int:
        return {"finished": 0, "diverged": EXIT_DIVERGED, "interrupted": 130}[self.status]


# ---------------------------------------------------------------------------- data
def cache_root(data: DataConfig) -> Path:
    root = data.cache_dir or os.environ.get("NORMLAB_CACHE") or Path.home() / ".cache" / "normlab"
    return Path(root)


def load_data(data: DataConfig, progress: bool = True) -> tuple[Path, Any]:
    """Tokenize the corpus into cached shards (once) and return (shard dir, tokenizer)."""
    shard_dir = prepare_or_load(data.corpus, data.tokenizer, cache_root(data),
                                val_fraction=data.val_fraction, progress=progress)
    return shard_dir, load_tokenizer(shard_dir / "tokenizer")


# ---------------------------------------------------------------------------- config
def run_config(raw: dict[str, Any], out: str | Path | None = None, progress: bool = True) -> RunConfig:
    """Raw sections (YAML + overrides) -> the resolved ``RunConfig`` that ``train`` takes.

    The plugins recorded by a run already in ``out`` load first (a resumed run needs its norm
    types and strategies), then the corpus is tokenized (once, cached; rank 0 first under
    torchrun) for the vocabulary size, and ``RunConfig.resolve`` does the rest."""
    if out is not None and RunDir(out).exists():
        recorded = load_recorded(RunDir(out).read_plugins(), RunDir(out).path)
        raw = {**raw, "plugins": list(dict.fromkeys(recorded + raw.get("plugins", [])))}
    data = RunConfig.from_dict(raw, vocab_size=1).data  # every section checked before tokenizing
    world = distributed.setup()
    _, tokenizer = _main_first(world, lambda: load_data(data, progress and world.is_main))
    return RunConfig.resolve(raw, tokenizer.vocab_size)


# ---------------------------------------------------------------------------- loop
class _StopRequest:
    """SIGINT/SIGTERM ask the loop to stop at the next step boundary (after a checkpoint)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def evaluate(model: NormLM, shards: TokenShards, cfg: RunConfig, device: torch.device,
             world: World = distributed.SINGLE) -> float:
    """Mean next-token loss over the first ``train.eval_batches`` validation batches; with N
    processes each takes 1/N of every batch's rows (every rank runs every forward, as FSDP's
    gathers need)."""
    model.eval()
    total, count = 0.0, 0
    batches = eval_batches(shards, cfg.train.batch_size, cfg.train.seq_len, cfg.train.eval_batches)
    with torch.no_grad(), _autocast(cfg, device):
        for x, y in batches:
            x, y = (t.chunk(world.world_size)[world.rank] for t in (x, y))
            total += model(x.to(device), targets=y.to(device)).loss.item() * y.numel()
            count += y.numel()
    model.train()
    total, count = distributed.all_reduce_sum(world, [total, count])
    return total / count


def _autocast(cfg: RunConfig, device: torch.device):
    if cfg.train.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train(cfg: RunConfig, out: str | Path, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train (or resume) the run ``cfg`` (resolved: ``run_config`` or ``RunConfig.resolve``)
    into ``out``. Under ``torchrun`` every process calls this; rank 0 does all the writing."""
    keep_freed_host_memory()
    world = distributed.setup()
    try:
        return _train(cfg, RunDir(out), resume, progress and world.is_main, world)
    finally:
        distributed.teardown(world)


def _train(cfg: RunConfig, run: RunDir, resume: bool, progress: bool, world: World) -> TrainResult:
    distributed.barrier(world)  # every rank looks at the directory before rank 0 writes to it
    exists = run.exists()
    if exists and not resume:
        status = run.read_status()
        raise CheckpointError(
            f"'{run.path}' already holds a run (status {status.get('status')}, step "
            f"{status.get('step', '?')}); pass --resume to continue it or choose another --out"
        )
    if not exists and run.path.is_dir() and any(run.path.iterdir()):
        raise CheckpointError(f"'{run.path}' is not empty and holds no normlab run; choose another --out")
    _check_fits(cfg, world)  # before the run directory and the model
    distributed.barrier(world)
    _main_first(world, run.create)
    shard_dir, tokenizer = _main_first(world, lambda: load_data(cfg.data, progress))
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"vocabulary ({tokenizer.vocab_size}); the config was resolved for another one")
    if cfg.train.batch_size % world.world_size:
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} is not divisible by the "
                          f"{world.world_size} processes")
    resolved = cfg.to_dict()
    if exists:
        changes = config_changes(run.read_config(), resolved)
        if changes:
            raise CheckpointError(
                f"cannot resume '{run.path}' with a changed config ({'; '.join(changes[:3])}); "
                "use the original config or another --out"
            )
    trainer = Trainer(cfg, run, shard_dir, progress, world)  # fails before config.yaml is written
    distributed.barrier(world)
    if world.is_main:
        run.write_config(resolved)
        run.write_plugins(record(cfg.plugins))
        tokenizer.save(run.tokenizer_path)  # evaluate, generate and export read it from the run
    return trainer.fit()


def run_device(name: str, world: World) -> torch.device:
    """``train.device`` for this process: under torchrun on CUDA, the GPU of its local rank."""
    device = pick_device(name)
    return torch.device("cuda", world.local_rank) if device.type == "cuda" and world.distributed else device


def _check_fits(cfg: RunConfig, world: World) -> None:
    """``check_step_fits`` on every rank: a run that cannot fit stops here (one line, exit
    status 1), not in the kernel's OOM killer; one rank that cannot stops them all."""
    error = None
    try:
        check_step_fits(cfg.model, cfg.train, run_device(cfg.train.device, world), world.world_size,
                        world.distributed and cfg.train.distributed == "fsdp")
    except MemoryError as err:
        error = err
    if distributed.any_rank(world, error is not None):
        raise error or MemoryError("another process of this run does not fit in its memory (see its message)")


def _main_first(world: World, fn):
    """Run ``fn`` on rank 0, then on the other ranks (which then find its results, e.g. the
    tokenized shards). A user error on rank 0 stops every rank."""
    result, error = None, None
    if world.is_main:
        try:
            result = fn()
        except NormlabError as err:
            if not world.distributed:
                raise
            error = err
    if distributed.any_rank(world, error is not None):
        if error is not None:
            raise error
        raise NormlabError("rank 0 stopped with an error (see its message)")
    return result if world.is_main else fn()


class Trainer:
    """One run. ``train.batch_size`` is the global batch; with N processes each takes
    batch_size / N windows of the step's batch, so the trajectory does not depend on N (nor on
    DDP vs FSDP: both average the ranks' gradients)."""

    def __init__(self, cfg: RunConfig, run: RunDir, shard_dir: Path, progress: bool = True,
                 world: World = distributed.SINGLE) -> None:
        self.cfg, self.run, self.progress, self.world = cfg, run, progress, world
        t = cfg.train
        self.device = run_device(t.device, world)
        self.train_shards = TokenShards(shard_dir, "train")
        self.val_shards = TokenShards(shard_dir, "val")
        self.sampler = BatchSampler(self.train_shards, t.batch_size // world.world_size, t.seq_len, t.seed,
                                    world.rank, world.world_size)
        eval_batches(self.val_shards, t.batch_size, t.seq_len)  # checks the split is long enough
        torch.manual_seed(t.seed)
        self.model = build_model(cfg.model, seed=t.seed).to(self.device)
        self.parallel = distributed.wrap(self.model, world, t.distributed, self.device, t.precision == "bf16")
        self.sharded = distributed.is_fsdp(self.model)
        self.optimizer = build_optimizer(self.model, t)  # after sharding: FSDP's parameters are DTensors
        self.scheduler = build_scheduler(self.optimizer, t)
        self.compiled = torch.compile(self.parallel) if t.compile is not False else None  # compiles on first call
        self.forward = self.compiled if t.compile is True else self.parallel
        self.auto_compile = _AutoCompile(cfg, self.device, world) if t.compile == "auto" else None
        self.diverge_loss = t.diverge_loss or 3 * math.log(cfg.model.vocab_size)
        self.tokens_per_step = t.batch_size * t.seq_len * t.grad_accum
        self.step = 0
        self.writer = _tensorboard(run.path / "tb") if world.is_main else None
        self.recorder = LayerRecorder(self.model, run.layers_path, t.record_every, t.max_steps, world)

    # ------------------------------------------------------------------ state
    def _state(self) -> dict[str, Any]:
        """trainer.pt: step, scheduler, RNG, data fingerprint, and the optimizer unless sharded
        (then it is in the checkpoint's ``sharded/``)."""
        state = {"step": self.step, "scheduler": self.scheduler.state_dict(), "rng_cpu": torch.get_rng_state(),
                 "data_fingerprint": self.train_shards.meta["fingerprint"]}
        if not self.sharded:
            state["optimizer"] = self.optimizer.state_dict()
        if torch.cuda.is_available():
            state["rng_cuda"] = torch.cuda.get_rng_state_all()
        return state

    def _latest(self) -> Checkpoint | None:
        """The checkpoint to resume from: rank 0 verifies (moving corrupt ones aside), the
        others take its choice."""
        found = latest_verified(self.run.checkpoints) if self.world.is_main else None
        step = int(distributed.all_reduce_sum(self.world, [found.step + 1 if found else 0])[0]) - 1
        return next((c for c in list_checkpoints(self.run.checkpoints) if c.step == step), None)

    def _restore(self) -> None:
        """Load the newest checkpoint: an FSDP run's shards into any world size and wrapping, a
        one-file checkpoint into a plain or DDP model, or into FSDP shards via a plain copy."""
        ckpt = self._latest()
        if ckpt is None:
            return
        if is_sharded(ckpt):
            state = load_sharded(ckpt, self.model, self.optimizer)
        elif self.sharded:
            plain = build_model(self.cfg.model)
            state = load_full_into_sharded(ckpt, self.model, self.optimizer, plain,
                                           build_optimizer(plain, self.cfg.train))
        else:
            state = load_verified(ckpt, self.model)
            self.optimizer.load_state_dict(state["optimizer"])
        if state.get("data_fingerprint", self.train_shards.meta["fingerprint"]) != self.train_shards.meta["fingerprint"]:
            raise CheckpointError(
                f"cannot resume '{self.run.path}': the tokenized data differ from those it was trained "
                "on (the corpus files or the tokenizer changed); use another --out"
            )
        self.scheduler.load_state_dict(state["scheduler"])
        # The LR of the next step under the current schedule: the same value when nothing
        # changed, the extended cosine when train.max_steps was raised on resume.
        t = self.cfg.train
        factor = lr_factor(int(state["step"]), t.warmup_steps, t.max_steps, t.min_lr_ratio)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            group["lr"] = base * factor
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.step = int(state["step"])

    def _save(self) -> None:
        keep = self.cfg.train.keep_last
        if self.sharded:
            save_sharded_checkpoint(self.run.checkpoints, self.step, self.model, self.optimizer, self._state(),
                                    keep, self.world)
        elif self.world.is_main:
            save_checkpoint(self.run.checkpoints, self.step, self.model, self._state(), keep)

    def _refresh_bhyt_constants(self) -> None:
        """BHyT's c_attn from the current weights; FSDP gathers one block's weights at a time."""
        if not self.sharded:
            self.model.refresh_bhyt_constants()
            return
        for block in self.model.model.layers:
            if block.shared_statistic:
                block.unshard()
                block.refresh_c_attn(self.cfg.model.bhyt_context_len)
                block.reshard()

    # ------------------------------------------------------------------ loop
    def fit(self) -> TrainResult:
        t = self.cfg.train
        main = self.world.is_main
        self._restore()
        if main:
            self.run.truncate_logs(self.step)
        if self.step >= t.max_steps:
            if main:
                self.run.write_status("finished", step=self.step)
            return TrainResult("finished", self.step)
        if main:
            self.run.write_status("running", step=self.step, max_steps=t.max_steps,
                                  processes=self.world.world_size)
        bar = tqdm(total=t.max_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (self.progress and sys.stderr.isatty()), desc=self.run.path.name)
        try:
            with _StopRequest() as stop:
                result = self._loop(bar, stop)
        except Exception as err:
            if main:
                self.run.write_status("failed", step=self.step, reason=f"{type(err).__name__}: {err}")
            raise
        finally:
            bar.close()
            if self.writer is not None:
                self.writer.close()
        if main:
            self.run.write_status(result.status, step=result.step,
                                  **({"reason": result.reason} if result.reason else {}))
        distributed.barrier(self.world)
        return result

    def _loop(self, bar: tqdm, stop: _StopRequest) -> TrainResult:
        t = self.cfg.train
        window_time, window_tokens = 0.0, 0  # tokens/s counts training, not eval or checkpoints
        if self.auto_compile is not None:
            self.forward = self.auto_compile.before_first_step(t.max_steps - self.step, self.parallel, self.compiled,
                                                               self.progress)
        while self.step < t.max_steps:
            started = time.perf_counter()
            loss, grad_norm, moe = self._train_step()
            if not (math.isfinite(loss) and math.isfinite(grad_norm)) or loss > self.diverge_loss:
                reason = (f"loss {loss:.4g} at step {self.step + 1}" if math.isfinite(grad_norm)
                          else f"gradient norm {grad_norm} at step {self.step + 1}")
                if math.isfinite(loss) and loss > self.diverge_loss:
                    reason += f" exceeds diverge_loss {self.diverge_loss:.4g}"
                return TrainResult("diverged", self.step, reason)
            lr = self.optimizer.param_groups[0]["lr"]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            if self.auto_compile is not None:
                self.forward = self.auto_compile.after_step(time.perf_counter() - started, t.max_steps - self.step,
                                                            self.parallel, self.compiled, self.progress)
            window_time += time.perf_counter() - started
            window_tokens += self.tokens_per_step
            if self.step % self.cfg.model.bhyt_refresh_every == 0:
                self._refresh_bhyt_constants()

            last = self.step == t.max_steps
            record: dict[str, Any] = {}
            if self.step % t.eval_every == 0 or last:
                val = evaluate(self.model, self.val_shards, self.cfg, self.device, self.world)
                record.update(val_loss=val, val_ppl=math.exp(min(val, 50.0)))
            if self.world.is_main and (record or self.step % t.log_every == 0 or last):
                record = {"step": self.step, "tokens": self.step * self.tokens_per_step, "loss": loss,
                          "lr": lr, "grad_norm": grad_norm,
                          "tokens_per_s": window_tokens / max(window_time, 1e-9), **moe, **record}
                self._log(record, bar)
                window_time, window_tokens = 0.0, 0
            bar.update(1)
            stopping = distributed.any_rank(self.world, stop.requested)
            if self.step % t.save_every == 0 or last or stopping:
                self._save()
            if stopping and not last:
                return TrainResult("interrupted", self.step, "stopped by a signal; resume with --resume")
        return TrainResult("finished", self.step)

    def _train_step(self) -> tuple[float, float, dict[str, float]]:
        """One optimizer step's gradients: (next-token loss, gradient norm before clipping, MoE
        auxiliary losses). The objective adds moe_aux_loss_weight * load-balancing loss and
        moe_z_loss_weight * router z-loss to the next-token loss for MoE models."""
        t, m = self.cfg.train, self.cfg.model
        record = self.recorder.active(self.step + 1)
        probe = ResidualProbe(self.model, self.world)
        total = 0.0
        moe_totals = {"moe_load_balance": 0.0, "moe_z_loss": 0.0}
        for micro in range(t.grad_accum):
            x, y = self.sampler.batch(self.step * t.grad_accum + micro)
            sync = micro == t.grad_accum - 1  # DDP: all-reduce once; FSDP: reduce-scatter once
            with (_autocast(self.cfg, self.device), (probe if record and micro == 0 else contextlib.nullcontext()),
                  self._gradient_sync(sync)):
                loss = self.forward(x.to(self.device), targets=y.to(self.device)).loss
                objective = loss
                moe = self.model.moe_losses()
                if moe is not None:
                    objective = loss + m.moe_aux_loss_weight * moe["load_balance"] + m.moe_z_loss_weight * moe["z_loss"]
                    moe_totals["moe_load_balance"] += moe["load_balance"].item() / t.grad_accum
                    moe_totals["moe_z_loss"] += moe["z_loss"].item() / t.grad_accum
                (objective / t.grad_accum).backward()
            total += loss.item() / t.grad_accum
        reduced = distributed.all_reduce_sum(self.world, [total, *moe_totals.values()])
        total = reduced[0] / self.world.world_size
        moe_logged = ({k: v / self.world.world_size for k, v in zip(moe_totals, reduced[1:], strict=True)}
                      if self.cfg.model.moe_experts else {})
        if record:
            self.recorder.write(self.step + 1, probe)
        max_norm = t.grad_clip if t.grad_clip > 0 else float("inf")
        if not self.sharded:
            return total, torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm).item(), moe_logged
        # = clip_grad_norm_, with FSDP's norm (a DTensor over the shards) made whole before clipping
        params = list(self.model.parameters())
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]).full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return total, norm.item(), moe_logged

    def _gradient_sync(self, sync: bool):
        """A context in which backward reduces the gradients over ranks only when ``sync``
        (the last micro-batch of a step); a no-op in a single process."""
        if self.sharded:
            self.model.set_requires_gradient_sync(sync)
        elif self.world.distributed and not sync:
            return self.parallel.no_sync()
        return contextlib.nullcontext()

    def _log(self, record: dict[str, Any], bar: tqdm) -> None:
        self.run.append_metrics(record)
        if self.writer is not None:
            for key, value in record.items():
                if key != "step":
                    self.writer.add_scalar(f"train/{key}", value, record["step"])
        postfix = {"loss": f"{record['loss']:.3f}", "tok/s": f"{record['tokens_per_s']:.0f}"}
        if "val_loss" in record:
            postfix["val"] = f"{record['val_loss']:.3f}"
        bar.set_postfix(postfix, refresh=False)
        if self.progress and bar.disable and "val_loss" in record:
            print(f"{self.run.path.name}: step {record['step']}/{self.cfg.train.max_steps} "
                  f"loss {record['loss']:.4f} val {record['val_loss']:.4f} "
                  f"tok/s {record['tokens_per_s']:.0f}", file=sys.stderr, flush=True)


class _AutoCompile:
    """``train.compile=auto`` (normlab.train.compile): take this machine's measurement for the
    run's signature, or measure it on the run's first steps (PROBE_STEPS eager, then as many
    compiled), then keep the path that the break-even rule picks for the steps left. Every rank
    takes the same path (compiled when any rank's rule says so)."""

    def __init__(self, cfg: RunConfig, device: torch.device, world: World) -> None:
        self.world = world
        self.log = CompileLog(cache_root(cfg.data))
        self.key = signature(cfg, device)
        self.known = self.log.get(self.key)
        self.eager: list[float] = []
        self.compiled: list[float] = []
        self.choice: bool | None = None

    def before_first_step(self, steps_left: int, eager: Any, compiled: Any, progress: bool) -> Any:
        """The callable for the first step: decided now when this machine has a measurement, else
        eager (the probe starts)."""
        if self.known is not None:
            self._decide(self.known, steps_left, progress)
        return compiled if self.choice else eager

    def after_step(self, seconds: float, steps_left: int, eager: Any, compiled: Any, progress: bool) -> Any:
        """The callable for the next step, given the last step's time (probing until decided)."""
        if self.choice is None:
            (self.compiled if len(self.eager) == PROBE_STEPS else self.eager).append(seconds)
            if len(self.compiled) < PROBE_STEPS and steps_left > PROBE_STEPS:
                return compiled if len(self.eager) == PROBE_STEPS else eager  # still probing
            if len(self.compiled) < PROBE_STEPS:  # too short to finish probing: eager, nothing recorded
                self.choice = False
                return eager
            measurement = measure(self.eager, self.compiled)
            if self.world.is_main:
                self.log.put(self.key, measurement)
            self._decide(measurement, steps_left, progress)
        return compiled if self.choice else eager

    def _decide(self, measurement: CompileMeasurement, steps_left: int, progress: bool) -> None:
        self.choice = distributed.any_rank(self.world, measurement.pays(steps_left))
        if progress:
            print(f"train.compile=auto: {'compiled' if self.choice else 'eager'} for the {steps_left} steps left "
                  f"(measured: compile {measurement.compile_s:.1f} s, step {measurement.eager_s * 1e3:.0f} ms eager, "
                  f"{measurement.compiled_s * 1e3:.0f} ms compiled)", file=sys.stderr, flush=True)


def _tensorboard(path: Path):
    """A SummaryWriter when tensorboard is installed, else None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))
