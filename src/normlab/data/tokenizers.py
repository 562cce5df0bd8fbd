"""Tokenizers behind one small interface: UTF-8 bytes, and GPT-2-style byte-level BPE.

``load_tokenizer(spec)`` accepts ``"byte"``, a directory written by ``Tokenizer.save``, or a
directory holding GPT-2 ``vocab.json`` + ``merges.txt``. Decoding skips the end-of-text id.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from normlab.errors import DataError

EOS = "<|endoftext|>"
"""The end-of-text token of BPE tokenizers (the GPT-2 convention)."""

META_FILE = "normlab_tokenizer.json"
HF_FILE = "tokenizer.json"


class Tokenizer(ABC):
    """Text <-> token ids. ``eos_id`` ends every document; ids are in ``[0, vocab_size)``."""

    name: str
    vocab_size: int
    eos_id: int

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no end-of-text id is added)."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, skipping the end-of-text id."""

    @abstractmethod
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the tokenizer to ``directory`` (created if needed) so ``load_tokenizer`` reads it."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A string that changes whenever the id mapping changes (used to cache token shards)."""

    def hf_tokenizer(self) -> HFTokenizer:
        """The same id mapping as a Hugging Face ``tokenizers`` object (what ``tokenizer.json``
        holds), for export; the end-of-text token is a special token."""
        raise DataError(f"tokenizer '{self.name}' has no Hugging Face tokenizer.json form")

    def _write_meta(self, directory: str | os.PathLike[str], kind: str, **extra: Any) -> Path:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        meta = {
            "kind": kind,
            "name": self.name,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            **extra,
        }
        (path / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return path


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255 plus end-of-text id 256."""

    def __init__(self) -> None:
        self.name, self.vocab_size, self.eos_id = "byte", 257, 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i != self.eos_id).decode("utf-8", errors="replace")

    def save(self, directory: str | os.PathLike[str]) -> Path:
        return self._write_meta(directory, "byte")

    def fingerprint(self) -> str:
        return "byte"

    def hf_tokenizer(self) -> HFTokenizer:
        """A byte-level BPE without merges: byte b is GPT-2's printable symbol for b with id b;
        ``<|endoftext|>`` is the special token 256."""
        vocab = {symbol: byte for byte, symbol in enumerate(_byte_symbols())}
        tokenizer = _byte_level(models.BPE(vocab, []))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tokenizer.add_special_tokens([AddedToken(EOS, special=True)])
        return tokenizer


def _byte_symbols() -> list[str]:
    """GPT-2's byte -> printable character table (the alphabet of the ByteLevel pre-tokenizer):
    printable Latin-1 bytes stand for themselves, the others for chr(256), chr(257), ..."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)}
    symbols, shifted = [], 256
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(shifted))
            shifted += 1
    return symbols


class BPETokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` byte-level BPE; the end-of-text token ``eos_token``
    (default ``<|endoftext|>``; an imported model's own, e.g. ``</s>``) is added when missing."""

    def __init__(self, tokenizer: HFTokenizer, name: str = "bpe", eos_token: str = EOS) -> None:
        tokenizer.add_special_tokens([AddedToken(eos_token, special=True)])  # reuses an existing id
        self._tokenizer = tokenizer
        self.name = name
        self.eos_token = eos_token
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_id = tokenizer.token_to_id(eos_token)

    @classmethod
    def from_gpt2_files(
        cls,
        vocab_json: str | os.PathLike[str],
        merges_txt: str | os.PathLike[str],
        name: str = "gpt2",
    ) -> BPETokenizer:
        """Build the GPT-2 tokenizer from its ``vocab.json`` and ``merges.txt``."""
        for path in (vocab_json, merges_txt):
            if not Path(path).is_file():
                raise DataError(f"tokenizer file '{path}' does not exist")
        try:
            model = models.BPE.from_file(os.fspath(vocab_json), os.fspath(merges_txt))
        except Exception as err:
            raise DataError(
                f"tokenizer files '{vocab_json}', '{merges_txt}' are unreadable: {err}"
            ) from None
        return cls(_byte_level(model), name)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self._tokenizer.save(os.fspath(path / HF_FILE))
        extra = {} if self.eos_token == EOS else {"eos_token": self.eos_token}
        return self._write_meta(path, "bpe", **extra)  # last: the meta marks a complete save

    def fingerprint(self) -> str:
        return "bpe:" + hashlib.sha256(self._tokenizer.to_str().encode()).hexdigest()

    def hf_tokenizer(self) -> HFTokenizer:
        return HFTokenizer.from_str(self._tokenizer.to_str())  # a copy


def _byte_level(model: models.Model) -> HFTokenizer:
    """A GPT-2-style tokenizer around a BPE model: byte-level pre-tokenizer and decoder."""
    tokenizer = HFTokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int, name: str | None = None) -> BPETokenizer:
    """Train a byte-level BPE with ``<|endoftext|>`` on ``texts`` (deterministic for equal input)."""
    minimum = len(pre_tokenizers.ByteLevel.alphabet()) + 1
    if vocab_size < minimum:
        raise DataError(f"BPE vocab_size {vocab_size} is below {minimum} (256 bytes + {EOS})")
    tokenizer = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return BPETokenizer(tokenizer, name or f"bpe-{vocab_size}")


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"tokenizer meta '{path}' is unreadable: {err}") from None
    if not isinstance(meta, dict):
        raise DataError(f"tokenizer meta '{path}' is not a JSON object")
    return meta


def load_tokenizer(spec: str | os.PathLike[str]) -> Tokenizer:
    """Load ``"byte"``, a directory written by ``save``, or a GPT-2 ``vocab.json``/``merges.txt`` dir."""
    if spec == "byte":
        return ByteTokenizer()
    if os.fspath(spec).startswith("bpe:"):
        raise DataError(f"tokenizer '{spec}' is trained from a corpus: use prepare_or_load")
    directory = Path(spec).expanduser()
    if not directory.is_dir():
        raise DataError(f"tokenizer '{spec}': expected 'byte' or a tokenizer directory, none found")
    if (directory / META_FILE).is_file():
        meta = _read_meta(directory / META_FILE)
        kind = meta.get("kind")
        if kind == "byte":
            return ByteTokenizer()
        if kind != "bpe":
            raise DataError(f"tokenizer '{spec}': unknown kind {kind!r} in {META_FILE}")
        if not (directory / HF_FILE).is_file():
            raise DataError(f"tokenizer '{spec}': {HF_FILE} is missing")
        try:
            tokenizer = HFTokenizer.from_file(os.fspath(directory / HF_FILE))
        except Exception as err:
            raise DataError(f"tokenizer '{spec}': {HF_FILE} is unreadable: {err}") from None
        return BPETokenizer(tokenizer, str(meta.get("name", "bpe")), str(meta.get("eos_token", EOS)))
    if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        return BPETokenizer.from_gpt2_files(directory / "vocab.json", directory / "merges.txt")
    raise DataError(
        f"tokenizer '{spec}': directory has neither {META_FILE} nor vocab.json + merges.txt"
    )
