"""Corpus sources: the embedded default corpus and user text files, streamed as documents.

The default corpus needs no download: it is the text of ``pydoc_data.topics.topics`` (the
``help()`` topics, sorted by key) followed by the docstrings of a fixed, sorted list of pure-Python
standard-library modules (each module, its public classes with their public methods and
properties, and its public functions; duplicates dropped). Every CPython 3.10+ ships these, so the
corpus is identical across runs on the same Python version (it is smaller under ``python -OO``,
which strips docstrings). Measured on CPython 3.11.7: 2,287 documents, 1,041,390 characters,
1,042,571 bytes of UTF-8 (joined with blank lines), about 0.2 s to build.

User corpora are read as follows. Each ``.txt``/``.md``/``.text`` file is one document; each line
of a ``.jsonl`` file is one document (its ``"text"`` field). Files are streamed in line-aligned
pieces of about ``CHUNK_CHARS`` characters, CRLF line endings become LF, invalid UTF-8 is replaced
by U+FFFD with one ``UnicodeWarning`` per file, and documents with no non-whitespace text are
skipped.
"""

from __future__ import annotations

import codecs
import functools
import glob
import hashlib
import importlib
import inspect
import json
import os
import platform
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypeAlias

from normlab.errors import DataError

DEFAULT = "default"
"""The source spec that names the embedded default corpus."""

SUFFIXES = (".jsonl", ".md", ".text", ".txt")
"""File suffixes read when a corpus spec names a directory."""

CHUNK_CHARS = 1 << 16
"""Approximate size of the pieces a long document is streamed in."""

CorpusSource: TypeAlias = "str | os.PathLike[str] | Sequence[str | os.PathLike[str]]"

_STDLIB_MODULES = (
    "argparse", "ast", "base64", "calendar", "cmd", "code", "codecs", "collections",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "decimal", "difflib", "doctest",
    "email.message", "email.utils", "enum", "fileinput", "fnmatch", "fractions", "ftplib",
    "functools", "gettext", "glob", "gzip", "heapq", "hmac", "html.parser", "http.client",
    "http.cookiejar", "http.server", "imaplib", "inspect", "ipaddress", "json", "logging",
    "logging.handlers", "mailbox", "numbers", "optparse", "pathlib", "pdb", "pickletools",
    "plistlib", "poplib", "pprint", "pydoc", "queue", "quopri", "random", "re", "sched", "shlex",
    "shutil", "smtplib", "socketserver", "statistics", "string", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "tokenize", "traceback", "typing", "unittest.case",
    "unittest.mock", "urllib.parse", "urllib.request", "uuid", "wave", "weakref",
    "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zipimport",
)  # fmt: skip

_FFFD_UTF8 = "\ufffd".encode()


def _module_docstrings(module_name: str) -> Iterator[str | None]:
    """Docstrings of a module, its public classes (and their methods/properties) and functions."""
    module = importlib.import_module(module_name)
    yield inspect.getdoc(module)
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj):
            yield inspect.getdoc(obj)
        elif inspect.isclass(obj):
            yield inspect.getdoc(obj)
            for attr, member in sorted(vars(obj).items()):
                # Only members defined by the module itself: other packages patch stdlib
                # classes (transformers adds logging.Logger.warning_advice), and the corpus must
                # not depend on what the process imported before.
                code = member.fget if isinstance(member, property) else member
                if (not attr.startswith("_") and inspect.isfunction(code)
                        and code.__module__ == module.__name__):
                    yield inspect.getdoc(member)


@functools.cache
def _default_documents() -> tuple[str, ...]:
    """The default corpus as a tuple of documents, in a fixed order."""
    from pydoc_data.topics import topics  # ~0.5 MB; loaded only when needed

    texts = [topics[key] for key in sorted(topics)]
    with warnings.catch_warnings():  # e.g. the deprecated typing.io namespace warns on access
        warnings.simplefilter("ignore", DeprecationWarning)
        texts += (
            doc for name in sorted(_STDLIB_MODULES) for doc in _module_docstrings(name) if doc
        )
    return tuple(dict.fromkeys(text.strip() for text in texts if text.strip()))


@functools.cache
def default_corpus_text() -> str:
    """The embedded default corpus as one string (documents separated by a blank line)."""
    return "\n\n".join(_default_documents())


def _specs(source: CorpusSource) -> list[str | os.PathLike[str]]:
    return [source] if isinstance(source, (str, os.PathLike)) else list(source)


def _label(source: CorpusSource) -> str:
    return ", ".join(os.fspath(spec) for spec in _specs(source))


def _directory_files(directory: Path) -> list[Path]:
    """Corpus files under a directory, recursively, sorted, skipping hidden files and folders."""
    return sorted(
        path
        for path in directory.rglob("*")
        if path.suffix.lower() in SUFFIXES
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(directory).parts)
    )


def _expand(source: CorpusSource) -> list[Path | str]:
    """Resolve a corpus spec into an ordered list of files and ``DEFAULT`` markers."""
    specs = _specs(source)
    if not specs:
        raise DataError("corpus is empty: no sources given")
    items: list[Path | str] = []
    for spec in specs:
        if not isinstance(spec, (str, os.PathLike)):
            raise DataError(f"corpus entry {spec!r} is not a path, glob or 'default'")
        if spec == DEFAULT:
            items.append(DEFAULT)
            continue
        path = Path(spec).expanduser()
        if path.is_dir():
            files = _directory_files(path)
            if not files:
                raise DataError(f"corpus '{spec}': no {'/'.join(SUFFIXES)} files in directory")
        elif path.is_file():
            files = [path]
        elif any(char in os.fspath(spec) for char in "*?["):
            matches = [Path(m) for m in sorted(glob.glob(os.fspath(path), recursive=True))]
            files = [f for m in matches for f in (_directory_files(m) if m.is_dir() else [m])]
            if not files:
                raise DataError(f"corpus '{spec}': glob matches no files")
        else:
            raise DataError(f"corpus '{spec}': no such file or directory")
        items += files
    return items


def source_signature(source: CorpusSource) -> list[str]:
    """Identify a corpus cheaply: the default corpus by hash, files by path, size and mtime."""
    signature = []
    for item in _expand(source):
        if isinstance(item, Path):
            stat = item.stat()
            signature.append(f"{item.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
        else:
            digest = hashlib.sha256(default_corpus_text().encode()).hexdigest()[:16]
            signature.append(f"{DEFAULT}:python-{platform.python_version()}:{digest}")
    return signature


class _Utf8Stream:
    """Incremental UTF-8 decoder that counts the characters it had to replace with U+FFFD."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._tail = b""
        self.replaced = 0

    def decode(self, data: bytes, final: bool = False) -> str:
        """Decode the next bytes of the stream (a genuine U+FFFD in the input is not counted)."""
        text = self._decoder.decode(data, final)
        window = self._tail + data  # a 3-byte U+FFFD may straddle two calls
        self.replaced += text.count("\ufffd") - window.count(_FFFD_UTF8)
        self._tail = window[-2:]
        return text


def _warn_replaced(path: Path, stream: _Utf8Stream) -> None:
    if stream.replaced:
        warnings.warn(
            f"corpus file '{path}': {stream.replaced} invalid UTF-8 byte sequence(s) "
            "replaced with U+FFFD",
            UnicodeWarning,
            stacklevel=2,
        )


def _read_text(path: Path) -> Iterator[str]:
    """Stream a text file in pieces that end at a line break where possible."""
    stream = _Utf8Stream()
    pending = ""
    with path.open("rb") as file:
        while block := file.read(CHUNK_CHARS):
            pending += stream.decode(block)
            cut = pending.rfind("\n") + 1
            if cut == 0 and len(pending) >= CHUNK_CHARS:  # a very long line: cut it, not a CRLF
                cut = len(pending) - pending.endswith("\r")
            if cut:
                yield pending[:cut].replace("\r\n", "\n")
                pending = pending[cut:]
    pending += stream.decode(b"", final=True)
    if pending:
        yield pending.replace("\r\n", "\n")
    _warn_replaced(path, stream)


def _read_jsonl(path: Path) -> Iterator[str]:
    """The ``"text"`` field of each non-blank line of a JSON-lines file."""
    stream = _Utf8Stream()
    with path.open("rb") as file:
        for lineno, raw in enumerate(file, 1):
            line = stream.decode(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"corpus file '{path}' line {lineno}: not valid JSON ({err.msg})"
                ) from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(f"corpus file '{path}' line {lineno}: no \"text\" string field")
            yield text
    _warn_replaced(path, stream)


def _documents(item: Path | str) -> Iterator[Iterator[str]]:
    """The documents of one expanded corpus item, each as an iterator over its pieces."""
    if not isinstance(item, Path):
        yield from (iter((doc,)) for doc in _default_documents())
    elif item.suffix.lower() == ".jsonl":
        yield from (iter((text,)) for text in _read_jsonl(item))
    else:
        yield _read_text(item)


def _mark_last(pieces: Iterator[str]) -> Iterator[tuple[str, bool]]:
    """Pair the pieces of one document with an end-of-document flag; yield nothing if blank."""
    pending, started = "", False
    for piece in pieces:
        if started:
            yield pending, False
            pending = piece
        else:  # leading whitespace-only pieces are merged into the first one with text
            pending += piece
            started = bool(pending.strip())
    if started:
        yield pending, True


def iter_chunks(source: CorpusSource) -> Iterator[tuple[str, bool]]:
    """Yield ``(text, ends_document)`` pieces of every non-blank document of a corpus, in order.

    ``source`` is ``"default"``, a text or ``.jsonl`` file, a directory (its ``SUFFIXES`` files,
    recursively, sorted), a glob pattern, or a list of those. Raises ``DataError`` for a missing
    path, a glob or directory without files, a malformed ``.jsonl`` line, or an empty corpus.
    """
    items = _expand(source)
    empty = True
    for item in items:
        for pieces in _documents(item):
            for chunk in _mark_last(pieces):
                empty = False
                yield chunk
    if empty:
        raise DataError(f"corpus '{_label(source)}' is empty")


def iter_texts(source: CorpusSource) -> Iterator[str]:
    """Yield the documents of a corpus (see ``iter_chunks``).

    A document longer than about ``CHUNK_CHARS`` characters arrives as several consecutive
    line-aligned pieces, so memory stays bounded; use ``iter_chunks`` to see document boundaries.
    """
    for text, _ in iter_chunks(source):
        yield text
