from __future__ import annotations

from bench.defense import Defense, DefenseContext, DefenseResult
from bench.registry import register_defense


@register_defense("undefended")
class Undefended(Defense):
    """No defense: the attack stage's model as trained on the poisoned data (the reference row)."""

    kind = "reference"

    def run(self, ctx: DefenseContext) -> DefenseResult:
        return DefenseResult(model=ctx.model, unchanged=True)
