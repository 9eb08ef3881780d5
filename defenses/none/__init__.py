"""NONE (Wang et al., NeurIPS 2022), registered as ``none`` -- a defense. The no-defense
reference row is ``undefended``. Modules: ``graph`` (layers and reset links from the
model's graph), ``scoring`` (collection, channel scores, Jenks split), ``diagnostics``
(the per-cell figure), ``defense`` (the rounds)."""
from .defense import NONE, NoneConfig
from .diagnostics import render_diagnostics  # matplotlib is imported only when it draws

__all__ = ["NONE", "NoneConfig", "render_diagnostics"]
