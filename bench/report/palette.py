"""One colour per defense, the same in every figure of every report.

Colours are keyed by the sorted names of all registered defenses (plus any found in the
store), so a defense keeps its colour whichever subset a report happens to show.
"""
from __future__ import annotations

import seaborn as sns

from bench.report.collect import REFERENCE

REFERENCE_COLOR = "#4d4d4d"
FAILED_HATCH = "///"


def defense_palette(extra: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
    from bench.registry import DEFENSES

    names = sorted((set(DEFENSES.names()) | set(extra)) - {REFERENCE})
    base = sns.color_palette("colorblind", 10).as_hex()
    # grey is the reference's; skip colorblind's own grey so no defense is confused with it
    base = [c for i, c in enumerate(base) if i != 7]
    more = sns.color_palette("tab20", 20).as_hex()
    colours = base + [c for c in more if c not in base]
    palette = {name: colours[i % len(colours)] for i, name in enumerate(names)}
    palette[REFERENCE] = REFERENCE_COLOR
    return palette
