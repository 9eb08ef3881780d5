"""Artifact directories (``<artifacts>/<stage or cell id>/``): written atomically, verified before use.

A directory is written under a temporary name (``<id>.tmp-<host>-<pid>``) and renamed into
place once complete, with ``result.json`` last. ``result.json`` lists the sha256 of every other
file in the directory; ``finished`` checks them all before a stage or cell is reused, so a
truncated, zeroed or edited file is never used: the directory is removed (and the reason
logged) and the work is done again.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import platform
import shutil
from pathlib import Path
from typing import Callable

RESULT_FILE = "result.json"
FILES_KEY = "files"   # result.json: {file name: sha256}
TMP_MARK = ".tmp-"
# What a report reads of an artifact directory besides the store (bench/reporting): per-epoch curves,
# the figures a defense drew for its cell, the reversed triggers. ``export`` keeps these in the copied
# store (bench/store.py), so a report made from that copy, on a machine without the artifacts, still
# draws them. The t-SNE features (~150 KB a cell) and vector twins of the figures stay behind: a
# committed store would grow by megabytes per stage.
REPORT_FILES = ("history.json", "scan.safetensors", "*.png")


class CorruptArtifact(Exception):
    """An artifact directory that must not be used: unreadable, incomplete or altered."""

    def __init__(self, directory: Path, reason: str) -> None:
        super().__init__(f"{directory}: {reason}")
        self.directory, self.reason = directory, reason


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_result(directory: Path) -> dict:
    """``result.json`` of an artifact directory (CorruptArtifact when it cannot be read)."""
    path = Path(directory) / RESULT_FILE
    try:
        with open(path) as handle:
            result = json.load(handle)
    except FileNotFoundError:
        raise CorruptArtifact(Path(directory), f"no {RESULT_FILE}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptArtifact(Path(directory), f"{path} is unreadable ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(result, dict):
        raise CorruptArtifact(Path(directory), f"{path} does not hold a result object")
    return result


def verify(directory: Path) -> dict:
    """The directory's result after checking every file it lists (CorruptArtifact otherwise)."""
    directory = Path(directory)
    result = read_result(directory)
    files = result.get(FILES_KEY)
    if not isinstance(files, dict):
        raise CorruptArtifact(directory, f"{RESULT_FILE} lists no file hashes (written before artifacts were hashed)")
    for name, expected in files.items():
        path = directory / name
        try:
            actual = sha256_file(path)
        except OSError as exc:
            raise CorruptArtifact(directory, f"{name} is unreadable ({exc.__class__.__name__}: {exc})") from None
        if actual != expected:
            raise CorruptArtifact(directory, f"{name} does not match its recorded sha256 (changed or damaged on disk)")
    return result


def finished(directory: Path, log: Callable[[str], None]) -> dict | None:
    """The result of a finished, intact artifact directory; None when there is none. A damaged
    one is removed, with the reason logged, so the caller computes it again."""
    directory = Path(directory)
    if not directory.exists():
        return None
    try:
        return verify(directory)
    except CorruptArtifact as exc:
        log(f"[yellow]artifact {directory.name} is not usable ({exc.reason}): recomputing it[/yellow]")
        shutil.rmtree(directory, ignore_errors=True)
        return None


def report_files(directory: Path) -> dict[str, bytes]:
    """The ``REPORT_FILES`` of an artifact directory, each checked against the sha256 its result.json
    records; a missing directory, or a file that is unlisted or altered, gives nothing for it."""
    directory = Path(directory)
    try:
        listed = read_result(directory).get(FILES_KEY)
    except CorruptArtifact:
        return {}
    if not isinstance(listed, dict):
        return {}
    kept = {}
    for name, expected in sorted(listed.items()):
        if not any(fnmatch.fnmatchcase(name, pattern) for pattern in REPORT_FILES):
            continue
        try:
            data = (directory / name).read_bytes()
        except OSError:
            continue
        if hashlib.sha256(data).hexdigest() == expected:
            kept[name] = data
    return kept


def is_intact(directory: Path) -> bool:
    try:
        verify(directory)
    except CorruptArtifact:
        return False
    return True


def _host() -> str:
    return platform.node() or "localhost"


class ArtifactWriter:
    """Collects a directory's files under a temporary name and renames it into place at the end,
    so a crash never leaves a half-written directory that looks finished."""

    def __init__(self, final: Path) -> None:
        self.final = Path(final)
        self.tmp = self.final.with_name(f"{self.final.name}{TMP_MARK}{_host()}-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)

    def commit(self, result: dict) -> dict:
        """Hash every file, write result.json with the hashes, rename into place; returns the result."""
        files = {path.name: sha256_file(path) for path in sorted(self.tmp.iterdir())
                 if path.is_file() and path.name != RESULT_FILE}
        result = {**result, FILES_KEY: files}
        with open(self.tmp / RESULT_FILE, "w") as handle:
            json.dump(result, handle, indent=1, default=str)
            handle.flush()
            os.fsync(handle.fileno())
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.tmp, self.final)
        return result

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def remove_stale_temporaries(root: Path, log: Callable[[str], None]) -> list[Path]:
    """Remove ``*.tmp-<host>-<pid>`` directories left by dead processes of this host (a kill -9
    mid-write). Other hosts' directories are left alone: their processes cannot be checked here."""
    root = Path(root)
    removed = []
    if not root.is_dir():
        return removed
    host = _host()
    for path in root.iterdir():
        if TMP_MARK not in path.name or not path.is_dir():
            continue
        owner = path.name.rsplit(TMP_MARK, 1)[1]
        owner_host, _, pid_text = owner.rpartition("-")
        if not pid_text.isdigit() or (owner_host or host) != host:  # a bare pid: written before hosts were named
            continue
        if not pid_alive(int(pid_text)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        log(f"removed {len(removed)} temporary artifact director{'y' if len(removed) == 1 else 'ies'} "
            f"left by stopped processes")
    return removed
