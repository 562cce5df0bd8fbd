"""Cheap per-layer statistics recorded during training (``train.record_every``).

On a recording step the trainer writes one line to ``layers.jsonl``::

    {"step": s,
     "grad_norm": {"attn": [L], "ffn": [L], "norm": [L], "total": [L]},   # before clipping
     "residual_rms": [L+1],    # RMS of the residual stream entering each block, then leaving the last
     "residual_var": [L+1],    # variance over channels, averaged over tokens
     "residual_absmax": [L+1],
     "expert_load": {"layer": [E]}}   # MoE models: share of routing assignments per expert


Forward hooks are attached only for the recording step's first micro-batch, so other steps cost
nothing. Under torchrun every rank records and rank 0 writes: residual statistics are reduced
over the ranks' parts of the micro-batch (sums and counts, max for absmax), and FSDP's sharded
gradients are summed over their shards, so the line equals the single-process one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch < 2.5
    from torch.distributed._tensor import DTensor

from normlab.train import distributed
from normlab.train.distributed import World


def parameter_group(name: str) -> str:
    """'attn', 'ffn' or 'norm' for a parameter name inside a block."""
    if ".self_attn." in name and not name.rsplit(".", 2)[-2].endswith("_norm"):
        return "attn"
    if ".mlp." in name:
        return "ffn"
    return "norm"


def layer_grad_norms(model: nn.Module) -> dict[str, list[float]]:
    """L2 norm of the gradients of each block's parameters, split into attention projections,
    FFN and norm parameters (gains, DyT alpha, BHyT lambda, Q/K/V-norm gains); ``total``
    squared is the sum of the three squared. FSDP gradients are DTensor shards, disjoint
    between ranks: each rank sums its own squares and one all-reduce over the shard group
    completes the sums (every rank must call this then)."""
    layers = model.model.layers
    sums = {group: [0.0] * len(layers) for group in ("attn", "ffn", "norm")}
    shard_group = None
    for index, block in enumerate(layers):
        for name, p in block.named_parameters(prefix=f"layer.{index}"):
            if p.grad is not None:
                grad = p.grad.detach()
                if isinstance(grad, DTensor):
                    shard_group, grad = grad.device_mesh.get_group(), grad.to_local()
                sums[parameter_group(name)][index] += grad.float().pow(2).sum().item()
    if shard_group is not None:
        flat = torch.tensor([v for values in sums.values() for v in values], dtype=torch.float64)
        dist.all_reduce(flat, group=shard_group)  # a CPU tensor: gloo (NCCL runs pair it with gloo)
        sums = dict(zip(sums, flat.view(len(sums), -1).tolist(), strict=True))
    out = {group: [math.sqrt(v) for v in values] for group, values in sums.items()}
    out["total"] = [math.sqrt(sum(sums[g][i] for g in sums)) for i in range(len(layers))]
    return out


class ResidualProbe:
    """Forward hooks that record residual-stream statistics entering each block and leaving
    the last one (before the final norm)."""

    def __init__(self, model: nn.Module, world: World = distributed.SINGLE) -> None:
        self.model, self.world = model, world
        self._sums: list[list[float]] = []  # per site: sum x², sum of per-token variances, #values, #tokens
        self._absmax: list[float] = []
        self._handles: list = []

    def __enter__(self) -> ResidualProbe:
        self._sums, self._absmax = [], []
        layers = self.model.model.layers
        for block in layers:
            self._handles.append(block.register_forward_pre_hook(self._record_input))
        self._handles.append(layers[-1].register_forward_hook(self._record_output))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _record(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        self._sums.append([x.pow(2).sum().item(), x.var(dim=-1, unbiased=False).sum().item(),
                           x.numel(), x[..., 0].numel()])
        self._absmax.append(x.abs().max().item())

    def stats(self) -> list[tuple[float, float, float]]:
        """Per site (RMS, mean per-token variance, max |x|) over the whole micro-batch: summed
        over the ranks' parts of it under torchrun (a collective: every rank calls it)."""
        flat = distributed.all_reduce_sum(self.world, [v for site in self._sums for v in site])
        absmax = distributed.all_reduce_max(self.world, self._absmax)
        sites = [flat[i:i + 4] for i in range(0, len(flat), 4)]
        return [(math.sqrt(sq / n), var / tokens, m) for (sq, var, n, tokens), m in zip(sites, absmax, strict=True)]

    def _record_input(self, module, args) -> None:
        self._record(args[0])

    def _record_output(self, module, args, output) -> None:
        self._record(output)


class LayerRecorder:
    """Writes ``layers.jsonl`` every ``every`` steps (and at the last step); under torchrun
    every rank computes the record and rank 0 writes it."""

    def __init__(self, model: nn.Module, path: Path, every: int, max_steps: int,
                 world: World = distributed.SINGLE) -> None:
        self.model, self.path, self.every, self.max_steps, self.world = model, path, every, max_steps, world

    def active(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) is recorded."""
        return self.every > 0 and (step % self.every == 0 or step == self.max_steps or step == 1)

    def write(self, step: int, probe: ResidualProbe) -> None:
        rms, var, absmax = (list(column) for column in zip(*probe.stats(), strict=True))
        record = {"step": step, "grad_norm": layer_grad_norms(self.model), "residual_rms": rms,
                  "residual_var": var, "residual_absmax": absmax}
        if not self.world.is_main:
            return
        loads = {str(i): block.mlp.expert_load.tolist() for i, block in enumerate(self.model.model.layers)
                 if getattr(block.mlp, "expert_load", None) is not None}
        if loads:  # the last forward's routing: the recording step's last micro-batch
            record["expert_load"] = loads
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
