"""User code that registers norm types, placements and strategies without editing normlab.

A plugin is a Python file (``my_norms.py``) or an importable module (``mypkg.norms``), named with
``--plugin`` on any verb or under ``plugins:`` in a run YAML, or an installed package's entry
point in the group ``normlab.plugins``. Importing it runs its ``register_*`` calls. A run
directory records its plugins with the sha256 of each file (``plugins.json``); reading the run
back (resume, evaluate, diagnose, export, sweep workers) loads the same files and refuses a
missing or changed one.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

from normlab.errors import ConfigError

ENTRY_POINT_GROUP = "normlab.plugins"

#: resolved plugin spec -> its module, so that each plugin runs once per process
LOADED: dict[str, ModuleType] = {}
_entry_points_loaded = False


def is_file_spec(spec: str) -> bool:
    """A spec naming a file (``x.py`` or a path) rather than a module (``pkg.mod``)."""
    return spec.endswith(".py") or "/" in spec or "\\" in spec


def check_specs(specs: Any, where: str = "plugins") -> list[str]:
    """``specs`` as a list of non-empty strings, else a one-line ConfigError."""
    if specs is None:
        return []
    if not isinstance(specs, list) or not all(isinstance(s, str) and s for s in specs):
        raise ConfigError(f"{where}: expected a list of plugin files or module names, got {specs!r}")
    return specs


def resolve(spec: str, base: str | Path | None = None) -> str:
    """A file spec as an absolute path (relative to ``base``, default the working directory);
    a module name unchanged."""
    if not is_file_spec(spec):
        return spec
    return str((Path(base or ".") / Path(spec).expanduser()).resolve())


def load_plugins(specs: list[str] | None = None) -> list[str]:
    """Import the installed entry-point plugins (once) and every spec; returns the resolved specs."""
    load_entry_points()
    resolved = [resolve(spec) for spec in check_specs(specs)]
    for spec in resolved:
        load_plugin(spec)
    return resolved


def load_plugin(spec: str) -> ModuleType:
    """Import one plugin (a file or a module name) unless this process already has."""
    spec = resolve(spec)
    if spec in LOADED:
        return LOADED[spec]
    if is_file_spec(spec):
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"plugin '{spec}': no such file")
        name = f"normlab_plugin_{path.stem}_{hashlib.sha1(spec.encode()).hexdigest()[:8]}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # dataclasses and pickling look a class's module up here
        try:
            _run_plugin(spec, lambda: module_spec.loader.exec_module(module))
        except BaseException:
            del sys.modules[name]
            raise
    else:
        if importlib.util.find_spec(spec.split(".")[0]) is None:
            raise ConfigError(f"plugin '{spec}': no such file or importable module")
        module = _run_plugin(spec, lambda: importlib.import_module(spec))
    LOADED[spec] = module
    return module


def _run_plugin(spec: str, run):
    """Run a plugin's import; its errors become one line naming the plugin."""
    try:
        return run()
    except ConfigError as err:
        raise ConfigError(f"plugin '{spec}': {err}") from None
    except Exception as err:  # noqa: BLE001 (user code: any error is the plugin's)
        raise ConfigError(f"plugin '{spec}' failed to load: {type(err).__name__}: {err}") from None


def load_entry_points() -> None:
    """Import every installed ``normlab.plugins`` entry point, once per process."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for point in entry_points(group=ENTRY_POINT_GROUP):
        _run_plugin(f"{point.name} = {point.value}", point.load)


def plugin_file(spec: str) -> Path | None:
    """The source file of a plugin spec (found without running it), None when absent."""
    if is_file_spec(spec):
        return Path(spec) if Path(spec).is_file() else None
    try:
        found = importlib.util.find_spec(spec)
    except (ImportError, ValueError):
        return None
    return Path(found.origin) if found is not None and found.origin else None


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def record(specs: list[str]) -> list[dict[str, str]]:
    """What a run directory keeps of its plugins: spec, file and the file's sha256."""
    out = []
    for spec in specs:
        path = plugin_file(spec)
        if path is None:
            raise ConfigError(f"plugin '{spec}': no such file or importable module")
        out.append({"plugin": spec, "file": str(path), "sha256": sha256(path)})
    return out


def load_recorded(records: list[dict[str, str]], run: str | Path) -> list[str]:
    """Load a run's recorded plugins after checking that each file is there and unchanged;
    returns their specs."""
    for entry in records:
        path = plugin_file(entry["plugin"])
        if path is None:
            raise ConfigError(f"run '{run}' needs plugin '{entry['plugin']}', which is missing")
        digest = sha256(path)
        if digest != entry["sha256"]:
            raise ConfigError(f"plugin '{path}' changed since run '{run}' was trained (sha256 "
                              f"{entry['sha256'][:12]} -> {digest[:12]}); restore it or start a new run")
    return load_plugins([entry["plugin"] for entry in records])
