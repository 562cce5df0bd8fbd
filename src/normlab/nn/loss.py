"""The next-token loss straight from the last hidden states: the LM head and cross-entropy in one
step, so that the (tokens x vocabulary) logits never exist at once where a fast path runs.

    loss = mean over t with y_t != ignore_index of  logsumexp(W h_t) - (W h_t)[y_t]

The formula (``F.linear`` then ``F.cross_entropy``) is the reference, and what runs while the
logits fit in one chunk (``chunk_elements()``). Beyond that the fast path takes over, chosen by
``FastPath`` like the fused norms (so ``reference_norms()``, CPU autocast and compilation run
the formula): on the CPU ``ChunkedLinearCrossEntropy`` (computing in fp32, for an fp32 head;
like the norms' kernels it is taken only where normlab's CPU extension built); on CUDA
liger-kernel's fused linear cross-entropy when it is installed (``triton_norms``; fp32 or bf16,
so FSDP's bf16 parameters too). A train step at vocabulary 50,257
(d 256, 4 layers, batch 8 x 256, 2 CPU threads at ~190 GFLOP/s) took 1.47-1.53 s against
1.50-1.88 s with the formula (separate processes, two runs each, freed host memory kept in
both) and peaked at 1.3-1.4 GB of resident memory against 2.1-4.1 GB: one chunk's
logits (64 MiB) instead of three 411 MB tensors (logits, log-softmax, their gradient).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from normlab.errors import ConfigError
from normlab.nn.norms import fast_kernel

#: logits of one chunk at most, in elements (16 Mi fp32 = 64 MiB)
CHUNK_ELEMENTS = 1 << 24


def chunk_elements() -> int:
    """Logits per chunk: ``NORMLAB_LOSS_CHUNK_ELEMENTS`` when set, else ``CHUNK_ELEMENTS``."""
    value = os.environ.get("NORMLAB_LOSS_CHUNK_ELEMENTS")
    if value is None:
        return CHUNK_ELEMENTS
    if not (value.isascii() and value.isdigit()) or int(value) < 1:
        raise ConfigError(f"NORMLAB_LOSS_CHUNK_ELEMENTS must be a positive integer, not '{value}'")
    return int(value)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` (hidden (..., d), weight (V, d)) against
    ``targets`` (...), skipping ``ignore_index``; the logits in fp32."""
    hidden, targets = hidden.flatten(0, -2), targets.flatten()
    # logits within one chunk are cheap to hold, and the formula is as fast or faster there
    if (hidden.shape[0] * weight.shape[0] > chunk_elements()
            and (kernel := fast_kernel("linear_cross_entropy", hidden, weight))):
        return kernel(hidden, weight, targets, ignore_index)
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=ignore_index)


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 ignore_index: int = -100) -> torch.Tensor:
    """``linear_cross_entropy`` by ``ChunkedLinearCrossEntropy``, for hidden (N, d) and targets
    (N,); the gradients are computed only where autograd is recording."""
    return ChunkedLinearCrossEntropy.apply(hidden, weight, targets, ignore_index, torch.is_grad_enabled())


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """The loss and, when they are needed, its gradients in the forward pass, a chunk of tokens
    at a time (at most ``chunk_elements()`` logits): with z = W h, p = softmax(z) and n the number
    of counted targets, dL/dz_t = (p_t - onehot(y_t)) / n (0 for an ignored t), dL/dh = dL/dz W and
    dL/dW = sum_t dL/dz_t h_t^T. The backward only scales them by the incoming gradient. Memory:
    one chunk's logits instead of all of them (and of their softmax and its gradient)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, recording: bool):
        counted = targets != ignore_index
        n = counted.sum().clamp_min(1).to(torch.float32)  # every target ignored: loss 0 / 0 below
        want_hidden, want_weight = (recording and needed for needed in ctx.needs_input_grad[:2])
        grad_hidden = torch.empty_like(hidden, dtype=torch.float32) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        w = weight.float()
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        rows = hidden.float()
        chunk = max(1, chunk_elements() // weight.shape[0])
        for start in range(0, rows.shape[0], chunk):
            h, y, keep = (t[start:start + chunk] for t in (rows, targets, counted))
            y = y.where(keep, 0)
            logits = h @ w.t()
            lse = logits.logsumexp(-1)
            total += ((lse - logits.gather(1, y[:, None]).squeeze(1)) * keep).sum()
            if want_hidden or want_weight:
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                grad.scatter_add_(1, y[:, None], -keep[:, None].float())
                grad.mul_(keep[:, None] / n)
                if want_hidden:
                    torch.mm(grad, w, out=grad_hidden[start:start + chunk])
                if want_weight:
                    grad_weight.addmm_(grad.t(), h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = hidden.dtype, weight.dtype
        return total / counted.sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else (grad_hidden * grad_loss).to(ctx.dtypes[0]),
                None if grad_weight is None else (grad_weight * grad_loss).to(ctx.dtypes[1]), None, None, None)
