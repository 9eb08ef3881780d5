"""Markdown tables of a report: setup, results, detection, cost, failures, reproduce command.

Numbers are printed exactly as the store holds them (two decimals for percentages, four
for DER); a failed entry reads "failed", a missing one "—", never a blank or a zero.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import shlex

import pandas as pd

from bench.reporting.collect import (
    MAIN_METRICS,
    Setup,
    aggregate,
    has_trigger,
    lookup,
    short,
    status_of,
    swept_fields,
    varying_fields,
)

# First line of every generated page: what made it, and where hand-written notes go instead.
# GENERATED is its start in every version of it: how a generated page (this code's or an older
# one's) is told from a hand-written one.
GENERATED = "<!-- Generated from the results store by bench"
HEADER = ("<!-- Generated from the results store by bench.reporting (`python -m bench report`); edits are overwritten. "
          "Put hand-written notes in NOTES.md beside this file: they are included below. -->")


def page_start(directory, title: str) -> list[str]:
    """The first lines of a generated page in ``directory``: HEADER, the title, then NOTES.md
    beside the page, verbatim, when there is one."""
    lines = [HEADER, "", f"# {title}", ""]
    notes = directory / "NOTES.md"
    if notes.is_file():
        lines += [notes.read_text().strip(), ""]
    return lines

DASH = "—"
DIGITS = {"der": 4, "det_flagged": 0, "poisoned": 0}


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    return f"{value:.{digits}f}"


def fmt_stat(record, name: str) -> str:
    """``mean`` or ``mean ± std`` (std over seeds, shown when two or more were done)."""
    digits = DIGITS.get(name, 2)
    text = fmt(record[name], digits)
    std = record.get(f"{name}_std", math.nan)
    if text != DASH and not math.isnan(std):
        text += f" ± {std:.{digits}f}"
    return text


def markdown_table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> str:
    def clean(text) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    align = align or ["l"] + ["r"] * (len(header) - 1)
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(clean(h) for h in header) + " |", "| " + " | ".join(marks[a] for a in align) + " |"]
    lines += ["| " + " | ".join(clean(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def partial_note(record) -> str:
    return f" ({record['n_done']}/{record['n']} seeds; {record['n_failed']} failed, {record['n_running']} running)"


def entry_text(record, status: str, names: tuple[str, ...], sep: str = " / ") -> str:
    if status == "missing":
        return DASH
    if status == "failed":
        return "**failed**"
    if status == "running":
        return "running"
    text = sep.join(fmt_stat(record, name) for name in names)
    return text + (partial_note(record) if status == "partial" else "")


def results_table(setup: Setup) -> str:
    """Rows: defenses (and their variants); columns: attacks; each entry C-ACC / ASR / RA · DER."""
    table = aggregate(setup.cells, ["defense_label", "attack_label"], MAIN_METRICS)
    attacks = setup.attacks
    rows = []
    for defense in setup.defenses:
        row = [defense]
        for attack in attacks:
            record = lookup(table, defense_label=defense, attack_label=attack)
            status = status_of(record)
            if status in ("done", "partial"):
                text = " / ".join(fmt_stat(record, name) for name in ("c_acc", "asr", "ra"))
                text += " · " + fmt_stat(record, "der") + (partial_note(record) if status == "partial" else "")
            else:
                text = entry_text(record, status, ())
            row.append(text)
        rows.append(row)
    return markdown_table(["defense \\ attack", *attacks], rows, ["l"] + ["c"] * len(attacks))


DETECTION = ("det_precision", "det_recall", "det_fpr", "det_flagged")  # bench/metrics/detection.py's columns


def detection_table(setup: Setup, focus: str) -> str | None:
    """Defenses that flag training samples (NONE, ABL, ...): precision / recall / FPR per attack;
    the focus defense always has its rows, so that "flagged nothing" shows."""
    frame = setup.cells
    flagging = [d for d in setup.defenses if frame.loc[frame["defense_label"] == d, "det_recall"].notna().any()
                or frame.loc[frame["defense_label"] == d, "defense"].iloc[0] == focus]
    if not flagging:
        return None
    table = aggregate(frame, ["defense_label", "attack_label"], DETECTION + ("poisoned",))
    rows = []
    for defense in flagging:
        for attack in setup.attacks:
            record = lookup(table, defense_label=defense, attack_label=attack)
            status = status_of(record)
            if status in ("done", "partial"):
                cells = [fmt_stat(record, name) for name in DETECTION + ("poisoned",)]
                if status == "partial":
                    cells[-1] += f" ({record['n_done']}/{record['n']} seeds done)"
            else:
                cells = [entry_text(record, status, ())] + [DASH] * 4
            rows.append([defense, attack, *cells])
    return markdown_table(["defense", "attack", "precision %", "recall %", "FPR %", "flagged", "poisoned"], rows)


def metric_table(setup: Setup, columns: list[dict]) -> str | None:
    """One row per (defense, attack) with a value in any of ``columns`` (as the catalog records
    them: name, display, unit), mean ± std over seeds: the section of a metric without one of its own."""
    names = tuple(column["name"] for column in columns)
    frame = setup.cells
    if not names or not frame[list(names)].notna().any().any():
        return None
    table = aggregate(frame, ["defense_label", "attack_label"], names)
    rows = []
    for defense in setup.defenses:
        for attack in setup.attacks:
            record = lookup(table, defense_label=defense, attack_label=attack)
            status = status_of(record)
            if status not in ("done", "partial") or all(math.isnan(record[name]) for name in names):
                continue
            rows.append([defense, attack, *(fmt_stat(record, name) for name in names)])
    header = [f"{column['display']} ({column['unit']})" if column.get("unit") else column["display"] for column in columns]
    return markdown_table(["defense", "attack", *header], rows) if rows else None


def cost_table(setup: Setup) -> str:
    """Wall seconds: the attack stage (training the undefended model, shared by all defenses)
    and each defense on top of it; mean over seeds."""
    frame = setup.cells
    stage_times = frame.drop_duplicates("stage_id")
    defense_times = aggregate(frame, ["defense_label", "attack_label"], ("defense_s", "metrics_s"))
    defenses = setup.defenses
    rows = []
    for attack in setup.attacks:
        stages = stage_times[stage_times["attack_label"] == attack]
        values = stages["stage_s"].dropna()
        row = [attack, fmt(values.mean(), 1) if len(values) else _stage_state(stages)]
        for defense in defenses:
            record = lookup(defense_times, defense_label=defense, attack_label=attack)
            status = status_of(record)
            row.append(fmt(record["defense_s"], 1) if status in ("done", "partial") else entry_text(record, status, ()))
        rows.append(row)
    return markdown_table(["attack", "attack stage", *defenses], rows)


def _stage_state(stages: pd.DataFrame) -> str:
    states = set(stages["stage_status"].dropna())
    if "failed" in states:
        return "**failed**"
    return "running" if "running" in states else DASH


def failures_table(setup: Setup, stages: dict[str, dict]) -> str | None:
    frame = setup.cells
    rows = []
    for _, cell in frame[frame["status"] != "done"].iterrows():
        error = cell["error"] or ""
        stage_error = (stages.get(cell["stage_id"]) or {}).get("error") or ""
        if not error and stage_error:
            error = f"attack stage: {stage_error}"
        first = error.strip().splitlines()[0] if error.strip() else ""
        rows.append([cell["attack_label"], cell["defense_label"], str(cell["seed"]), cell["status"],
                     first[:200] or DASH, f"`{cell['id']}`"])
    if not rows:
        return None
    return markdown_table(["attack", "defense", "seed", "status", "error", "cell"], rows, ["l"] * 6)


def _utc(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _recipe(config: dict | None) -> str:
    if not config:
        return DASH
    text = f"{config.get('epochs')} epochs, {config.get('optimizer')} lr {short(config.get('lr'))}"
    if config.get("optimizer") == "sgd":
        text += f" momentum {short(config.get('momentum'))}"
    text += f", weight decay {short(config.get('weight_decay'))}, batch {config.get('batch_size')}, {config.get('schedule')}"
    text += ", augmentation" if config.get("augment") else ", no augmentation"
    return text


def compute_seconds(setup: Setup) -> float:
    """Wall time of every stage and cell of the setup (what running it again would take here)."""
    frame = setup.cells
    stages = frame.drop_duplicates("stage_id")["stage_s"].fillna(0).sum()
    return float(stages + frame["defense_s"].fillna(0).sum() + frame["metrics_s"].fillna(0).sum())


def setup_table(setup: Setup, dataset: str, catalog) -> str:
    frame = setup.cells
    d = setup.description
    environments = [e for e in frame["environment"] if e]
    devices = sorted({e.get("device", "?") for e in environments})
    hosts = sorted({e.get("host", "?") for e in environments})
    cpus = sorted({e["cpu"] for e in environments if e.get("cpu")})  # stores before 2026-12-05 lack it
    versions = sorted({f"bench {e.get('bench')}, torch {e.get('torch')}, torchvision {e.get('torchvision')}, "
                       f"python {e.get('python')}" for e in environments})
    finished = frame["finished"].dropna()
    rates = []
    for attack in setup.attacks:
        sub = frame[frame["attack_label"] == attack]
        config = sub.iloc[0]["attack_config"]
        achieved = sub.drop_duplicates("stage_id")["poison_rate"].dropna()
        if not has_trigger(frame, attack):
            rates.append(f"{attack}: no poisoning")
        elif "poison_rate" in config:
            text = f"{attack}: {100 * config['poison_rate']:g}% requested"
            if len(achieved):
                text += f", {achieved.mean():.2f}% achieved"
            text += f" (target {config.get('target')}, {config.get('target_mode')})"
            rates.append(text)
    counts = frame["status"].value_counts()
    seeds = sorted(frame["seed"].unique().tolist())
    rows = [
        ["dataset", dataset], ["data", catalog.data_source(dataset, d.get("data_variant", ""))],
        ["model", d.get("model")], ["profile", d.get("profile")],
        ["seeds", ", ".join(map(str, seeds)) + (" (mean ± sample std over seeds)" if len(seeds) > 1 else "")],
        ["attack stage training", _recipe(d.get("train"))], ["fine-tuning recipe (defaults)", _recipe(d.get("finetune"))],
        ["poisoning", "; ".join(rates) or DASH],
        ["cells", ", ".join(f"{counts.get(s, 0)} {s}" for s in ("done", "failed", "running", "interrupted") if counts.get(s, 0))],
        ["device", "; ".join(devices) or DASH], ["host", ", ".join(hosts) or DASH],
        ["CPU", "; ".join(cpus) or "not recorded"],
        ["versions", "; ".join(versions) or DASH],
        ["results dated", f"{_utc(finished.min())} – {_utc(finished.max())}" if len(finished) else DASH],
        ["compute time", f"{compute_seconds(setup) / 60:.1f} min (sum of stage and cell wall times)"],
    ]
    return markdown_table(["", ""], [[f"**{k}**", v] for k, v in rows], ["l", "l"])


def _cli_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"  # what the command line reads as None (bench/config.py)
    return short(value)


def _config_overrides(prefix: str, configs: list[dict], swept: list[str]) -> list[str]:
    """``prefix.field=v1,v2`` for the swept fields of these configurations."""
    result = []
    for key in swept:
        values = list(dict.fromkeys(_cli_value(config.get(key)) for config in configs))
        result.append(f"{prefix}.{key}={','.join(values)}")
    return result


def _user_overrides(frame: pd.DataFrame) -> list[str]:
    """The ``-o`` options the cells were run with, as each recorded the fields its user set, with
    the values of a sweep joined in the order they first appear."""
    values: dict[str, list[str]] = {}
    for _, row in frame.iterrows():
        user_set = row["user_set"]
        for section, name in (("attack", row["attack"]), ("defense", row["defense"]), ("train", None),
                              ("finetune", None)):
            for key, value in (user_set.get(section) or {}).items():
                option = f"{section}.{name}.{key}" if name else f"{section}.{key}"
                if _cli_value(value) not in values.setdefault(option, []):
                    values[option].append(_cli_value(value))
        for metric, settings in (user_set.get("metric") or {}).items():
            for key, value in settings.items():
                option = f"metric.{metric}.{key}"
                if _cli_value(value) not in values.setdefault(option, []):
                    values[option].append(_cli_value(value))
    return [f"{option}={','.join(vals)}" for option, vals in sorted(values.items())]


def reproduce_commands(setup: Setup, dataset: str) -> list[str]:
    """``python -m bench run`` commands that re-create the setup's cells, rebuilt from the store.

    Cells that were run with the same *fields* set (whatever their values: a sweep) share one
    command; cells run with other fields set get their own (e.g. a grid at the defaults and a
    sweep of one defense run afterwards), so no command multiplies sweeps that were run apart."""
    frame = setup.cells
    if not all(isinstance(user_set, dict) for user_set in frame["user_set"]):
        return [reproduce_command(setup, dataset)]  # a store from before the user's fields were recorded
    groups: dict[str, list] = {}
    for index, user_set in frame["user_set"].items():
        shape = {section: sorted(values) if section in ("attack", "defense") else values
                 for section, values in user_set.items() if values}
        groups.setdefault(json.dumps(shape, sort_keys=True, default=str), []).append(index)
    return [reproduce_command(setup, dataset, frame.loc[indices]) for indices in groups.values()]


def reproduce_command(setup: Setup, dataset: str, frame: pd.DataFrame | None = None) -> str:
    """One ``python -m bench run`` command for ``frame`` (default: the setup's cells): the plugin
    files, the setup, and the ``-o`` options each cell recorded as set by its user."""
    frame = setup.cells if frame is None else frame
    d = setup.description
    parts = ["python -m bench run"]
    # The --plugin files the cells used, at the paths they were loaded from (their code is part of the ids).
    files = sorted({p["path"] for plugins in frame.get("plugins", []) for p in plugins or [] if p.get("via") == "file"})
    parts += [f"--plugin {shlex.quote(path)}" for path in files]
    # the model always: a profile's default model may change, the command must not
    parts += [f"--dataset {dataset}", f"--profile {d.get('profile')}", f"--model {d.get('model')}"]
    parts.append("--attacks " + ",".join(sorted(frame["attack"].unique())))
    parts.append("--defenses " + ",".join(sorted(frame["defense"].unique())))
    seeds = sorted(frame["seed"].unique().tolist())
    if seeds != [0]:
        parts.append("--seeds " + ",".join(map(str, seeds)))
    if all(isinstance(user_set, dict) for user_set in frame["user_set"]):
        overrides = _user_overrides(frame)
    else:  # a store written before the user's fields were recorded: the sweeps, at least
        overrides = []
        for kind in ("attack", "defense"):
            for name in sorted(frame[kind].unique()):
                sub = frame[frame[kind] == name]
                swept = varying_fields(list(sub["attack_config"])) if kind == "attack" else swept_fields(frame, name)
                overrides += _config_overrides(f"{kind}.{name}", list(sub[f"{kind}_config"]), swept)
    parts += [f"-o {o}" for o in overrides]
    return " ".join(parts)
