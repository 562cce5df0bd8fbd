"""Errors a user can cause. The CLI prints ``str(err)`` as one line and exits with status 2."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any


class NormlabError(Exception):
    """Base class for every user-facing error (bad config, bad data, bad checkpoint)."""


class ConfigError(NormlabError, ValueError):
    """An invalid configuration value; the message names the field."""


class DataError(NormlabError):
    """A missing, empty or unreadable corpus, tokenizer or token shard."""


class CheckpointError(NormlabError):
    """A missing, corrupt or incompatible checkpoint or run directory."""


def did_you_mean(value: str, choices: Any) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest choice, or ``""``.

    A choice the value starts with wins ('prenorm' -> 'pre'), then the closest spelling."""
    choices = [str(c) for c in choices]
    prefixes = [c for c in choices if len(c) >= 3 and str(value).startswith(c)]
    close = sorted(prefixes, key=len)[-1:] or difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise ConfigError naming ``name`` when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ConfigError(
            f"{name}: unknown value '{value}'{did_you_mean(value, choices)}; "
            f"choose one of {', '.join(choices)}"
        )


def check_output_dir(path: str | Path, option: str, marks: tuple[str, ...] = ()) -> Path:
    """``path`` as the output directory of a verb whose earlier output contains one of ``marks``
    (which the verb may update or resume): missing, empty, or holding a mark; with no marks any
    directory. A ConfigError for an empty name, a file, or a directory that holds something
    else (a user's files, another verb's or run's output), before anything is written."""
    if not str(path).strip():
        raise ConfigError(f"{option}: empty path")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option}: '{path}' is a file; expected a directory")
    visible = path.is_dir() and any(not entry.name.startswith(".") for entry in path.iterdir())  # not .DS_Store
    if marks and visible and not any((path / mark).exists() for mark in marks):
        raise ConfigError(f"{option}: '{path}' holds other files (it has no {' or '.join(marks)}); "
                          "choose a new or empty directory")
    return path


def check_creatable(path: Path) -> None:
    """A ConfigError unless the file or directory ``path`` can be made (or, when it exists,
    replaced through a temporary file beside it): its nearest existing ancestor is a directory
    this process may write in."""
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(f"cannot write '{path}': '{folder}' is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write '{path}': no permission to write in '{folder}'")
