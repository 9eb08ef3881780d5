"""One colour per defense, the same in every figure of every report.

Colours are keyed by the sorted names of all registered defenses (plus any found in the
store), so a defense keeps its colour whichever subset a report happens to show. The
reference row is grey and NONE, the defense the benchmark centres on, has a fixed strong
colour; the rest take the colour-blind-safe palette in name order.
"""
from __future__ import annotations

import seaborn as sns

from bench.report.collect import REFERENCE

REFERENCE_COLOR = "#4d4d4d"
NONE_COLOR = "#e31a1c"
FAILED_HATCH = "///"
FAILED_EDGE = "#b0b0b0"


def defense_palette(extra: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
    from bench.registry import DEFENSES

    names = sorted((set(DEFENSES.names()) | set(extra)) - {REFERENCE, "none"})
    # colorblind minus its vermillion (NONE's), grey (the reference's) and the pale yellow and pink
    # (unreadable as thin lines on white)
    base = [c for c in sns.color_palette("colorblind", 10).as_hex()
            if c not in ("#d55e00", "#949494", "#ece133", "#fbafe4")]
    colours = base + [c for c in sns.color_palette("tab20", 20).as_hex() if c not in base]
    palette = {name: colours[i % len(colours)] for i, name in enumerate(names)}
    palette[REFERENCE] = REFERENCE_COLOR
    palette["none"] = NONE_COLOR
    return palette
