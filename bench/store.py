"""The results store: one SQLite file, one row per stage and per cell, and the claims of the
runners working on it.

Each runner process writes it from its own callbacks (executors never do). Every write is one
transaction; a cell is marked ``done`` only after its artifacts were renamed into place, so a
crash at any point leaves either a finished cell or one that the next run redoes.

Several runners may share one store (two shells on one machine, or N machines on a shared
filesystem whose SQLite locking works): a runner *claims* a stage or cell before computing it.
A claim records its owner (host, pid) and a heartbeat that the owner refreshes; a claim whose
owner is dead (same host, no such process) or whose heartbeat is older than ``STALE_S`` is
taken over. A ``running`` row whose claim is gone reads as ``interrupted``.
"""
from __future__ import annotations

import json
import os
import platform
import sqlite3
import threading
import time
import uuid
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, Iterator

from bench.artifacts import pid_alive, report_files
from bench.errors import BenchError

SCHEMA = """
CREATE TABLE IF NOT EXISTS stages (
    id TEXT PRIMARY KEY,
    dataset TEXT NOT NULL, model TEXT NOT NULL, attack TEXT NOT NULL, seed INTEGER NOT NULL, profile TEXT NOT NULL,
    config TEXT NOT NULL, status TEXT NOT NULL, error TEXT,
    metrics TEXT, timings TEXT, environment TEXT, started REAL, finished REAL
);
CREATE TABLE IF NOT EXISTS cells (
    id TEXT PRIMARY KEY, stage_id TEXT NOT NULL,
    dataset TEXT NOT NULL, model TEXT NOT NULL, attack TEXT NOT NULL, defense TEXT NOT NULL,
    seed INTEGER NOT NULL, profile TEXT NOT NULL,
    config TEXT NOT NULL, status TEXT NOT NULL, error TEXT,
    metrics TEXT, timings TEXT, environment TEXT, details TEXT, started REAL, finished REAL,
    plugins TEXT,  -- JSON: the --plugin files and entry points the cell used, with their sha256
    measurements TEXT,  -- JSON: metric name -> {key, seconds, details} (bench/metric.py)
    artifacts TEXT  -- NULL: under the artifacts root, or 'not kept' (a copy made by `export`)
);
CREATE INDEX IF NOT EXISTS cells_by_dataset ON cells(dataset, status);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- What the report needs of each plugin (display names, metric columns, focus), recorded at run time
-- so that a report never needs the plugins' code: kind (defense, attack, metric, profile), name, JSON.
CREATE TABLE IF NOT EXISTS catalog (kind TEXT NOT NULL, name TEXT NOT NULL, info TEXT NOT NULL, PRIMARY KEY (kind, name));
-- Files the report reads of the artifact directories (bench/artifacts.py, REPORT_FILES) of finished stages
-- and cells, kept by `export` for a copy whose artifacts stay behind: id (stage or cell), file name, bytes.
CREATE TABLE IF NOT EXISTS kept_files (id TEXT NOT NULL, name TEXT NOT NULL, data BLOB NOT NULL, PRIMARY KEY (id, name));
CREATE TABLE IF NOT EXISTS claims (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL, token TEXT NOT NULL,
    claimed REAL NOT NULL, heartbeat REAL NOT NULL
);
"""

HEARTBEAT_S = 10.0   # how often a runner refreshes its claims
STALE_S = 120.0      # a claim not refreshed for this long is taken over (an owner on another host died)
INIT_ATTEMPTS = 10   # tries to create or open a store that another runner is creating at the same moment
NOT_KEPT = "not kept"  # cells.artifacts of a row copied by ``export``: its artifacts stayed behind


def _host() -> str:
    return platform.node() or "localhost"


class ResultStore:
    def __init__(self, path: str | Path, artifacts_root: str | Path | None = None, *, create: bool = True) -> None:
        """``artifacts_root`` defaults to the store's directory (<store dir>/<id>/); a
        different one (a shared filesystem for a cluster) is remembered in the store.
        ``create=False`` opens an existing store only (for reading commands), and leaves its
        journal mode as it is: an exported store is committed in rollback-journal mode, and
        switching it to WAL on a mere read would change the committed file's bytes."""
        self.path = Path(path)
        self._keeps_journal_mode = not create
        if self.path.is_dir():
            raise BenchError(f"results store {self.path} is a directory; give a file path, e.g. {self.path / 'bench.sqlite'}")
        if not self.path.exists():
            if not create:
                raise BenchError(f"no results store at {self.path}; run `python -m bench run` first or pass --store")
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                raise BenchError(f"cannot create the results store {self.path}: {self.path.parent} is not a directory") from None
        self.token = uuid.uuid4().hex
        self.host, self.pid = _host(), os.getpid()
        self._held: set[str] = set()
        for attempt in range(INIT_ATTEMPTS):
            try:
                row = self._initialise(artifacts_root)
                break
            except sqlite3.DatabaseError as exc:
                # Two runners creating one store at once can meet a lock that SQLite reports at once
                # instead of waiting (a new file still in rollback-journal mode: CI saw it once).
                if "locked" in str(exc) and attempt < INIT_ATTEMPTS - 1:
                    time.sleep(0.2 * (attempt + 1))
                    continue
                raise BenchError(f"{self.path} is not a usable results store ({exc}); pass another --store "
                                 f"or move that file away") from None
        self.artifacts_root = Path(row[0]) if row else self.path.parent

    def _initialise(self, artifacts_root: str | Path | None):
        """Create the tables (in one immediate transaction: a reader that later writes can deadlock
        with another creator) and return the remembered artifacts root's row."""
        with closing(self._connect()) as conn:
            conn.isolation_level = None
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                columns = {row[1] for row in conn.execute("PRAGMA table_info(cells)")}
                for column in ("plugins", "measurements", "artifacts"):  # stores made before these were recorded
                    if column not in columns:
                        conn.execute(f"ALTER TABLE cells ADD COLUMN {column} TEXT")
                if artifacts_root is not None:
                    conn.execute("INSERT INTO meta VALUES ('artifacts_root', ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                                 (str(Path(artifacts_root).resolve()),))
                row = conn.execute("SELECT value FROM meta WHERE key='artifacts_root'").fetchone()
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return row

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=60)
        conn.row_factory = sqlite3.Row
        if not self._keeps_journal_mode:  # WAL lets readers and several runners share the store
            conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    def _write(self, sql: str, params: tuple) -> None:
        with closing(self._connect()) as conn, conn:
            conn.execute(sql, params)

    # --- claims ----------------------------------------------------------------------
    def _owner_alive(self, row: sqlite3.Row, now: float) -> bool:
        if now - row["heartbeat"] > STALE_S:
            return False
        if row["host"] == self.host:
            return row["pid"] == self.pid or pid_alive(row["pid"])
        return True  # another host's process: only its heartbeat can tell

    def claim(self, item_id: str, kind: str) -> bool:
        """Take the claim on a stage or cell; False when a live runner holds it."""
        now = time.time()
        with closing(self._connect()) as conn:
            conn.isolation_level = None
            conn.execute("BEGIN IMMEDIATE")  # one claimer at a time
            try:
                row = conn.execute("SELECT * FROM claims WHERE id=?", (item_id,)).fetchone()
                if row is not None and row["token"] != self.token and self._owner_alive(row, now):
                    conn.execute("COMMIT")
                    return False
                conn.execute("INSERT INTO claims VALUES (?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET kind=excluded.kind, "
                             "host=excluded.host, pid=excluded.pid, token=excluded.token, claimed=excluded.claimed, "
                             "heartbeat=excluded.heartbeat", (item_id, kind, self.host, self.pid, self.token, now, now))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        self._held.add(item_id)
        return True

    def release(self, item_id: str) -> None:
        self._write("DELETE FROM claims WHERE id=? AND token=?", (item_id, self.token))
        self._held.discard(item_id)

    def release_all(self) -> None:
        self._write("DELETE FROM claims WHERE token=?", (self.token,))
        self._held.clear()

    def heartbeat(self) -> None:
        if self._held:
            self._write("UPDATE claims SET heartbeat=? WHERE token=?", (time.time(), self.token))

    def owner(self, item_id: str) -> str | None:
        """``host:pid`` of the live runner holding the item, if any."""
        with closing(self._connect()) as conn:
            row = conn.execute("SELECT * FROM claims WHERE id=?", (item_id,)).fetchone()
        if row is None or row["token"] == self.token or not self._owner_alive(row, time.time()):
            return None
        return f"{row['host']}:{row['pid']}"

    @contextmanager
    def heartbeats(self, interval: float = HEARTBEAT_S) -> Iterator[None]:
        """Refresh this runner's claims in the background while the block runs; release them all after."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(interval):
                try:
                    self.heartbeat()
                except sqlite3.Error:
                    pass  # a busy store: the next beat retries, well within STALE_S

        thread = threading.Thread(target=beat, name="bench-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.release_all()

    def _live_claims(self, conn: sqlite3.Connection) -> set[str]:
        now = time.time()
        return {row["id"] for row in conn.execute("SELECT * FROM claims").fetchall() if self._owner_alive(row, now)}

    # --- stages ----------------------------------------------------------------------
    def stage_status(self, stage_id: str) -> tuple[str, float | None] | None:
        """(status, finished) of a stage, or None when the store has no row for it."""
        with closing(self._connect()) as conn:
            row = conn.execute("SELECT status, finished FROM stages WHERE id=?", (stage_id,)).fetchone()
        return (row["status"], row["finished"]) if row else None

    def stage_running(self, spec) -> None:
        self._write(
            "INSERT INTO stages (id, dataset, model, attack, seed, profile, config, status, started) "
            "VALUES (?,?,?,?,?,?,?,'running',?) ON CONFLICT(id) DO UPDATE SET status='running', error=NULL, started=excluded.started",
            (spec.id, spec.dataset, spec.model, spec.attack, spec.seed, spec.profile,
             json.dumps(_stage_config(spec), sort_keys=True), time.time()))

    def stage_done(self, stage_id: str, result: dict) -> None:
        started, finished = _wall(result)
        self._write("UPDATE stages SET status='done', error=NULL, metrics=?, timings=?, environment=?, "
                    "started=COALESCE(?, started), finished=? WHERE id=?",
                    (json.dumps(result["metrics"]), json.dumps(result["timings"]),
                     json.dumps(result.get("environment", {})), started, finished, stage_id))

    def stage_failed(self, stage_id: str, error: str) -> None:
        self._write("UPDATE stages SET status='failed', error=?, finished=? WHERE id=?", (error, time.time(), stage_id))

    # --- cells -----------------------------------------------------------------------
    def cell_measured(self, cell_id: str) -> tuple[str | None, dict[str, str], bool]:
        """(status, metric name -> the key it was measured under, whether its artifacts were left
        behind by ``export``) of a cell."""
        with closing(self._connect()) as conn:
            row = conn.execute("SELECT status, measurements, artifacts FROM cells WHERE id=?", (cell_id,)).fetchone()
        if row is None:
            return None, {}, False
        measurements = json.loads(row["measurements"]) if row["measurements"] else {}
        return (row["status"], {name: entry.get("key") for name, entry in measurements.items()},
                row["artifacts"] == NOT_KEPT)

    def cell_finished_at(self, cell_id: str) -> tuple[str, float | None] | None:
        """(status, finished) of a cell, or None when the store has no row for it."""
        with closing(self._connect()) as conn:
            row = conn.execute("SELECT status, finished FROM cells WHERE id=?", (cell_id,)).fetchone()
        return (row["status"], row["finished"]) if row else None

    def cell_running(self, spec) -> None:
        stage = spec.stage
        self._write(
            "INSERT INTO cells (id, stage_id, dataset, model, attack, defense, seed, profile, config, status, started, plugins) "
            "VALUES (?,?,?,?,?,?,?,?,?,'running',?,?) ON CONFLICT(id) DO UPDATE SET status='running', error=NULL, "
            "started=excluded.started, plugins=excluded.plugins, config=excluded.config",
            (spec.id, stage.id, stage.dataset, stage.model, stage.attack, spec.defense, stage.seed, stage.profile,
             json.dumps(_cell_config(spec), sort_keys=True),
             time.time(), json.dumps(_plugins(spec))))

    def cell_done(self, cell_id: str, result: dict) -> None:
        started, finished = _wall(result)
        self._write("UPDATE cells SET status='done', error=NULL, metrics=?, timings=?, environment=?, details=?, "
                    "measurements=?, artifacts=NULL, started=COALESCE(?, started), finished=? WHERE id=?",
                    (json.dumps(result["metrics"]), json.dumps(result["timings"]), json.dumps(result.get("environment", {})),
                     json.dumps(result.get("details", {}), default=str),
                     json.dumps(result.get("measurements", {}), default=str), started, finished, cell_id))

    def cell_failed(self, cell_id: str, error: str) -> None:
        self._write("UPDATE cells SET status='failed', error=?, finished=? WHERE id=?", (error, time.time(), cell_id))

    # --- copying -----------------------------------------------------------------------
    def export(self, destination: str | Path) -> int:
        """Copy the results, not the artifacts, to ``destination`` (replacing what is there), to be
        committed or shared: its finished cells read as done where the copy is resumed, since
        their artifacts were left behind on purpose, not lost (bench/runner.py, ``plan_pending``).
        The few small files a report reads of them (curves, a defense's figures, reversed triggers)
        go along in ``kept_files``, checked against their recorded sha256; those this store kept
        from an earlier export stay unless the artifact directory is here to replace them.
        Claims are not copied. Returns the number of finished cells copied."""
        destination = Path(destination)
        if destination.resolve() == self.path.resolve():
            raise BenchError(f"export needs another path than the store itself ({self.path})")
        if destination.is_dir():
            raise BenchError(f"export destination {destination} is a directory; give a file path, e.g. {destination / 'bench.sqlite'}")
        destination.parent.mkdir(parents=True, exist_ok=True)
        for suffix in ("-wal", "-shm"):  # a previous copy's journal would be replayed into the new one
            Path(f"{destination}{suffix}").unlink(missing_ok=True)
        with closing(self._connect()) as source, closing(sqlite3.connect(destination)) as copy:
            source.backup(copy)
            with copy:
                copy.execute("DELETE FROM claims")
                copy.execute("DELETE FROM meta WHERE key='artifacts_root'")  # the copy's artifacts are its own
                copy.execute("UPDATE cells SET artifacts=? WHERE status='done'", (NOT_KEPT,))
                finished = [row[0] for row in copy.execute("SELECT id FROM stages WHERE status='done' UNION "
                                                           "SELECT id FROM cells WHERE status='done'")]
                for item_id in finished:
                    files = report_files(self.artifacts_root / item_id)
                    if files:
                        copy.execute("DELETE FROM kept_files WHERE id=?", (item_id,))
                        copy.executemany("INSERT INTO kept_files VALUES (?,?,?)",
                                         [(item_id, name, data) for name, data in files.items()])
                done = copy.execute("SELECT COUNT(*) FROM cells WHERE status='done'").fetchone()[0]
            copy.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, fit to commit
            copy.execute("VACUUM")  # replaced blobs would otherwise leave free pages in a committed file
        return done

    # --- reading -----------------------------------------------------------------------
    def cells(self, dataset: str | None = None, status: str | None = None) -> list[dict[str, Any]]:
        """Every cell as a dict with its JSON columns decoded, in a stable order. A ``running``
        cell whose runner is gone (killed, or stopped by Ctrl-C) reads as ``interrupted``."""
        query, params = "SELECT * FROM cells", []
        if dataset is not None:
            query += " WHERE dataset=?"
            params.append(dataset)
        query += " ORDER BY dataset, attack, defense, seed, id"
        with closing(self._connect()) as conn:
            rows = conn.execute(query, params).fetchall()
            live = self._live_claims(conn)
        records = [_with_liveness(_decode(row), live) for row in rows]
        return [r for r in records if status is None or r["status"] == status]

    def stages(self, dataset: str | None = None) -> list[dict[str, Any]]:
        query, params = "SELECT * FROM stages", []
        if dataset is not None:
            query += " WHERE dataset=?"
            params.append(dataset)
        with closing(self._connect()) as conn:
            rows = conn.execute(query + " ORDER BY dataset, attack, seed", params).fetchall()
            live = self._live_claims(conn)
        return [_with_liveness(_decode(row), live) for row in rows]

    def record_catalog(self, entries: list[tuple[str, str, dict]]) -> None:
        """(kind, name, info) of the plugins a run had, replacing what an earlier run recorded of them;
        entries of plugins this run did not load stay (their cells still need them)."""
        with closing(self._connect()) as conn, conn:
            conn.executemany("INSERT INTO catalog VALUES (?,?,?) ON CONFLICT(kind, name) DO UPDATE SET info=excluded.info",
                             [(kind, name, json.dumps(info, sort_keys=True, default=str)) for kind, name, info in entries])

    def catalog(self) -> dict[str, dict[str, dict]]:
        """kind -> name -> info, as ``record_catalog`` wrote it."""
        with closing(self._connect()) as conn:
            rows = conn.execute("SELECT kind, name, info FROM catalog ORDER BY kind, name").fetchall()
        result: dict[str, dict[str, dict]] = {}
        for row in rows:
            result.setdefault(row["kind"], {})[row["name"]] = json.loads(row["info"])
        return result

    def kept_ids(self) -> set[str]:
        """The stages and cells whose report files an export kept (``export``)."""
        with closing(self._connect()) as conn:
            return {row[0] for row in conn.execute("SELECT DISTINCT id FROM kept_files")}

    def kept_files(self, item_id: str) -> dict[str, bytes]:
        """File name -> bytes of what an export kept of a stage's or cell's artifact directory."""
        with closing(self._connect()) as conn:
            return {row[0]: bytes(row[1]) for row in conn.execute("SELECT name, data FROM kept_files WHERE id=?", (item_id,))}

    def datasets(self) -> list[str]:
        with closing(self._connect()) as conn:
            return [row[0] for row in conn.execute("SELECT DISTINCT dataset FROM cells ORDER BY dataset")]


def _plugins(spec) -> list[dict]:
    """The plugins from outside the project that a cell uses (``bench.registry.plugin_origin``)."""
    from bench.registry import (
        ATTACKS,
        DATASETS,
        DEFENSES,
        METRICS,
        MODELS,
        plugin_origin,
    )

    stage = spec.stage
    used = [("defense", spec.defense, DEFENSES), ("attack", stage.attack, ATTACKS), ("dataset", stage.dataset, DATASETS),
            ("model", stage.model, MODELS), *(("metric", name, METRICS) for name in spec.metrics)]
    return [origin for kind, name, registry in used if name in registry
            and (origin := plugin_origin(registry.get(name), kind, name)) is not None]


def _cell_config(spec) -> dict:
    """The stage's config, the defense's resolved config, the fields of it the user set (so the
    report knows the default variant without re-deriving the grid) and the metrics' settings."""
    return {**_stage_config(spec.stage), "defense": spec.defense, "defense_config": spec.defense_config,
            "user_set": spec.user_set, "metrics": spec.metrics}


def _stage_config(spec) -> dict:
    import dataclasses

    return dataclasses.asdict(spec)


def _with_liveness(record: dict[str, Any], live: set[str]) -> dict[str, Any]:
    if record["status"] == "running" and record["id"] not in live:
        record["status"] = "interrupted"
    return record


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    record = dict(row)
    for key in ("config", "metrics", "timings", "environment", "details", "plugins", "measurements"):
        if key in record and record[key] is not None:
            record[key] = json.loads(record[key])
    return record


def _wall(result: dict) -> tuple[float | None, float]:
    """(started, finished) of the work behind a result: its own record when it has one (a reused
    artifact keeps the time it was made); otherwise now, with the start the running row set."""
    wall = result.get("wall")
    return (wall["started"], wall["finished"]) if wall else (None, time.time())
