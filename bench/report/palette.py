"""One colour per defense, the same in every figure of every report.

Colours are keyed by the sorted names of all registered defenses (plus any found in the
store), so a defense keeps its colour whichever subset a report happens to show. The
reference row is grey and NONE, the defense the benchmark centres on, has a fixed strong
colour; the rest take the colour-blind-safe colours (and markers) in name order.
"""
from __future__ import annotations

from bench.report.collect import REFERENCE

REFERENCE_COLOR = "#4d4d4d"
NONE_COLOR = "#d55e00"   # Okabe-Ito vermillion
FAILED_HATCH = "///"
FAILED_EDGE = "#b0b0b0"
# Colour-blind-safe colours, each distinct from the others and from NONE's and the reference's:
# Okabe & Ito's set (without its vermillion, NONE's, and its yellow, too pale as a thin line on
# white), then Paul Tol's "muted" set, then the darker half of his "light" set.
COLOURS = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#000000",
           "#332288", "#117733", "#999933", "#882255", "#44aa99", "#aa4499", "#ddcc77", "#cc6677", "#88ccee",
           "#77aadd", "#ee8866", "#bbcc33")
# Markers, so that two defenses differ in shape as well as colour (and in a grey-scale print).
MARKERS = ("o", "s", "^", "D", "v", "P", "<", ">", "h", "p", "d", "H", "8", "*")
REFERENCE_MARKER = "X"
NONE_MARKER = "o"


def _others(extra) -> list[str]:
    from bench.registry import DEFENSES

    return sorted((set(DEFENSES.names()) | set(extra)) - {REFERENCE, "none"})


def defense_palette(extra: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
    """Defense -> colour: the registered defenses (and any in the store, ``extra``) in name order
    take the colours in turn, so a plugin defense gets the next free one."""
    palette = {name: COLOURS[i % len(COLOURS)] for i, name in enumerate(_others(extra))}
    palette[REFERENCE] = REFERENCE_COLOR
    palette["none"] = NONE_COLOR
    return palette


def defense_markers(extra: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
    """Defense -> marker, in the same order as the colours (NONE a filled circle, undefended an X)."""
    markers = {name: MARKERS[(i + 1) % len(MARKERS)] for i, name in enumerate(_others(extra))}
    markers[REFERENCE] = REFERENCE_MARKER
    markers["none"] = NONE_MARKER
    return markers
