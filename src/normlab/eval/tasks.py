"""Evaluation tasks: finding a task file, reading and validating its records, and the text pairs
(context, continuation) that are scored, with their few-shot examples.

A task is a ``.jsonl`` file (one record per line) or a ``.txt`` file (one plain-text document).
Its format follows from the fields of its records:

=================  ======================================  ====================================
format             fields                                  scored pairs (context, continuation)
=================  ======================================  ====================================
multiple_choice    ``query``, ``choices``, ``gold``        (query, " " + choice) per choice
partial_scoring    ``context_options``, ``continuation``,  (option, " " + continuation) per
                   ``gold``                                context option (WinoGrande)
continuation       ``context``, ``continuation``           (context, " " + continuation)
text               ``text`` (or a ``.txt`` file)           the whole document, rolling windows
=================  ======================================  ====================================
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normlab.errors import DataError, did_you_mean

FORMATS: dict[str, dict[str, type]] = {
    "multiple_choice": {"query": str, "choices": list, "gold": int},
    "partial_scoring": {"context_options": list, "continuation": str, "gold": int},
    "continuation": {"context": str, "continuation": str},
    "text": {"text": str},
}
"""Each format's required fields and their JSON types; other fields are ignored."""
_JSON_NAMES = {str: "string", list: "array", int: "integer"}

DATA_ENV = "NORMLAB_DATA"
FEWSHOT_DELIMITER = "\n\n"
TARGET_DELIMITER = " "


@dataclass
class Task:
    """The validated records of one task file; ``lines[i]`` is the file line of ``records[i]``."""

    name: str
    path: Path
    format: str
    records: list[dict[str, Any]]
    lines: list[int]

    def where(self, index: int) -> str:
        """``file:line`` of record ``index``, for error messages."""
        return f"{self.path}:{self.lines[index]}"

    def pairs(self, index: int, prefix: str = "") -> list[tuple[str, str]]:
        """The (context, continuation) texts scored for record ``index``, ``prefix`` (few-shot
        examples) put before every context. Not for text documents (scored in windows)."""
        record = self.records[index]
        if self.format == "multiple_choice":
            query = prefix + record["query"]
            return [(query, TARGET_DELIMITER + choice) for choice in record["choices"]]
        if self.format == "partial_scoring":
            continuation = TARGET_DELIMITER + record["continuation"]
            return [(prefix + option, continuation) for option in record["context_options"]]
        return [(prefix + record["context"], TARGET_DELIMITER + record["continuation"])]

    def solved_example(self, index: int) -> str:
        """Record ``index`` with its answer, as a few-shot example: gold context + " " + gold
        continuation."""
        record = self.records[index]
        if self.format == "multiple_choice":
            return record["query"] + TARGET_DELIMITER + record["choices"][record["gold"]]
        if self.format == "partial_scoring":
            option = record["context_options"][record["gold"]]
            return option + TARGET_DELIMITER + record["continuation"]
        return record["context"] + TARGET_DELIMITER + record["continuation"]

    def fewshot_prefix(self, index: int, num_fewshot: int, seed: int) -> str:
        """K solved examples of other records, each followed by "\\n\\n" (lm-eval's layout).
        They are drawn with ``random.Random(f"{seed}:{index}")``, so they depend only on the
        seed and the item, never include the item itself, and are "" for K = 0."""
        if num_fewshot == 0:
            return ""
        if num_fewshot >= len(self.records):
            raise DataError(f"task '{self.name}' has {len(self.records)} records, too few for "
                            f"{num_fewshot} few-shot examples besides the item")
        draws = random.Random(f"{seed}:{index}").sample(range(len(self.records) - 1), num_fewshot)
        others = [draw + (draw >= index) for draw in draws]  # skip the item itself
        return "".join(self.solved_example(i) + FEWSHOT_DELIMITER for i in others)


def load_task(spec: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None = None) -> Task:
    """Read and validate the task ``spec``: a ``.jsonl``/``.txt`` path, or a name looked up
    under ``data_dir`` (default ``$NORMLAB_DATA``), see ``find_task``."""
    name, path = find_task(spec, data_dir)
    if path.suffix == ".txt":
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"task file '{path}' is unreadable: {err}") from None
        if not text:
            raise DataError(f"task file '{path}' is empty")
        return Task(name, path, "text", [{"text": text}], [1])
    records, lines = _read_jsonl(path)
    fmt = _detect_format(records[0], f"{path}:{lines[0]}")
    for record, line in zip(records, lines, strict=True):
        _validate(record, fmt, f"{path}:{line}")
    return Task(name, path, fmt, records, lines)


def find_task(spec: str | os.PathLike[str],
              data_dir: str | os.PathLike[str] | None = None) -> tuple[str, Path]:
    """The name and file of task ``spec``. A path ending in ``.jsonl`` or ``.txt`` is used as
    is (named by its stem); a name is the folder ``DATA_DIR/NAME`` holding ``*.jsonl`` files:
    its only one, or ``NAME.jsonl``."""
    text = os.fspath(spec)
    if text.endswith((".jsonl", ".txt")):
        path = Path(text).expanduser()
        if not path.is_file():
            raise DataError(f"task file '{path}' does not exist")
        return path.stem, path
    if Path(text).expanduser().is_file():
        raise DataError(f"task file '{text}': expected a .jsonl or .txt file")
    root = data_dir if data_dir is not None else os.environ.get(DATA_ENV)
    if not root:
        raise DataError(f"task '{text}' is not a .jsonl/.txt file; pass --data-dir or set "
                        f"{DATA_ENV} to the folder holding NAME/*.jsonl")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"task data folder '{root}' does not exist")
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.jsonl")))
    if text not in names:
        raise DataError(f"unknown task '{text}' in '{root}'{did_you_mean(text, names)}; "
                        f"available: {', '.join(names) or 'none'}")
    files = sorted((root / text).glob("*.jsonl"))
    if len(files) == 1:
        return text, files[0]
    if (root / text / f"{text}.jsonl") in files:
        return text, root / text / f"{text}.jsonl"
    raise DataError(f"task '{text}': '{root / text}' holds several .jsonl files "
                    f"({', '.join(f.name for f in files)}) and no {text}.jsonl; pass one as a path")


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """Records of a JSON-lines file and their line numbers; blank lines are skipped."""
    try:
        raw_lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"task file '{path}' is unreadable: {err}") from None
    records, lines = [], []
    for number, line in enumerate(raw_lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: invalid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
        lines.append(number)
    if not records:
        raise DataError(f"task file '{path}' has no records")
    return records, lines


def _detect_format(record: dict[str, Any], where: str) -> str:
    """The format whose fields the first record has (see the table in the module docstring)."""
    matches = [fmt for fmt, fields in FORMATS.items() if fields.keys() <= record.keys()]
    if len(matches) != 1:
        expected = "; ".join("/".join(fields) for fields in FORMATS.values())
        raise DataError(f"{where}: fields {', '.join(sorted(record)) or 'none'} match "
                        f"{'no' if not matches else 'more than one'} task format (expected {expected})")
    return matches[0]


def _validate(record: dict[str, Any], fmt: str, where: str) -> None:
    """Raise DataError at ``where`` unless ``record`` is a complete, consistent ``fmt`` record."""
    for field, kind in FORMATS[fmt].items():
        if field not in record:
            raise DataError(f"{where}: missing field '{field}' (a {fmt} task)")
        value = record[field]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise DataError(f"{where}: field '{field}' should be a JSON "
                            f"{_JSON_NAMES[kind]}, got {type(value).__name__}")
    options_field = {"multiple_choice": "choices", "partial_scoring": "context_options"}.get(fmt)
    if options_field is not None:
        options = record[options_field]
        if not options:
            raise DataError(f"{where}: '{options_field}' is empty")
        if not all(isinstance(option, str) and option for option in options):
            raise DataError(f"{where}: '{options_field}' should hold non-empty strings")
        if not 0 <= record["gold"] < len(options):
            raise DataError(f"{where}: gold {record['gold']} is out of range for "
                            f"{len(options)} {options_field}")
    if fmt == "text" and not record["text"]:
        raise DataError(f"{where}: 'text' is empty")
    if fmt in ("partial_scoring", "continuation") and not record["continuation"]:
        raise DataError(f"{where}: 'continuation' is empty")

