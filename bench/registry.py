"""Plugin registries: one dict per kind, filled by decorators.

Built-in plugins live in the ``attacks``, ``defenses``, ``bench.data``, ``bench.models`` and
``bench.metrics`` packages and register themselves when imported. Third-party plugins come from
Python entry points (groups ``bench.datasets``, ``bench.models``, ``bench.attacks``,
``bench.defenses``, ``bench.metrics``) or from a file given with ``--plugin``.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import pkgutil
import sys
from pathlib import Path
from typing import Any, Callable, Generic, TypeVar

from bench.errors import BenchError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorate(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                existing = self._entries[name]
                # Re-importing the same module (e.g. a --plugin file loaded twice) is fine.
                where = lambda o: (getattr(o, "__module__", None), getattr(o, "__qualname__", None))  # noqa: E731
                if where(existing) != where(obj):
                    origin = lambda o: getattr(sys.modules.get(where(o)[0]), "__file__", None) or where(o)[0]  # noqa: E731
                    raise BenchError(f"{self.kind} {name!r} is registered twice: by {origin(existing)} and by {origin(obj)}")
            self._entries[name] = obj
            try:
                setattr(obj, "registered_name", name)
            except (AttributeError, TypeError):
                pass
            return obj

        return decorate

    def get(self, name: str) -> T:
        load_builtin_plugins()
        if name not in self._entries:
            valid = ", ".join(sorted(self._entries)) or "(none)"
            raise BenchError(f"unknown {self.kind} {name!r}; valid: {valid}")
        return self._entries[name]

    def names(self) -> list[str]:
        load_builtin_plugins()
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        load_builtin_plugins()
        return sorted(self._entries.items())

    def __contains__(self, name: str) -> bool:
        load_builtin_plugins()
        return name in self._entries


DATASETS: Registry[Any] = Registry("dataset")
MODELS: Registry[Any] = Registry("model")
ATTACKS: Registry[Any] = Registry("attack")
DEFENSES: Registry[Any] = Registry("defense")
PROFILES: Registry[Any] = Registry("profile")
METRICS: Registry[Any] = Registry("metric")

register_dataset = DATASETS.register
register_model = MODELS.register
register_attack = ATTACKS.register
register_defense = DEFENSES.register
register_profile = PROFILES.register
register_metric = METRICS.register

_BUILTIN_PACKAGES = ("bench.data", "bench.models", "bench.profiles", "bench.metrics", "attacks", "defenses")
_BUILTIN_ROOTS = {"bench", "attacks", "defenses"}
_ENTRY_POINT_GROUPS = ("bench.datasets", "bench.models", "bench.attacks", "bench.defenses", "bench.metrics")
_loaded = False


def _import_package_tree(package_name: str) -> None:
    package = importlib.import_module(package_name)
    for info in pkgutil.walk_packages(getattr(package, "__path__", []), prefix=package_name + "."):
        if info.name.rsplit(".", 1)[-1].startswith("_"):
            continue
        importlib.import_module(info.name)


def load_builtin_plugins() -> None:
    """Import every built-in plugin module and every installed entry point, once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for package_name in _BUILTIN_PACKAGES:
        _import_package_tree(package_name)
    for group in _ENTRY_POINT_GROUPS:
        for entry_point in importlib.metadata.entry_points(group=group):
            try:
                entry_point.load()
            except Exception as exc:  # a broken third-party plugin must not hide the others
                raise BenchError(f"plugin entry point {entry_point.name!r} ({entry_point.value}) "
                                 f"failed to load: {exc}") from exc


def plugin_module_name(path: Path) -> str:
    """One module per plugin file, named from its full path: two files called ``defense.py`` in
    different folders are two plugins."""
    resolved = Path(path).resolve()
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
    stem = "".join(c if c.isalnum() else "_" for c in resolved.stem)
    return f"bench_plugin_{stem}_{digest}"


_source_hashes: dict[str, str | None] = {}


def source_hash(obj: Any) -> str | None:
    """sha256 of the source file that defines a plugin from outside this project (a ``--plugin``
    file or an installed entry point); None for the built-ins, which carry a ``version`` instead.
    It is part of the stage and cell ids, so editing a plugin's code re-runs its cells rather
    than reusing results of the old code."""
    module_name = getattr(obj, "__module__", None) or ""
    if module_name.split(".")[0] in _BUILTIN_ROOTS:
        return None
    if module_name not in _source_hashes:
        module = sys.modules.get(module_name)
        path = getattr(module, "__file__", None)
        if path is None or not Path(path).is_file():
            _source_hashes[module_name] = None
        else:
            _source_hashes[module_name] = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    return _source_hashes[module_name]


def plugin_origin(obj: Any, kind: str, name: str) -> dict | None:
    """Where a plugin from outside the project came from: its ``--plugin`` file or the installed
    module an entry point named, with the sha256 of that source. None for the built-ins. Stored
    with each cell, so a report can print the ``--plugin`` files its Reproduce command needs."""
    digest = source_hash(obj)
    if digest is None:
        return None
    module_name = getattr(obj, "__module__", "")
    path = getattr(sys.modules.get(module_name), "__file__", None)
    via = "file" if module_name.startswith("bench_plugin_") else "entry point"
    return {"kind": kind, "name": name, "via": via, "module": module_name,
            "path": str(Path(path).resolve()) if path else None, "sha256": digest}


def load_plugin_file(path: str | Path) -> None:
    """Import a plugin from a Python file; its decorators register what it defines.
    This runs the file's code, with the rights of the user who runs the benchmark."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"plugin file not found: {path}")
    load_builtin_plugins()
    module_name = plugin_module_name(path)
    if module_name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise BenchError(f"cannot import plugin file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise BenchError(f"plugin file {path} failed to import: {exc}") from exc
