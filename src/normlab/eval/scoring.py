"""Log-likelihood of continuations under a ``NormLM``, following lm-evaluation-harness's
convention for causal models (``lm_eval/api/model.py`` and ``models/huggingface.py``, 0.4.13):

- trailing whitespace of the context moves to the front of the continuation;
- ``context + continuation`` is encoded whole and split at ``len(encode(context))``. (Issue 8
  says "tokenized separately"; lm-eval 0.4.13 does this for causal models, and we match it.)
- an empty context becomes the end-of-text token; no other special tokens are added;
- the model reads the last ``max_seq_len + 1`` tokens of context + continuation minus the final
  one, and the continuation's log-probability is summed from the positions that predict it
  (a continuation longer than max_seq_len, which lm-eval refuses, loses its first tokens);
- plain text is scored in lm-eval's disjoint rolling windows (``rolling_windows``).

Scoring is batched: sequences sorted by length and right-padded (exact under causal attention,
no mask needed). Where every choice of an item reads the same context, the context runs once
into the KV cache and the continuations run on copies of it, batched across items by length.
Only the positions that predict a scored token go through the LM head and log-softmax (fp32).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from tqdm import tqdm

from normlab.data import Tokenizer
from normlab.nn.model import NormLM

LOGPROB_ELEMENTS = 1 << 25
"""Logits computed at once (rows x vocabulary), bounding memory for large vocabularies."""


@dataclass(frozen=True)
class Request:
    """Score log P(continuation | context), both token ids; the context is never empty."""

    context: list[int]
    continuation: list[int]

    def start(self, max_seq_len: int) -> int:
        """Index in context + continuation of the first token kept (the last max_seq_len + 1)."""
        return max(0, len(self.context) + len(self.continuation) - max_seq_len - 1)

    def scored(self, max_seq_len: int) -> list[int]:
        """The continuation tokens that are scored: all of them, or the last max_seq_len of a
        longer continuation (lm-eval refuses those; we score what fits in the window)."""
        return self.continuation[-max_seq_len:]


class Score(NamedTuple):
    """``loglik`` = sum_t log p(continuation_t | everything before it); ``greedy``: every
    continuation token is the model's argmax."""

    loglik: float
    greedy: bool


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> Request:
    """lm-eval's encoding of a (context, continuation) text pair (see the module docstring)."""
    if not context:
        ids = tokenizer.encode(continuation)
        if ids and ids[0] == tokenizer.eos_id:  # lm-eval: an end-of-text token is the context
            return Request(ids[:1], ids[1:])
        return Request([tokenizer.eos_id], ids)
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    context_ids = tokenizer.encode(stripped)
    return Request(context_ids, tokenizer.encode(stripped + continuation)[len(context_ids):])


def rolling_windows(ids: list[int], prefix_id: int, max_seq_len: int) -> list[Request]:
    """lm-eval's disjoint rolling windows over a document of token ``ids``: window k predicts
    ids[kL : (k+1)L] (L = max_seq_len), the first from ``prefix_id`` (end of text), each later
    one also from the tokens just before it, so that it reads L tokens."""
    windows = []
    for begin in range(0, len(ids), max_seq_len):
        end = min(begin + max_seq_len, len(ids))
        context = [prefix_id] if begin == 0 else ids[end - max_seq_len - 1:begin]
        windows.append(Request(context, ids[begin:end]))
    return windows


@torch.inference_mode()
def score(model: NormLM, items: Sequence[Sequence[Request]], batch_size: int = 32,
          progress: bool = True, desc: str | None = None) -> list[list[Score]]:
    """The ``Score`` of every request of every item (the choices of one question form an item).

    Items whose requests share their context (cut at the same place) run it once into the KV
    cache, up to batch_size * max_seq_len context tokens per forward; every other forward holds
    at most ``batch_size`` sequences: continuations on a cached context, or whole requests."""
    max_seq_len = model.config.max_seq_len
    results: list[list[Score | None]] = [[None] * len(requests) for requests in items]
    shared = [i for i, requests in enumerate(items) if _shares_context(requests, max_seq_len)]
    shared_set = set(shared)
    whole = [(i, j) for i, requests in enumerate(items) if i not in shared_set
             for j in range(len(requests))]
    remaining = [len(requests) for requests in items]
    bar = tqdm(total=len(items), desc=desc, unit="item", dynamic_ncols=True,
               disable=not (progress and sys.stderr.isatty()))

    def cached_length(i: int) -> int:
        return len(items[i][0].context) - items[i][0].start(max_seq_len) - 1

    shared.sort(key=cached_length, reverse=True)
    sizes = list(map(cached_length, shared))
    for chunk in _batches(shared, sizes, batch_size * max_seq_len, min_fill=0.5):
        chunk_scores = _score_shared(model, [items[i] for i in chunk], batch_size)
        for i, scores in zip(chunk, chunk_scores, strict=True):
            results[i] = scores
        bar.update(len(chunk))

    def fed_length(key: tuple[int, int]) -> int:
        request = items[key[0]][key[1]]
        return len(request.context) + len(request.continuation) - request.start(max_seq_len) - 1

    whole.sort(key=fed_length, reverse=True)
    for batch in _batches(whole, [1] * len(whole), batch_size):
        scores = _score_whole(model, [items[i][j] for i, j in batch])
        for (i, j), result in zip(batch, scores, strict=True):
            results[i][j] = result
            remaining[i] -= 1
            if remaining[i] == 0:
                bar.update()
    bar.close()
    return results  # type: ignore[return-value]


def _shares_context(requests: Sequence[Request], max_seq_len: int) -> bool:
    """Several requests with equal context tokens, cut at the same place, and at least two
    context tokens kept (one for the cache, the last one read with each continuation)."""
    if len(requests) < 2:
        return False
    first = requests[0]
    start = first.start(max_seq_len)
    return len(first.context) - start >= 2 and all(
        r.context == first.context and r.start(max_seq_len) == start for r in requests)


def _batches(keys: list, sizes: list[int], limit: int, min_fill: float = 0.0) -> list[list]:
    """Consecutive runs of ``keys`` whose padded size, len(run) * max(sizes in run), stays
    within ``limit`` (or one key alone when it is larger), and whose sizes are all at least
    ``min_fill`` times the largest (bounding the padding)."""
    batches: list[list] = []
    widest = 0
    for key, size in zip(keys, sizes, strict=True):
        widest = max(widest, size)
        if not batches or (len(batches[-1]) + 1) * widest > limit or size < min_fill * widest:
            batches.append([])
            widest = size
        batches[-1].append(key)
    return batches


def _score_shared(model: NormLM, items: list[Sequence[Request]],
                  batch_size: int) -> list[list[Score]]:
    """The scores of items whose requests share their context. Each item's kept context but
    its last token (P_i tokens) runs once into the KV cache. Then the requests, sorted by
    continuation length, run ``batch_size`` at a time on copies of their item's cache row:
    request j reads context[-1:] + continuation_j[:-1] at positions P_i, P_i + 1, ..., the
    padding after shorter contexts hidden by the key mask."""
    max_seq_len, device = model.config.max_seq_len, model.lm_head.weight.device
    prefixes = [item[0].context[item[0].start(max_seq_len):-1] for item in items]
    width = max(map(len, prefixes))
    cache = model.new_cache(len(items), width)
    model.model(_right_padded(prefixes, width, device), cache=cache)

    results: list[list[Score | None]] = [[None] * len(item) for item in items]
    keys = [(i, j) for i, item in enumerate(items) for j in range(len(item))]
    keys.sort(key=lambda key: len(items[key[0]][key[1]].continuation), reverse=True)
    for batch in _batches(keys, [1] * len(keys), batch_size):
        batch.sort()  # the row order of repeat_interleave: by item
        item_index = torch.tensor([i for i, _ in batch], device=device)
        requests = [items[i][j] for i, j in batch]
        steps = max(len(r.continuation) for r in requests)
        rows = cache.repeat_interleave(torch.bincount(item_index, minlength=len(items)),
                                       width + steps)
        past = torch.tensor([len(p) for p in prefixes], device=device)[item_index]
        # padding after a continuation may run past the last position; its outputs are unused
        positions = (past[:, None] + torch.arange(steps, device=device)).clamp(max=max_seq_len - 1)
        key_mask = torch.cat([torch.arange(width, device=device) < past[:, None],
                              torch.ones(len(batch), steps, dtype=torch.bool, device=device)], 1)
        inputs = [r.context[-1:] + r.continuation[:-1] for r in requests]
        hidden, _ = model.model(_right_padded(inputs, steps, device), position_ids=positions,
                                attention_mask=key_mask, cache=rows)
        scores = _continuation_scores(model, hidden, [(0, r.continuation) for r in requests])
        for (i, j), result in zip(batch, scores, strict=True):
            results[i][j] = result
    return results  # type: ignore[return-value]


def _score_whole(model: NormLM, requests: list[Request]) -> list[Score]:
    """Each request as one right-padded sequence: the kept tokens but the last; the scored
    continuation tokens are predicted by the last positions."""
    max_seq_len, device = model.config.max_seq_len, model.lm_head.weight.device
    inputs = [(r.context + r.continuation)[r.start(max_seq_len):-1] for r in requests]
    hidden, _ = model.model(_right_padded(inputs, max(map(len, inputs)), device))
    scored = [r.scored(max_seq_len) for r in requests]
    spans = [(len(ids) - len(s), s) for ids, s in zip(inputs, scored, strict=True)]
    return _continuation_scores(model, hidden, spans)


def _continuation_scores(model: NormLM, hidden: torch.Tensor,
                         spans: list[tuple[int, list[int]]]) -> list[Score]:
    """Per row r with span (first, targets): sum_t log_softmax(lm_head(hidden[r, first + t]))
    [targets_t] in fp32, and whether every target is the argmax."""
    device = hidden.device
    rows = torch.tensor([row for row, (_, ts) in enumerate(spans) for _ in ts], device=device)
    columns = [first + t for first, ts in spans for t in range(len(ts))]
    targets = torch.tensor([token for _, ts in spans for token in ts], device=device)
    selected = hidden[rows, torch.tensor(columns, device=device)]
    token_logprobs, hits = [], []
    chunk = max(1, LOGPROB_ELEMENTS // model.config.vocab_size)
    for begin in range(0, len(rows), chunk):
        logprobs = model.lm_head(selected[begin:begin + chunk]).float().log_softmax(-1)
        chunk_targets = targets[begin:begin + chunk, None]
        token_logprobs.append(logprobs.gather(1, chunk_targets)[:, 0])
        hits.append(logprobs.argmax(-1) == chunk_targets[:, 0])
    totals = torch.zeros(len(spans), dtype=torch.float64, device=device).index_add_(
        0, rows, torch.cat(token_logprobs).double())
    misses = torch.zeros(len(spans), dtype=torch.long, device=device).index_add_(
        0, rows, (~torch.cat(hits)).long())
    return [Score(total, miss == 0) for total, miss in
            zip(totals.tolist(), misses.tolist(), strict=True)]


def _right_padded(sequences: list[list[int]], width: int, device: torch.device) -> torch.Tensor:
    """(len(sequences), width) token ids, each row padded on the right with id 0."""
    return torch.tensor([s + [0] * (width - len(s)) for s in sequences], device=device)
