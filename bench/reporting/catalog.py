"""What the report knows of the plugins: only what the runs recorded in the results store
(bench/store.py, ``catalog``), never the plugins' code. Display names, the focus defense, colour
order, which attacks have a trigger, and every metric's columns with their display names,
directions and heatmaps (bench/metric.py declares them)."""
from __future__ import annotations

from dataclasses import dataclass, field

REFERENCE = "undefended"


@dataclass
class Catalog:
    metrics: dict[str, dict] = field(default_factory=dict)    # name -> {"title", "description", "columns": [...]}
    defenses: dict[str, dict] = field(default_factory=dict)   # name -> {"display", "kind", "focus", "headline", ...}
    attacks: dict[str, dict] = field(default_factory=dict)    # name -> {"has_trigger", "description"}
    profiles: dict[str, dict] = field(default_factory=dict)   # name -> {"description"}
    datasets: dict[str, dict] = field(default_factory=dict)   # name -> {"description", "variants": {variant: source}}

    @staticmethod
    def from_store(store) -> "Catalog":
        recorded = store.catalog()
        return Catalog(recorded.get("metric", {}), recorded.get("defense", {}), recorded.get("attack", {}),
                       recorded.get("profile", {}), recorded.get("dataset", {}))

    @property
    def columns(self) -> dict[str, dict]:
        """Every recorded column, name -> its declaration plus ``metric``, in metric then column order."""
        return {column["name"]: {**column, "metric": name} for name, metric in self.metrics.items()
                for column in metric.get("columns", [])}

    def metric_columns(self, metric: str) -> tuple[str, ...]:
        return tuple(column["name"] for column in self.metrics.get(metric, {}).get("columns", []))

    def display(self, column: str) -> str:
        return self.columns.get(column, {}).get("display", column)

    def defense_display(self, defense: str) -> str:
        return self.defenses.get(defense, {}).get("display") or defense

    def focus(self) -> str | None:
        """The defense the benchmark centres on, as its plugin declared (``Defense.focus``)."""
        focused = sorted(name for name, info in self.defenses.items() if info.get("focus"))
        return focused[0] if focused else None

    def headline(self, defense: str) -> str:
        return self.defenses.get(defense, {}).get("headline", "")

    def colour_order(self, extra=()) -> list[str]:
        """The recorded defenses (and any others in ``extra``) in name order, reference and focus
        apart: a defense keeps its colour whichever subset a report shows."""
        return sorted((set(self.defenses) | set(extra)) - {REFERENCE, self.focus()})

    def data_source(self, dataset: str, variant: str) -> str:
        """What a dataset's name stood for in a setup: the published data, or the variant's own words."""
        if not variant:
            return "the published dataset"
        return self.datasets.get(dataset, {}).get("variants", {}).get(variant) or f"variant {variant!r}"

    def has_trigger(self, attack: str) -> bool | None:
        """Whether the attack has a trigger; None when the store did not record the attack."""
        info = self.attacks.get(attack)
        return None if info is None else bool(info.get("has_trigger", True))
