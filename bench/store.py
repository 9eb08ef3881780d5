"""The results store: one SQLite file, one row per stage and per cell.

Only the runner process writes it. Every write is one transaction; a cell is marked
``done`` only after its artifacts were renamed into place, so a crash at any point
leaves either a finished cell or one that the next run redoes.
"""
from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Any, Iterator

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
    metrics TEXT, timings TEXT, environment TEXT, details TEXT, started REAL, finished REAL
);
CREATE INDEX IF NOT EXISTS cells_by_dataset ON cells(dataset, status);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

STATUSES = ("running", "done", "failed")


class ResultStore:
    def __init__(self, path: str | Path, artifacts_root: str | Path | None = None) -> None:
        """``artifacts_root`` defaults to the store's directory (<store dir>/<id>/); a
        different one (a shared filesystem for a cluster) is remembered in the store."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as conn, conn:
            conn.executescript(SCHEMA)
            if artifacts_root is not None:
                conn.execute("INSERT INTO meta VALUES ('artifacts_root', ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                             (str(Path(artifacts_root).resolve()),))
            row = conn.execute("SELECT value FROM meta WHERE key='artifacts_root'").fetchone()
        self.artifacts_root = Path(row[0]) if row else self.path.parent

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    def _write(self, sql: str, params: tuple) -> None:
        with closing(self._connect()) as conn, conn:
            conn.execute(sql, params)

    # --- stages ----------------------------------------------------------------------
    def stage_status(self, stage_id: str) -> str | None:
        with closing(self._connect()) as conn:
            row = conn.execute("SELECT status FROM stages WHERE id=?", (stage_id,)).fetchone()
        return row["status"] if row else None

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
    def cell_status(self, cell_id: str) -> str | None:
        with closing(self._connect()) as conn:
            row = conn.execute("SELECT status FROM cells WHERE id=?", (cell_id,)).fetchone()
        return row["status"] if row else None

    def cell_running(self, spec) -> None:
        stage = spec.stage
        self._write(
            "INSERT INTO cells (id, stage_id, dataset, model, attack, defense, seed, profile, config, status, started) "
            "VALUES (?,?,?,?,?,?,?,?,?,'running',?) ON CONFLICT(id) DO UPDATE SET status='running', error=NULL, started=excluded.started",
            (spec.id, stage.id, stage.dataset, stage.model, stage.attack, spec.defense, stage.seed, stage.profile,
             json.dumps({**_stage_config(stage), "defense": spec.defense, "defense_config": spec.defense_config}, sort_keys=True),
             time.time()))

    def cell_done(self, cell_id: str, result: dict) -> None:
        started, finished = _wall(result)
        self._write("UPDATE cells SET status='done', error=NULL, metrics=?, timings=?, environment=?, details=?, "
                    "started=COALESCE(?, started), finished=? WHERE id=?",
                    (json.dumps(result["metrics"]), json.dumps(result["timings"]), json.dumps(result.get("environment", {})),
                     json.dumps(result.get("details", {}), default=str), started, finished, cell_id))

    def cell_failed(self, cell_id: str, error: str) -> None:
        self._write("UPDATE cells SET status='failed', error=?, finished=? WHERE id=?", (error, time.time(), cell_id))

    # --- reading -----------------------------------------------------------------------
    def cells(self, dataset: str | None = None, status: str | None = None) -> list[dict[str, Any]]:
        """Every cell as a dict with its JSON columns decoded, in a stable order."""
        query, params = "SELECT * FROM cells", []
        clauses = []
        if dataset is not None:
            clauses.append("dataset=?")
            params.append(dataset)
        if status is not None:
            clauses.append("status=?")
            params.append(status)
        if clauses:
            query += " WHERE " + " AND ".join(clauses)
        query += " ORDER BY dataset, attack, defense, seed, id"
        with closing(self._connect()) as conn:
            rows = conn.execute(query, params).fetchall()
        return [_decode(row) for row in rows]

    def stages(self, dataset: str | None = None) -> list[dict[str, Any]]:
        query, params = "SELECT * FROM stages", []
        if dataset is not None:
            query += " WHERE dataset=?"
            params.append(dataset)
        with closing(self._connect()) as conn:
            rows = conn.execute(query + " ORDER BY dataset, attack, seed", params).fetchall()
        return [_decode(row) for row in rows]

    def datasets(self) -> list[str]:
        with closing(self._connect()) as conn:
            return [row[0] for row in conn.execute("SELECT DISTINCT dataset FROM cells ORDER BY dataset")]


def _stage_config(spec) -> dict:
    import dataclasses

    return dataclasses.asdict(spec)


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    record = dict(row)
    for key in ("config", "metrics", "timings", "environment", "details"):
        if key in record and record[key] is not None:
            record[key] = json.loads(record[key])
    return record


def _wall(result: dict) -> tuple[float | None, float]:
    """(started, finished) of the work behind a result: its own record when it has one (a reused
    artifact keeps the time it was made); otherwise now, with the start the running row set."""
    wall = result.get("wall")
    return (wall["started"], wall["finished"]) if wall else (None, time.time())
