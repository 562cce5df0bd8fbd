"""The papers' layer diagnostics on a model and a few batches (Mix-LN's layer-effectiveness metrics, BHyT's statistics; docs/diagnostics.md).

"Residual states" are the L+1 tensors of the residual stream entering each block and leaving
the last one (before the final norm; Hugging Face's ``hidden_states`` ends after it instead).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from normlab.nn.model import NormLM
from normlab.nn.moe import MoE
from normlab.train.callbacks import layer_grad_norms

Batches = list[tuple[torch.Tensor, torch.Tensor]]

#: |argument| above which a squashing norm (one with ``argument(x)``: DyT, BHyT, ...) counts an
#: element as saturated (tanh(2) = 0.96, erf(2) = 0.995)
SATURATION = 2.0


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """d(a, b) = arccos(cos(a, b)) / pi over the last dim, in [0, 1]; 0.5 where a norm is 0
    (as in the Mix-LN code)."""
    cos = F.cosine_similarity(a.double(), b.double(), dim=-1, eps=0.0)
    return torch.nan_to_num(torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi, nan=0.5)


@torch.no_grad()
def residual_states(model: NormLM, ids: torch.Tensor) -> list[torch.Tensor]:
    """The L+1 residual-stream tensors (B, T, d) of one forward pass."""
    states: list[torch.Tensor] = []
    layers = model.model.layers
    handles = [block.register_forward_pre_hook(lambda m, args: states.append(args[0].detach()))
               for block in layers]
    handles.append(layers[-1].register_forward_hook(lambda m, args, out: states.append(out.detach())))
    try:
        model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return states


def angular_distance_matrix(states_per_batch: Iterable[list[torch.Tensor]]) -> np.ndarray:
    """D[l, n-1] = mean over samples of d(x_l, x_{l+n}) on the last token, for n = 1 .. L-l;
    NaN where l + n > L. ``states_per_batch`` yields L+1 states per batch."""
    total, count = None, 0
    for states in states_per_batch:
        last = torch.stack([s[:, -1, :] for s in states])  # (L+1, B, d)
        n_states = last.shape[0]
        dist = torch.full((n_states - 1, n_states - 1, last.shape[1]), float("nan"), dtype=torch.float64)
        for layer in range(n_states - 1):
            for n in range(1, n_states - layer):
                dist[layer, n - 1] = angular_distance(last[layer], last[layer + n])
        total = dist.sum(-1) if total is None else total + dist.sum(-1)
        count += last.shape[1]
    return (total / count).numpy()


def residual_statistics(states_per_batch: Iterable[list[torch.Tensor]]) -> dict[str, list[float]]:
    """Per residual position: RMS, variance over channels (mean over tokens), max |x|."""
    rms_sq, var, absmax, batches = None, None, None, 0
    for states in states_per_batch:
        s = torch.stack([x.double() for x in states])  # (L+1, B, T, d)
        r, v = s.pow(2).mean((1, 2, 3)), s.var(-1, unbiased=False).mean((1, 2))
        m = s.abs().amax((1, 2, 3))
        rms_sq = r if rms_sq is None else rms_sq + r
        var = v if var is None else var + v
        absmax = m if absmax is None else torch.maximum(absmax, m)
        batches += 1
    return {"rms": (rms_sq / batches).sqrt().tolist(), "variance": (var / batches).tolist(),
            "max_abs": absmax.tolist()}


def mean_loss(model: NormLM, batches: Batches) -> float:
    """Token-weighted mean next-token loss."""
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            logits = model(x)
            total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
            count += y.numel()
    return total / count


def gradient_norms(model: NormLM, batches: Batches) -> dict[str, list[float]]:
    """Per-layer gradient norms (attention / FFN / norm / total) of the mean loss over batches."""
    model.zero_grad(set_to_none=True)
    for x, y in batches:
        loss = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
        (loss / len(batches)).backward()
    norms = layer_grad_norms(model)
    model.zero_grad(set_to_none=True)
    return norms


class _SkipBlock(nn.Module):
    """A block replaced by the identity."""

    def forward(self, x, cos, sin, cache=None, mask=None):
        return x


@contextlib.contextmanager
def dropped_layer(model: NormLM, layer: int):
    """Temporarily replace block ``layer`` by the identity."""
    layers = model.model.layers
    original = layers[layer]
    layers[layer] = _SkipBlock()
    try:
        yield model
    finally:
        layers[layer] = original


def layer_drop(model: NormLM, batches: Batches) -> dict[str, object]:
    """Delta validation loss and perplexity when each block becomes the identity (no retraining)."""
    base = mean_loss(model, batches)
    rows = []
    for layer in range(len(model.model.layers)):
        with dropped_layer(model, layer):
            loss = mean_loss(model, batches)
        rows.append({"layer": layer, "val_loss": loss, "delta_loss": loss - base,
                     "delta_ppl": math.exp(min(loss, 50)) - math.exp(min(base, 50))})
    return {"base_loss": base, "base_ppl": math.exp(min(base, 50)), "layers": rows}


@torch.no_grad()
def norm_io(model: NormLM, batches: Batches, points: int = 1500, seed: int = 0) -> list[dict]:
    """Input/output samples of the two Pre-Norm sites of each block (or of its first active
    slots) and, for norms with an ``argument(x)`` method, the share of elements with |argument| > 2."""
    gen = torch.Generator().manual_seed(seed)
    captured: dict[tuple[int, str], list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]] = {}
    handles = []
    cos_sin = None
    for layer, block in enumerate(model.model.layers):
        if block.shared_statistic:
            continue  # shared-statistic sites are applied inside the block; computed from the states below
        for name, module in block.named_children():
            if name.endswith(("layernorm", "_norm")) and not isinstance(module, nn.Identity):
                def hook(m, args, out, key=(layer, name)):
                    x = args[0].detach()
                    arg = m.argument(x) if hasattr(m, "argument") else None
                    captured.setdefault(key, []).append((x, out.detach(), arg))
                handles.append(module.register_forward_hook(hook))
    try:
        for x, _ in batches:
            states = residual_states(model, x)
            cos_sin = (model.model.rope_cos[: x.shape[1]], model.model.rope_sin[: x.shape[1]])
            for layer, block in enumerate(model.model.layers):
                if block.shared_statistic:
                    site1, site2 = block.input_layernorm, block.post_attention_layernorm
                    h = states[layer]
                    s2 = site1.statistic(h)
                    y, s2_hat = block.shared_statistic_attention(h, *cos_sin)
                    captured.setdefault((layer, "input_layernorm"), []).append(
                        (h, site1.apply(h, s2), site1.argument(h, s2)))
                    captured.setdefault((layer, "post_attention_layernorm"), []).append(
                        (y, site2.apply(y, s2_hat), site2.argument(y, s2_hat)))
    finally:
        for handle in handles:
            handle.remove()
    out = []
    for (layer, slot), items in sorted(captured.items()):
        xs = torch.cat([i[0].flatten() for i in items])
        ys = torch.cat([i[1].flatten() for i in items])
        pick = torch.randperm(xs.numel(), generator=gen)[:points]
        entry = {"layer": layer, "slot": slot, "x": xs[pick].tolist(), "y": ys[pick].tolist(),
                 "saturation": None}
        if items[0][2] is not None:
            args = torch.cat([i[2].flatten() for i in items])
            entry["saturation"] = (args.abs() > SATURATION).double().mean().item()
        out.append(entry)
    return out


@torch.no_grad()
def bhyt_statistic_check(model: NormLM, batches: Batches) -> list[dict] | None:
    """For each shared-statistic (BHyT) block: the FFN site's statistic s2_hat against the exact
    statistic of Y (BHyT: ms(Y)), per token: mean ratio and Pearson correlation. None for other
    models."""
    blocks = [b for b in model.model.layers if b.shared_statistic]
    if not blocks:
        return None
    approx: dict[int, list[torch.Tensor]] = {}
    exact: dict[int, list[torch.Tensor]] = {}
    for x, _ in batches:
        states = residual_states(model, x)
        cos, sin = model.model.rope_cos[: x.shape[1]], model.model.rope_sin[: x.shape[1]]
        for layer, block in enumerate(model.model.layers):
            y, s2_hat = block.shared_statistic_attention(states[layer], cos, sin)
            approx.setdefault(layer, []).append(s2_hat.flatten().double())
            exact.setdefault(layer, []).append(block.post_attention_layernorm.statistic(y).flatten().double())
    rows = []
    for layer in sorted(approx):
        a, e = torch.cat(approx[layer]), torch.cat(exact[layer])
        corr = torch.corrcoef(torch.stack([a, e]))[0, 1].item() if a.std() > 0 and e.std() > 0 else float("nan")
        rows.append({"layer": layer, "c_attn": model.model.layers[layer].c_attn.item(),
                     "mean_approx": a.mean().item(), "mean_exact": e.mean().item(),
                     "ratio": (a / e).mean().item(), "pearson_r": corr})
    return rows


@torch.no_grad()
def moe_routing(model: NormLM, batches: Batches, reference: NormLM | None = None) -> list[dict] | None:
    """Per MoE layer on the batches: ``load`` = share of the N*k routing assignments each expert
    gets, ``entropy`` = mean over tokens of H(p) = -sum_e p_e ln p_e of the router
    probabilities (and divided by ln E), and with a ``reference`` model (another checkpoint of
    the run) ``top1_changed`` = share of tokens whose top-1 expert differs. None when the model
    has no MoE layer."""
    def router_logits(m: NormLM) -> dict[int, torch.Tensor]:
        captured: dict[int, list[torch.Tensor]] = {}
        handles = [block.mlp.gate.register_forward_hook(
                       lambda mod, args, out, layer=layer: captured.setdefault(layer, []).append(out.float()))
                   for layer, block in enumerate(m.model.layers) if isinstance(block.mlp, MoE)]
        try:
            for x, _ in batches:
                m(x)
        finally:
            for handle in handles:
                handle.remove()
        return {layer: torch.cat(parts) for layer, parts in captured.items()}

    logits = router_logits(model)
    if not logits:
        return None
    before = router_logits(reference) if reference is not None else {}
    rows = []
    for layer, z in logits.items():
        moe = model.model.layers[layer].mlp
        probs = z.softmax(-1)
        chosen = probs.topk(moe.top_k, -1).indices.flatten()
        load = torch.bincount(chosen, minlength=moe.n_experts).float() / chosen.numel()
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean().item()
        row = {"layer": layer, "load": load.tolist(), "entropy": entropy,
               "entropy_normalized": entropy / math.log(moe.n_experts), "top1_changed": None}
        if layer in before:
            row["top1_changed"] = (before[layer].argmax(-1) != z.argmax(-1)).float().mean().item()
        rows.append(row)
    return rows
