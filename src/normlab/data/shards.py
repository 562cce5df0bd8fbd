"""Token shards on disk: streaming ``prepare``, memory-mapped reading and stateless batching.

Layout of a shard directory: ``train_000.bin``, ``train_001.bin``, ..., ``val_000.bin``, ... (raw
token ids in native byte order, ``uint16`` when the vocabulary fits, else ``uint32``), the tokenizer in
``tokenizer/``, and ``meta.json``, written last and atomically, so a directory with a
``meta.json`` always has complete shards. ``unigram.json`` caches the train split's unigram
loss (``unigram_loss``), computed the first time it is asked for.

Train/val split: documents are streamed in corpus order and each whole document goes to ``val``
when, at its start, val holds fewer than ``val_fraction`` of all tokens written so far, else to
``train``. So document 0 is train, document 1 is val (whenever ``val_fraction > 0``), and the val
share tracks ``val_fraction`` in tokens. A single-document corpus gives val the last
``val_fraction`` of its tokens instead.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from tqdm import tqdm

from normlab.data.corpus import CorpusSource, iter_chunks, iter_texts, source_signature
from normlab.data.tokenizers import Tokenizer, load_tokenizer, train_bpe
from normlab.errors import DataError

FORMAT_VERSION = 1
META_FILE = "meta.json"
UNIGRAM_FILE = "unigram.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 1 << 26
_COPY_TOKENS = 1 << 20
_COUNT_TOKENS = 1 << 24


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a vocabulary."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _fingerprint(
    signature: list[str], tokenizer: Tokenizer, val_fraction: float, shard_tokens: int
) -> str:
    payload = {
        "format": FORMAT_VERSION,
        "source": signature,
        "tokenizer": tokenizer.fingerprint(),
        "val_fraction": val_fraction,
        "shard_tokens": shard_tokens,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class _ShardWriter:
    """Append token arrays to ``{split}_NNN.bin`` files of at most ``shard_tokens`` tokens each."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory, self.split = directory, split
        self.dtype, self.shard_tokens = dtype, shard_tokens
        self.sizes: list[int] = []
        self.tokens = 0
        self._file: BinaryIO | None = None

    def path(self, index: int) -> Path:
        return self.directory / f"{self.split}_{index:03d}.bin"

    def write(self, ids: np.ndarray) -> None:
        while ids.size:
            if self._file is None or self.sizes[-1] == self.shard_tokens:
                self.close()
                self._file = self.path(len(self.sizes)).open("wb", buffering=1 << 20)
                self.sizes.append(0)
            piece, ids = np.split(ids, [self.shard_tokens - self.sizes[-1]])
            self._file.write(piece.tobytes())
            self.sizes[-1] += piece.size
            self.tokens += piece.size

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def pop_tail(self, count: int) -> Iterator[np.ndarray]:
        """Yield the last ``count`` tokens in order, in blocks, truncating the shards behind them."""
        self.close()
        keep, offset, kept_sizes = self.tokens - count, 0, []
        for index, size in enumerate(self.sizes):
            start = min(max(keep - offset, 0), size)
            path = self.path(index)
            for pos in range(start, size, _COPY_TOKENS):
                yield np.fromfile(
                    path,
                    self.dtype,
                    min(_COPY_TOKENS, size - pos),
                    offset=pos * self.dtype.itemsize,
                )
            if start == 0:
                path.unlink()
            elif start < size:
                os.truncate(path, start * self.dtype.itemsize)
            if start:
                kept_sizes.append(start)
            offset += size
        self.sizes, self.tokens = kept_sizes, keep


def _clear(directory: Path) -> None:
    """Remove a previous prepare's meta.json (first) and shards from ``directory``."""
    (directory / META_FILE).unlink(missing_ok=True)
    for split in SPLITS:
        for path in directory.glob(f"{split}_*.bin"):
            path.unlink()


def prepare(
    source: CorpusSource,
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike[str],
    *,
    val_fraction: float = 0.05,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize a corpus into train/val shards under ``out_dir`` and return the written meta.

    Documents are streamed piece by piece and each is followed by ``tokenizer.eos_id``; memory
    stays flat in the corpus size. Replaces any earlier shards in ``out_dir``. Raises
    ``DataError`` for a bad corpus (see ``iter_chunks``) and ``ValueError`` for bad arguments.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    signature = source_signature(source)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clear(out)
    dtype = token_dtype(tokenizer.vocab_size)
    eos = np.array([tokenizer.eos_id], dtype)
    writers = {split: _ShardWriter(out, split, dtype, shard_tokens) for split in SPLITS}
    train, val = writers["train"], writers["val"]
    documents = dict.fromkeys(SPLITS, 0)
    bar = tqdm(
        desc=f"tokenizing into {out}",
        unit="tok",
        unit_scale=True,
        disable=not (progress and sys.stderr.isatty()),
    )
    try:
        writer, starts_document = train, True
        for text, ends_document in iter_chunks(source):
            if starts_document:
                writer = val if val.tokens < val_fraction * (train.tokens + val.tokens) else train
                documents[writer.split] += 1
            ids = np.asarray(tokenizer.encode(text), dtype)
            writer.write(ids)
            if ends_document:
                writer.write(eos)
            bar.update(ids.size + ends_document)
            starts_document = ends_document
        if val.tokens == 0 and val_fraction > 0 and train.tokens >= 2:
            for block in train.pop_tail(
                min(train.tokens - 1, max(1, round(train.tokens * val_fraction)))
            ):
                val.write(block)
    finally:
        bar.close()
        for split_writer in writers.values():
            split_writer.close()
    tokenizer.save(out / TOKENIZER_DIR)
    meta = {
        "format": FORMAT_VERSION,
        "fingerprint": _fingerprint(signature, tokenizer, val_fraction, shard_tokens),
        "source": signature,
        "tokenizer": {
            "name": tokenizer.name,
            "dir": TOKENIZER_DIR,
            "fingerprint": tokenizer.fingerprint(),
        },
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "dtype": dtype.name,
        "val_fraction": val_fraction,
        "shard_tokens": shard_tokens,
        "documents": documents,
        "tokens": {split: w.tokens for split, w in writers.items()},
        "shards": {
            split: [{"file": w.path(i).name, "tokens": n} for i, n in enumerate(w.sizes)]
            for split, w in writers.items()
        },
    }
    _write_json(out / META_FILE, meta)
    return meta


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically (a temporary file named by the process, then a rename)."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temporary, path)


def read_meta(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``meta.json`` of a shard directory; ``DataError`` when missing or unreadable."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise DataError(f"token shards '{directory}': no {META_FILE} (run prepare first)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"token shards '{directory}': {META_FILE} is unreadable: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise DataError(
            f"token shards '{directory}': {META_FILE} is not format {FORMAT_VERSION}; prepare again"
        )
    return meta


def unigram_loss(directory: str | os.PathLike[str]) -> float:
    """The unigram loss of a shard directory in nats/token: the entropy H = -sum_v p_v ln p_v of
    the token frequencies p_v of its train split, the loss of a model that learned only how often
    each token occurs. Counted once and cached in ``unigram.json`` (keyed by the shards'
    fingerprint, so shards prepared again are counted again)."""
    meta = read_meta(directory)
    path = Path(directory) / UNIGRAM_FILE
    try:
        cached = json.loads(path.read_text())
        if cached["fingerprint"] == meta["fingerprint"]:
            return float(cached["unigram_loss"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not counted yet, or unreadable: count again
    shards = TokenShards(directory, "train")
    if not len(shards):
        raise DataError(f"token shards '{directory}': the train split is empty")
    counts = np.zeros(shards.vocab_size, np.int64)
    for start in range(0, len(shards), _COUNT_TOKENS):
        block = shards.read(start, min(_COUNT_TOKENS, len(shards) - start))
        counts += np.bincount(block, minlength=shards.vocab_size)
    p = counts[counts > 0] / len(shards)
    entropy = float(-(p * np.log(p)).sum())
    _write_json(path, {"fingerprint": meta["fingerprint"], "unigram_loss": entropy, "tokens": len(shards)})
    return entropy


def _tokenizer_for(
    source: CorpusSource, spec: str | os.PathLike[str], signature: list[str], cache_dir: Path
) -> Tokenizer:
    """Load a tokenizer spec; ``"bpe:N"`` trains an N-token BPE on the corpus once and caches it."""
    text = os.fspath(spec)
    if not text.startswith("bpe:"):
        return load_tokenizer(spec)
    if not text[4:].isdigit():
        raise DataError(f"tokenizer '{text}': expected bpe:N with an integer N, e.g. bpe:4096")
    key = hashlib.sha256(json.dumps([signature, text]).encode()).hexdigest()[:16]
    directory = cache_dir / f"tokenizer-bpe-{text[4:]}-{key}"
    try:
        return load_tokenizer(directory)
    except DataError:
        pass  # not trained yet, or an interrupted save: train again
    tokenizer = train_bpe(iter_texts(source), int(text[4:]))
    tokenizer.save(directory)
    return tokenizer


def prepare_or_load(
    source: CorpusSource,
    tokenizer_spec: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    *,
    val_fraction: float = 0.05,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    progress: bool = True,
) -> Path:
    """Return ``cache_dir/<tokenizer>-<fingerprint>``, preparing it unless intact shards exist.

    ``tokenizer_spec`` is anything ``load_tokenizer`` accepts, or ``"bpe:N"`` to train (once,
    cached in ``cache_dir``) an N-token byte-level BPE on the corpus. The fingerprint covers the
    corpus (paths, sizes, mtimes; the default corpus by content), the tokenizer's id mapping,
    ``val_fraction`` and ``shard_tokens``. The tokenizer is saved in the returned directory's
    ``tokenizer/`` (``load_tokenizer`` reads it).
    """
    cache = Path(cache_dir)
    signature = source_signature(source)
    tokenizer = _tokenizer_for(source, tokenizer_spec, signature, cache)
    fingerprint = _fingerprint(signature, tokenizer, val_fraction, shard_tokens)
    out = cache / f"{tokenizer.name}-{fingerprint[:16]}"
    try:
        if read_meta(out)["fingerprint"] == fingerprint:
            for split in SPLITS:
                TokenShards(out, split)  # checks that every shard is complete
            return out
    except DataError:
        pass  # absent, stale or damaged: prepare again
    prepare(
        source,
        tokenizer,
        out,
        val_fraction=val_fraction,
        shard_tokens=shard_tokens,
        progress=progress,
    )
    return out


class TokenShards:
    """One split of a shard directory as a read-only sequence of token ids."""

    def __init__(self, directory: str | os.PathLike[str], split: str) -> None:
        self.directory, self.split = Path(directory), split
        self.meta = read_meta(directory)
        if split not in self.meta["shards"]:
            raise DataError(
                f"token shards '{directory}': no split {split!r} (have {', '.join(self.meta['shards'])})"
            )
        self.dtype = np.dtype(self.meta["dtype"])
        self.vocab_size: int = self.meta["vocab_size"]
        self.eos_id: int = self.meta["eos_id"]
        self._arrays: list[np.memmap] = []
        self._starts: list[int] = []
        total = 0
        for entry in self.meta["shards"][split]:
            path, tokens = self.directory / entry["file"], entry["tokens"]
            if not path.is_file():
                raise DataError(f"token shard '{path}' is missing; prepare again")
            expected = tokens * self.dtype.itemsize
            if path.stat().st_size != expected:
                raise DataError(
                    f"token shard '{path}' has {path.stat().st_size} bytes, {META_FILE} says "
                    f"{expected} (truncated or modified); prepare again"
                )
            self._arrays.append(np.memmap(path, self.dtype, mode="r", shape=(tokens,)))
            self._starts.append(total)
            total += tokens
        self._len = total

    def __len__(self) -> int:
        return self._len

    def read(self, start: int, count: int) -> np.ndarray:
        """Tokens ``[start, start + count)`` as a new array, across shard boundaries."""
        if start < 0 or count < 0 or start + count > self._len:
            raise IndexError(f"window [{start}, {start + count}) outside {self._len} tokens")
        pieces = []
        index = bisect.bisect_right(self._starts, start) - 1
        while count > 0:
            offset = start - self._starts[index]
            piece = self._arrays[index][offset : offset + count]
            pieces.append(piece)
            start, count, index = start + piece.size, count - piece.size, index + 1
        return np.concatenate(pieces) if pieces else np.empty(0, self.dtype)


def _check_windows(shards: TokenShards, batch_size: int, seq_len: int) -> None:
    """Validate batch arguments; ``DataError`` unless the split holds ``seq_len + 1`` tokens."""
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
    if len(shards) < seq_len + 1:
        raise DataError(
            f"{shards.split} split of '{shards.directory}' has {len(shards)} tokens; "
            f"seq_len {seq_len} needs at least {seq_len + 1}"
        )


def _as_tensors(windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``(batch, seq_len + 1)`` token windows into inputs and next-token targets."""
    tokens = torch.from_numpy(windows.astype(np.int64))
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


class BatchSampler:
    """Random training windows; ``batch(step)`` is a pure function of the arguments and ``step``.

    Each step draws ``world_size * batch_size`` window starts from
    ``np.random.default_rng([seed, step])`` and rank ``r`` takes the ``r``-th block of
    ``batch_size``. So the global batch of a step does not depend on how it is split across ranks,
    and resuming at a step needs no sampler state.
    """

    def __init__(
        self,
        shards: TokenShards,
        batch_size: int,
        seq_len: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        _check_windows(shards, batch_size, seq_len)
        self.shards, self.batch_size, self.seq_len = shards, batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` int64 tensors of shape ``(batch_size, seq_len)``; ``y`` is ``x`` shifted by one."""
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.shards) - self.seq_len, self.world_size * self.batch_size)
        mine = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return _as_tensors(np.stack([self.shards.read(int(s), self.seq_len + 1) for s in mine]))


def eval_batches(
    shards: TokenShards, batch_size: int, seq_len: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive non-overlapping windows from the start of a split, the same on every call.

    Window ``k`` has inputs ``[k * seq_len, (k + 1) * seq_len)``; the last batch may be smaller.
    """
    _check_windows(shards, batch_size, seq_len)
    windows = (len(shards) - 1) // seq_len
    if max_batches is not None:
        windows = min(windows, max_batches * batch_size)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for first in range(0, windows, batch_size):
            count = min(batch_size, windows - first)
            block = shards.read(first * seq_len, count * seq_len + 1)
            starts = np.arange(count)[:, None] * seq_len + np.arange(seq_len + 1)
            yield _as_tensors(block[starts])

    return batches()
