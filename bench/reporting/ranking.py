"""Ranking defenses with the spread over seeds, and saying when two of them cannot be told apart.

A defense's score for one seed is its DER averaged over the attacks with a trigger (DER weighs
the ASR drop against the accuracy loss, docs/protocol.md); a seed counts only when every one of
those attacks finished for that defense, so no defense is ranked on an easier subset. Two
defenses are *separable* when the paired difference of their scores over the seeds both ran has a
95% confidence interval (Student's t) that excludes zero; the seeds pair the comparison because
both defenses start from the same undefended model of each seed. A defense's rank is then an
interval: 1 + the number of defenses separably better, up to the number not separably worse.
With one seed nothing is separable, and the table says so instead of pretending to rank.
"""
from __future__ import annotations

import math

import pandas as pd

from bench.reporting.collect import REFERENCE, Setup, has_trigger
from bench.reporting.tables import fmt, markdown_table

CONFIDENCE = 0.95


def seed_scores(setup: Setup) -> pd.DataFrame:
    """defense x seed: mean DER, ASR and C-ACC over the attacks with a trigger (complete seeds only)."""
    frame = setup.primary()
    frame = frame[frame["defense"] != REFERENCE]
    attacks = [a for a in setup.attacks if has_trigger(frame, a)]
    records = []
    for (defense, seed), group in frame[frame["attack_label"].isin(attacks)].groupby(["defense_label", "seed"]):
        done = group[(group["status"] == "done") & group["der"].notna()]
        if set(done["attack_label"]) != set(attacks):
            continue
        records.append({"defense": defense, "seed": int(seed), "der": done["der"].mean(), "asr": done["asr"].mean(),
                        "c_acc": done["c_acc"].mean()})
    return pd.DataFrame(records, columns=["defense", "seed", "der", "asr", "c_acc"])


def separable(a: pd.Series, b: pd.Series) -> int:
    """+1 when ``a`` is separably better than ``b`` (paired over common seeds), -1 when worse, 0 otherwise."""
    common = a.index.intersection(b.index)
    if len(common) < 2:
        return 0
    difference = (a[common] - b[common]).astype(float)
    spread = difference.std(ddof=1)
    mean = difference.mean()
    if spread == 0:
        return 0 if mean == 0 else (1 if mean > 0 else -1)
    from scipy.stats import t

    half_width = t.ppf(0.5 + CONFIDENCE / 2, len(common) - 1) * spread / math.sqrt(len(common))
    if mean - half_width > 0:
        return 1
    if mean + half_width < 0:
        return -1
    return 0


def ranking(setup: Setup) -> pd.DataFrame:
    """One row per ranked defense, best first: rank interval, mean ± std of each score, seeds."""
    scores = seed_scores(setup)
    if scores.empty:
        return pd.DataFrame()
    by_defense = {d: group.set_index("seed")["der"] for d, group in scores.groupby("defense")}
    rows = []
    for defense, values in by_defense.items():
        outcomes = [separable(other, values) for name, other in by_defense.items() if name != defense]
        better = sum(1 for o in outcomes if o == 1)
        worse = sum(1 for o in outcomes if o == -1)
        own = scores[scores["defense"] == defense]
        row = {"defense": defense, "best": 1 + better, "worst": len(by_defense) - worse, "seeds": len(own)}
        for name in ("der", "asr", "c_acc"):
            row[name] = own[name].mean()
            row[f"{name}_std"] = own[name].std(ddof=1) if len(own) > 1 else math.nan
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["der", "defense"], ascending=[False, True], kind="stable")


def _stat(row: pd.Series, name: str, digits: int) -> str:
    text = fmt(row[name], digits)
    return text if math.isnan(row[f"{name}_std"]) else f"{text} ± {row[f'{name}_std']:.{digits}f}"


def ranking_section(setup: Setup) -> list[str]:
    """Markdown lines: the ranking table and what it can and cannot say."""
    table = ranking(setup)
    if table.empty:
        return []
    most_seeds = int(table["seeds"].max())
    rows = [[str(r["best"]) if r["best"] == r["worst"] else f"{r['best']}–{r['worst']}", r["defense"],
             _stat(r, "der", 4), _stat(r, "asr", 2), _stat(r, "c_acc", 2), str(r["seeds"])] for _, r in table.iterrows()]
    lines = ["Each defense's default configuration, scored per seed by its DER averaged over the attacks with a "
             "trigger (seeds where every such attack finished), then mean ± std over seeds. **Rank** is an interval: "
             "two defenses share ranks unless the paired difference of their scores over common seeds has a "
             f"{CONFIDENCE:.0%} confidence interval (Student's t) that excludes zero.", ""]
    if most_seeds < 2:
        lines += ["**One seed cannot rank these defenses**: with a single seed no difference is separable from "
                  "seed-to-seed variation (in this benchmark's own runs one NONE cell moved by 25 ASR points between "
                  "two CPUs), so every defense shares every rank. Run `--seeds 0,1,2` to rank them.", ""]
    elif most_seeds < 3:
        lines += ["With two seeds the confidence intervals are wide: few pairs separate.", ""]
    lines += [markdown_table(["rank", "defense", "DER", "ASR %", "C-ACC %", "seeds"], rows,
                             ["c", "l", "r", "r", "r", "r"]), ""]
    return lines
