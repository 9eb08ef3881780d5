"""One colour per defense, the same in every figure of every report.

Colours are keyed by the sorted names of every defense the store's catalog records (plus any
found in its cells), so a defense keeps its colour whichever subset a report happens to show. The
reference row is grey and the focus defense, the one the benchmark centres on (the catalog says
which), has a fixed strong colour; the rest take the colour-blind-safe colours (and markers) in
name order.
"""
from __future__ import annotations

from bench.reporting.catalog import REFERENCE, Catalog

REFERENCE_COLOR = "#4d4d4d"
FOCUS_COLOR = "#d55e00"   # Okabe-Ito vermillion
FAILED_HATCH = "///"
FAILED_EDGE = "#b0b0b0"
# Colour-blind-safe colours, each distinct from the others and from the focus defense's and the
# reference's: Okabe & Ito's set (without its vermillion, the focus colour, and its yellow, too pale
# as a thin line on white), then Paul Tol's "muted" set, then the darker half of his "light" set.
COLOURS = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#000000",
           "#332288", "#117733", "#999933", "#882255", "#44aa99", "#aa4499", "#ddcc77", "#cc6677", "#88ccee",
           "#77aadd", "#ee8866", "#bbcc33")
# Markers, so that two defenses differ in shape as well as colour (and in a grey-scale print).
MARKERS = ("o", "s", "^", "D", "v", "P", "<", ">", "h", "p", "d", "H", "8", "*")
REFERENCE_MARKER = "X"
FOCUS_MARKER = "o"


def defense_palette(catalog: Catalog, extra: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
    """Defense -> colour: the recorded defenses (and any in the store's cells, ``extra``) in name
    order take the colours in turn, so a plugin defense gets the next free one."""
    palette = {name: COLOURS[i % len(COLOURS)] for i, name in enumerate(catalog.colour_order(extra))}
    palette[REFERENCE] = REFERENCE_COLOR
    if catalog.focus() is not None:
        palette[catalog.focus()] = FOCUS_COLOR
    return palette


def defense_markers(palette: dict[str, str]) -> dict[str, str]:
    """Defense -> marker, in the order ``defense_palette`` gave the colours (the focus a filled
    circle, undefended an X)."""
    others = [name for name, colour in palette.items() if name != REFERENCE and colour != FOCUS_COLOR]
    markers = {name: MARKERS[(i + 1) % len(MARKERS)] for i, name in enumerate(others)}
    markers.update({name: FOCUS_MARKER for name, colour in palette.items() if colour == FOCUS_COLOR})
    markers[REFERENCE] = REFERENCE_MARKER
    return markers
