"""Data pipeline: default corpus, tokenizers, streaming prepare, shards, batching, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from normlab.data import corpus
from normlab.data.corpus import default_corpus_text, iter_chunks, iter_texts
from normlab.data.shards import (
    BatchSampler,
    TokenShards,
    eval_batches,
    prepare,
    prepare_or_load,
    read_meta,
    unigram_loss,
)
from normlab.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    load_tokenizer,
    train_bpe,
)
from normlab.errors import DataError

SHARED = Path("/work/shared/data")
GPT2_DIR = SHARED / "gpt2_tokenizer"
needs_gpt2 = pytest.mark.skipif(not (GPT2_DIR / "vocab.json").is_file(), reason="no GPT-2 files")
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="no shared data folder")
BYTE = ByteTokenizer()


class WideTokenizer(Tokenizer):
    """A fake tokenizer with ids above 65535: one id per character, offset by 65536."""

    def __init__(self) -> None:
        self.name, self.vocab_size, self.eos_id = "wide", 70_000, 69_999

    def encode(self, text: str) -> list[int]:
        return [65_536 + ord(c) for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(i - 65_536) for i in ids if i != self.eos_id)

    def save(self, directory) -> Path:
        Path(directory).mkdir(parents=True, exist_ok=True)
        return Path(directory)

    def fingerprint(self) -> str:
        return "wide"


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", newline="")
    return path


def all_tokens(shards: TokenShards) -> np.ndarray:
    """A split's tokens read straight from its shard files (independently of ``read``)."""
    files = [shards.directory / e["file"] for e in shards.meta["shards"][shards.split]]
    return np.concatenate([np.fromfile(f, shards.dtype) for f in files] or [np.empty(0, shards.dtype)])


def expected_split(docs: list[str], tokenizer: Tokenizer, val_fraction: float) -> dict[str, list[int]]:
    """The documented split rule, spelled out: a document is val while val < fraction of all."""
    ids: dict[str, list[int]] = {"train": [], "val": []}
    for doc in docs:
        total = len(ids["train"]) + len(ids["val"])
        split = "val" if len(ids["val"]) < val_fraction * total else "train"
        ids[split] += tokenizer.encode(doc) + [tokenizer.eos_id]
    return ids


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    """Byte-level shards of 40 short distinct documents, 97 tokens per shard."""
    docs = [f"document {i}: " + "abcdefghij"[i % 10] * (20 + i) for i in range(40)]
    write(tmp_path / "corpus.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare(tmp_path / "corpus.jsonl", BYTE, tmp_path / "shards", shard_tokens=97, val_fraction=0.2, progress=False)
    return tmp_path / "shards"


# --- default corpus -------------------------------------------------------------------------


@pytest.mark.slow
def test_default_corpus_is_deterministic_across_processes_and_sized():
    code = (
        "import hashlib\nfrom normlab.data.corpus import default_corpus_text as t\n"
        "print(hashlib.sha256(t().encode()).hexdigest(), len(t()))"
    )
    # The second process first imports packages that patch standard-library classes (e.g.
    # transformers adds logging.Logger.warning_advice); the corpus must not change.
    patching = "import contextlib\nwith contextlib.suppress(ImportError):\n    import transformers\n"
    runs = [
        subprocess.Popen([sys.executable, "-c", prefix + code], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONHASHSEED": seed})
        for seed, prefix in (("1", ""), ("2", patching))
    ]
    outputs = [run.communicate(timeout=120)[0].split() for run in runs]
    assert all(run.returncode == 0 for run in runs)
    assert outputs[0] == outputs[1]
    assert outputs[0][0] == hashlib.sha256(default_corpus_text().encode()).hexdigest()
    assert 800_000 < int(outputs[0][1]) < 5_000_000
    docs = list(iter_texts("default"))
    assert len(docs) > 2000 and "\n\n".join(docs) == default_corpus_text()


# --- tokenizers -----------------------------------------------------------------------------


def test_byte_tokenizer_round_trip_and_save(tmp_path: Path):
    text = "Grüße, 世界 🙂\n\ttabs"
    ids = BYTE.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert (BYTE.vocab_size, BYTE.eos_id) == (257, 256)
    assert BYTE.decode(ids + [BYTE.eos_id]) == text
    loaded = load_tokenizer(BYTE.save(tmp_path / "tok"))
    assert isinstance(loaded, ByteTokenizer) and loaded.encode(text) == ids


@needs_gpt2
def test_gpt2_tokenizer_ids_and_round_trip(tmp_path: Path):
    tok = load_tokenizer(GPT2_DIR)
    assert isinstance(tok, BPETokenizer)
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("First Citizen:\nBefore we proceed") == [5962, 22307, 25, 198, 8421, 356, 5120]
    assert (tok.vocab_size, tok.eos_id) == (50257, 50256)
    text = "Héllo wörld, 日本語 text\n  with  spaces."
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("a<|endoftext|>b") == [64, 50256, 65]
    saved = load_tokenizer(tok.save(tmp_path / "gpt2"))
    assert saved.encode(text) == tok.encode(text) and saved.fingerprint() == tok.fingerprint()


def test_train_bpe_round_trips_and_is_deterministic(tmp_path: Path):
    texts = list(iter_texts("default"))[:300]
    first, second = train_bpe(texts, 400), train_bpe(texts, 400)
    assert first.vocab_size == 400 and first.fingerprint() == second.fingerprint()
    sample = "The statement returns the value. Ünïcode ✓"
    ids = first.encode(sample)
    assert ids == second.encode(sample) and len(ids) < len(sample.encode())
    assert first.decode(ids) == sample and max(ids) < first.vocab_size
    assert load_tokenizer(first.save(tmp_path / "bpe")).encode(sample) == ids
    with pytest.raises(DataError, match="vocab_size 100 is below 257"):
        train_bpe(texts, 100)


# --- prepare and shards ---------------------------------------------------------------------


def test_prepare_writes_exactly_the_encoded_documents(tmp_path: Path):
    files = {
        "a.txt": "first document\r\nwith CRLF\n",
        "b.md": "# second\n\nmarkdown ü\n",
        "c.jsonl": '{"text": "third"}\n\n{"text": "fourth, ☃", "id": 4}\n',
        "sub/d.text": "fifth " * 30,
        "sub/blank.txt": " \n\n",
        ".hidden/e.txt": "hidden, skipped",
        "f.csv": "not a corpus suffix",
    }
    for name, content in files.items():
        write(tmp_path / "corpus" / name, content)
    docs = ["first document\nwith CRLF\n", "# second\n\nmarkdown ü\n", "third", "fourth, ☃", "fifth " * 30]
    assert list(iter_texts(tmp_path / "corpus")) == docs
    meta = prepare(tmp_path / "corpus", BYTE, tmp_path / "out", shard_tokens=16, val_fraction=0.3, progress=False)
    expected = expected_split(docs, BYTE, 0.3)
    assert meta["dtype"] == "uint16" and meta["documents"] == {"train": 4, "val": 1}
    for split in ("train", "val"):
        shards = TokenShards(tmp_path / "out", split)
        assert len(shards) == len(expected[split]) == meta["tokens"][split]
        assert shards.read(0, len(shards)).tolist() == expected[split]
        assert all_tokens(shards).tolist() == expected[split]
        assert all(e["tokens"] <= 16 for e in meta["shards"][split])
    assert (tmp_path / "out" / "train_000.bin").stat().st_size == 16 * 2
    assert isinstance(load_tokenizer(tmp_path / "out" / "tokenizer"), ByteTokenizer)


def test_prepare_uses_uint32_for_large_vocabularies(tmp_path: Path):
    write(tmp_path / "a.txt", "wide ids")
    write(tmp_path / "b.txt", "more")
    meta = prepare([tmp_path / "a.txt", tmp_path / "b.txt"], WideTokenizer(), tmp_path / "out", progress=False)
    train = TokenShards(tmp_path / "out", "train")
    assert meta["dtype"] == "uint32" and train.dtype == np.uint32
    assert train.read(0, len(train)).tolist() == WideTokenizer().encode("wide ids") + [69_999]
    assert (tmp_path / "out" / "train_000.bin").stat().st_size == 4 * len(train)


def test_single_document_gives_val_its_tail(tmp_path: Path):
    text = "".join(f"line {i}\n" for i in range(500))
    write(tmp_path / "one.txt", text)
    prepare(tmp_path / "one.txt", BYTE, tmp_path / "out", shard_tokens=300, val_fraction=0.1, progress=False)
    train, val = TokenShards(tmp_path / "out", "train"), TokenShards(tmp_path / "out", "val")
    ids = BYTE.encode(text) + [BYTE.eos_id]
    assert len(val) == round(len(ids) * 0.1)
    assert all_tokens(train).tolist() + all_tokens(val).tolist() == ids
    on_disk = {p.name for p in (tmp_path / "out").glob("*.bin")}
    assert on_disk == {e["file"] for split in ("train", "val") for e in train.meta["shards"][split]}


def test_long_documents_stream_in_pieces_with_exact_replacement_count(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(corpus, "CHUNK_CHARS", 7)
    raw = "héllo wörld\r\n".encode() + b"bad \xff\xfe here " + "\ufffd kept ☃\n".encode() + b"\xe2\x98"
    write(tmp_path / "doc.txt", raw)
    with pytest.warns(UnicodeWarning, match=r"doc\.txt': 3 invalid UTF-8"):
        chunks = list(iter_chunks(tmp_path / "doc.txt"))
    assert len(chunks) > 3 and [last for _, last in chunks] == [False] * (len(chunks) - 1) + [True]
    assert "".join(t for t, _ in chunks) == raw.decode("utf-8", errors="replace").replace("\r\n", "\n")


def test_jsonl_non_utf8_warns_once_with_count(tmp_path: Path):
    write(tmp_path / "c.jsonl", b'{"text": "ok \xff"}\n{"text": "also \xff\xff"}\n')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert list(iter_texts(tmp_path / "c.jsonl")) == ["ok \ufffd", "also \ufffd\ufffd"]
    assert [str(w.message) for w in caught] == [
        f"corpus file '{tmp_path / 'c.jsonl'}': 3 invalid UTF-8 byte sequence(s) replaced with U+FFFD"
    ]


@pytest.mark.slow
def test_prepare_memory_stays_flat(tmp_path: Path):
    letters = np.frombuffer(b"abcdefghij klmnopqrst", np.uint8)
    lines = np.random.default_rng(0).choice(letters, (16_384, 64))
    lines[:, -1] = ord("\n")
    block = lines.tobytes()  # 1 MiB of random 64-byte lines
    size = 0
    with (tmp_path / "big.txt").open("wb") as f:
        while size < 64 << 20:
            f.write(block)
            size += len(block)
    script = f"""
import resource
from pathlib import Path
from normlab.data.shards import prepare, TokenShards
from normlab.data.tokenizers import ByteTokenizer
Path({str(tmp_path / 'small.txt')!r}).write_text("warm up\\n")
prepare({str(tmp_path / 'small.txt')!r}, ByteTokenizer(), {str(tmp_path / 'warm')!r}, progress=False)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
meta = prepare({str(tmp_path / 'big.txt')!r}, ByteTokenizer(), {str(tmp_path / 'out')!r}, progress=False, shard_tokens=1 << 24)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(after - before, meta["tokens"]["train"] + meta["tokens"]["val"])
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    grown_kb, tokens = map(int, result.stdout.split())
    assert tokens == size + 1
    assert grown_kb * 1024 < min(0.5 * size, 150 << 20), f"peak RSS grew by {grown_kb} kB for {size} bytes"


def test_prepare_or_load_reuses_matching_shards(tmp_path: Path):
    write(tmp_path / "a.txt", "alpha " * 50)
    write(tmp_path / "b.txt", "beta " * 50)
    source = [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    first = prepare_or_load(source, "byte", tmp_path / "cache", progress=False)
    stamp = (first / "meta.json").stat().st_mtime_ns
    assert prepare_or_load(source, "byte", tmp_path / "cache", progress=False) == first
    assert (first / "meta.json").stat().st_mtime_ns == stamp
    with open(first / "train_000.bin", "r+b") as f:
        f.truncate(10)
    assert prepare_or_load(source, "byte", tmp_path / "cache", progress=False) == first
    assert len(TokenShards(first, "train")) == 301
    write(tmp_path / "b.txt", "changed " * 50)
    assert prepare_or_load(source, "byte", tmp_path / "cache", progress=False) != first


def test_prepare_or_load_trains_and_caches_bpe(tmp_path: Path):
    write(tmp_path / "a.txt", "".join(f"the quick brown fox {i} jumps\n" for i in range(300)))
    out = prepare_or_load(tmp_path / "a.txt", "bpe:300", tmp_path / "cache", progress=False)
    tok = load_tokenizer(out / "tokenizer")
    assert tok.vocab_size == 300 and read_meta(out)["vocab_size"] == 300
    train, val = TokenShards(out, "train"), TokenShards(out, "val")
    ids = all_tokens(train).tolist() + all_tokens(val).tolist()
    assert tok.decode(ids) == (tmp_path / "a.txt").read_text()
    assert len(list((tmp_path / "cache").glob("tokenizer-bpe-300-*"))) == 1
    assert prepare_or_load(tmp_path / "a.txt", "bpe:300", tmp_path / "cache", progress=False) == out


def test_unigram_loss_is_the_train_token_entropy_and_cached(tmp_path: Path):
    # train: "aaab" + eos (document 0), val: "zz" + eos (document 1, not counted);
    # p = 3/5, 1/5, 1/5 -> H = -(0.6 ln 0.6 + 2 * 0.2 ln 0.2) = 0.950271 nats
    write(tmp_path / "corpus.jsonl", '{"text": "aaab"}\n{"text": "zz"}\n')
    prepare(tmp_path / "corpus.jsonl", BYTE, tmp_path / "out", shard_tokens=2, val_fraction=0.5, progress=False)
    assert len(TokenShards(tmp_path / "out", "val")) == 3
    expected = -(0.6 * np.log(0.6) + 2 * 0.2 * np.log(0.2))
    assert unigram_loss(tmp_path / "out") == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.950271, abs=1e-6)
    cache = tmp_path / "out" / "unigram.json"
    cached = json.loads(cache.read_text())
    cache.write_text(json.dumps({**cached, "unigram_loss": 9.0}))
    assert unigram_loss(tmp_path / "out") == 9.0  # read from the cache, not counted again
    cache.write_text(json.dumps({**cached, "fingerprint": "older shards", "unigram_loss": 9.0}))
    assert unigram_loss(tmp_path / "out") == pytest.approx(expected)  # another prepare: counted again


def test_failed_prepare_leaves_no_meta(tmp_path: Path):
    write(tmp_path / "good.txt", "good " * 20)
    prepare(tmp_path / "good.txt", BYTE, tmp_path / "out", progress=False)
    write(tmp_path / "bad.jsonl", '{"text": "fine"}\n{"txt": "oops"}\n')
    with pytest.raises(DataError):
        prepare([tmp_path / "good.txt", tmp_path / "bad.jsonl"], BYTE, tmp_path / "out", progress=False)
    with pytest.raises(DataError, match="no meta.json"):
        TokenShards(tmp_path / "out", "train")


@needs_shared
def test_real_corpora_byte_counts(tmp_path: Path):
    shakespeare = SHARED / "tinyshakespeare" / "input.txt"
    wiki = SHARED / "wikitext2_raw_test" / "wiki.test.raw"
    meta = read_meta(prepare_or_load([shakespeare, wiki], "byte", tmp_path / "cache", progress=False))
    expected = len(shakespeare.read_bytes()) + 1 + len(wiki.read_bytes().replace(b"\r\n", b"\n")) + 1
    assert meta["tokens"]["train"] + meta["tokens"]["val"] == expected
    assert meta["documents"] == {"train": 1, "val": 1}


# --- batching -------------------------------------------------------------------------------


def test_batch_sampler_is_a_pure_function_of_seed_and_step(shard_dir: Path):
    train = TokenShards(shard_dir, "train")
    sampler = BatchSampler(train, batch_size=6, seq_len=40, seed=3)
    x, y = sampler.batch(5)
    again = BatchSampler(TokenShards(shard_dir, "train"), batch_size=6, seq_len=40, seed=3).batch(5)
    assert x.shape == y.shape == (6, 40) and str(x.dtype) == "torch.int64"
    assert x.equal(again[0]) and y.equal(again[1])
    assert not x.equal(sampler.batch(6)[0])
    assert not x.equal(BatchSampler(train, 6, 40, seed=4).batch(5)[0])
    assert x[:, 1:].equal(y[:, :-1])
    windows = sliding_window_view(all_tokens(train).astype(np.int64), 41)
    for row_x, row_y in zip(x.numpy(), y.numpy(), strict=True):
        assert (windows == np.append(row_x, row_y[-1])).all(axis=1).any()


def test_batch_sampler_ranks_partition_the_global_batch(shard_dir: Path):
    train = TokenShards(shard_dir, "train")
    whole = BatchSampler(train, 8, 16, seed=0).batch(11)[0]
    ranks = [BatchSampler(train, 4, 16, seed=0, rank=r, world_size=2).batch(11)[0] for r in (0, 1)]
    assert not ranks[0].equal(ranks[1])
    assert whole.equal(torch.cat(ranks))


def test_read_across_shard_boundaries(shard_dir: Path):
    train = TokenShards(shard_dir, "train")
    assert len(train.meta["shards"]["train"]) > 3
    full = all_tokens(train)
    for start in (0, 90, 96, 97, 193, len(train) - 5):
        assert train.read(start, 5).tolist() == full[start : start + 5].tolist()
    with pytest.raises(IndexError):
        train.read(len(train) - 2, 5)


def test_eval_batches_are_consecutive_and_repeatable(shard_dir: Path):
    val = TokenShards(shard_dir, "val")
    full = all_tokens(val).astype(np.int64)
    batches = list(eval_batches(val, batch_size=3, seq_len=10))
    assert len(batches) == -(-((len(val) - 1) // 10) // 3)
    assert [b[0].tolist() for b in batches] == [b[0].tolist() for b in eval_batches(val, 3, 10)]
    xs = np.concatenate([b[0].numpy() for b in batches])
    ys = np.concatenate([b[1].numpy() for b in batches])
    assert xs.reshape(-1).tolist() == full[: xs.size].tolist()
    assert ys.reshape(-1).tolist() == full[1 : xs.size + 1].tolist()
    assert len(list(eval_batches(val, 3, 10, max_batches=2))) == 2


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "files,spec,match",
    [
        ({}, "missing.txt", r"corpus '.*missing\.txt': no such file or directory"),
        ({}, "nothing/*.txt", r"corpus '.*nothing/\*\.txt': glob matches no files"),
        ({"empty.txt": ""}, "empty.txt", r"corpus '.*empty\.txt' is empty"),
        ({"blank.txt": " \n \n", "e.jsonl": '{"text": ""}\n'}, ["blank.txt", "e.jsonl"], r"corpus '.*blank\.txt, .*e\.jsonl' is empty"),
        ({"d/x.csv": "a,b"}, "d", r"corpus '.*d': no \.jsonl/\.md/\.text/\.txt files in directory"),
        ({"c.jsonl": '{"text": "a"}\n{"body": "b"}\n'}, "c.jsonl", r"c\.jsonl' line 2: no \"text\" string field"),
        ({"c.jsonl": '{"text": "a"}\n\n{"text": \n'}, "c.jsonl", r"c\.jsonl' line 3: not valid JSON"),
    ],
)
def test_bad_corpus_raises_data_error(tmp_path: Path, files, spec, match):
    for name, content in files.items():
        write(tmp_path / name, content)
    specs = [str(tmp_path / s) for s in spec] if isinstance(spec, list) else str(tmp_path / spec)
    with pytest.raises(DataError, match=match) as info:
        list(iter_texts(specs))
    assert "\n" not in str(info.value)


def test_split_shorter_than_seq_len(shard_dir: Path):
    val = TokenShards(shard_dir, "val")
    need = len(val)
    with pytest.raises(DataError, match=rf"val split of '.*' has {need} tokens; seq_len {need} needs at least {need + 1}"):
        BatchSampler(val, 2, need, seed=0)
    with pytest.raises(DataError, match=rf"has {need} tokens"):
        eval_batches(val, 2, need)
    BatchSampler(val, 2, need - 1, seed=0).batch(0)


def test_damaged_shards_are_detected(shard_dir: Path, tmp_path: Path):
    shard = shard_dir / "train_001.bin"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 1)
    with pytest.raises(DataError, match=r"train_001\.bin' has 193 bytes, meta\.json says 194"):
        TokenShards(shard_dir, "train")
    shard.unlink()
    with pytest.raises(DataError, match=r"train_001\.bin' is missing"):
        TokenShards(shard_dir, "train")
    with pytest.raises(DataError, match=r"'.*nowhere': no meta\.json"):
        TokenShards(tmp_path / "nowhere", "train")
    with pytest.raises(DataError, match="no split 'test'"):
        TokenShards(shard_dir, "test")


def test_bad_tokenizer_specs(tmp_path: Path):
    with pytest.raises(DataError, match=r"tokenizer 'gpt3': expected 'byte' or a tokenizer directory"):
        load_tokenizer("gpt3")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"neither normlab_tokenizer\.json nor vocab\.json \+ merges\.txt"):
        load_tokenizer(tmp_path / "empty")
    write(tmp_path / "half" / "normlab_tokenizer.json", '{"kind": "bpe", "eos_id": 0}')
    with pytest.raises(DataError, match=r"tokenizer\.json is missing"):
        load_tokenizer(tmp_path / "half")
    with pytest.raises(DataError, match=r"'bpe:512' is trained from a corpus"):
        load_tokenizer("bpe:512")
