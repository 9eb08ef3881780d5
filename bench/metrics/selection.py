"""Selection quality of a defense that resets, prunes or masks units (NONE, Fine-Pruning, ANP, CLP):
did it pick the units that carry the backdoor, and does its choice beat chance?

An evaluation-only oracle, like the detection metrics: it uses ground truth the defense never
sees, the triggered test images and the attack's target (docs/protocol.md, "Selection quality").
A defense declares its ablated units in ``DefenseResult.selection`` (bench/defense.py), keyed by
the module whose output channels (dim 1) they are. All numbers are measured on the *undefended*
model, with units zeroed and nothing else changed:

- ``sel_asr`` / ``sel_acc``: ASR and clean accuracy with every selected unit zeroed at once (all
  layers together): what the selection alone does to the backdoor, and what it costs;
- ``oracle_asr``: ASR with, in each layer, as many units zeroed as the defense selected there,
  chosen as those whose single-unit ablation lowers ASR most (ties: the lower index): the best a
  per-unit ranking can do with the same budget;
- ``rand_asr`` / ``rand_acc``: the chance baseline: mean ASR and clean accuracy over ``draws``
  seeded draws of as many units per layer, uniformly at random (each draw's values, and their
  min and max, are in the details). A selection whose ``sel_asr`` is not clearly below
  ``rand_asr`` did no better than any ablation of that size; ``sel_acc`` against ``rand_acc``
  says whether it spared the clean task better than chance;
- ``sel_recall``: the share of the oracle's units the defense selected, in percent.

They are measured before any fine-tuning and on the same model, because what is compared is the
choice of units, not what a defense's later training makes of it. ``sel_asr`` is measured apart
from the recall because a defense may pick units that no single ablation identifies: a backdoor
spread over several units survives the removal of any one of them, so the oracle's ranking can
miss it, and then ``sel_asr`` below ``oracle_asr`` says the defense found what a per-unit search
does not. The ablation is zeroing the unit's output; a defense whose own ablation leaves a
constant instead (ANP zeroes a BatchNorm's gamma and keeps its beta) is judged on the zeroed
units.

The images are fixed subsets of the test set: the first N triggered samples (those whose true
label is not the target, as for ASR) and the first N clean ones. A layer's single-unit ASRs and
the random draws for given per-layer counts depend only on the undefended model, so they are
computed once per stage (``Workspace.shared_result``) and shared by every cell that needs them.
Percentages have two decimals, as in bench/metrics/accuracy.py.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from bench import engine
from bench.config import require
from bench.metric import Column, MeasureContext, Measurement, Metric
from bench.metrics.accuracy import percent
from bench.registry import register_metric
from bench.spec import content_hash
from bench.units import output_channels

# module name -> output channels zeroed together, in every image
Ablation = Mapping[str, Sequence[int]]

# Images per forward pass (chunk of images x ablations evaluated together). On the CPU 256 was the
# fastest: small-cnn at 1x28x28, every conv unit over 1,000 images, 2 threads, 7.6 s against 9.3 s
# at 128, 11.7 s at 512 and 20 s at 1,024 (larger batches fall out of cache). A GPU wants more.
BATCH_SIZE = 256


def _targets(y_target: torch.Tensor | int, count: int, device: torch.device) -> torch.Tensor:
    y = torch.as_tensor(y_target, dtype=torch.long, device=device)
    if y.dim() == 0:
        return y.expand(count)
    if y.shape != (count,):
        raise ValueError(f"y_target has shape {tuple(y.shape)}, expected an int or ({count},) for {count} images")
    return y


def _modules(model: nn.Module, names) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    missing = [name for name in names if name not in modules]
    if missing:
        raise ValueError(f"no module named {', '.join(map(repr, missing))} in {type(model).__name__}")
    return {name: modules[name] for name in names}


def _require_units(counts: dict[str, int], names: Sequence[str]) -> None:
    missing = [name for name in names if name not in counts]
    if missing:
        raise ValueError(f"module {', '.join(map(repr, missing))} does not run in the forward pass "
                         "or does not output a (batch, channels, ...) tensor: it has no units to ablate")


@torch.no_grad()
def _target_hits(model: nn.Module, ablations: Sequence[Ablation], x: torch.Tensor, y_target: torch.Tensor | int,
                 batch_size: int) -> torch.Tensor:
    """How many images each ablation sends to the target, counted in batched forward passes.

    A pass repeats a chunk of m images k times and a forward hook zeroes, in the j-th copy,
    the units of the j-th ablation, so one pass evaluates k ablations. Zeroing happens at the
    module's output, inside the network, so residual connections and any other consumer see the
    ablated tensor, which expanding the batch mid-network would not give. k * m <= batch_size
    bounds the activations a pass holds, as ``engine.predict``'s batch size does, and the
    passes run through ``engine.predict`` itself (dtype conversion, layout, autocast)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    count = len(x)
    if count == 0:
        raise ValueError("no triggered images to measure ASR on")
    device = next(model.parameters()).device
    y = _targets(y_target, count, device)
    names = list(dict.fromkeys(name for ablation in ablations for name in ablation))
    modules = _modules(model, names)
    images = min(count, batch_size)
    copies = max(1, batch_size // images)
    # Per pass and module: which copy zeroes which unit, as index tensors built once.
    plans = []
    for first in range(0, len(ablations), copies):
        group = ablations[first:first + copies]
        pairs: dict[str, tuple[list[int], list[int]]] = {}
        for j, ablation in enumerate(group):
            for name, units in ablation.items():
                entry = pairs.setdefault(name, ([], []))
                entry[0].extend([j] * len(units))
                entry[1].extend(int(u) for u in units)
        plans.append((first, len(group), {name: (torch.tensor(c, dtype=torch.long, device=device),
                                                 torch.tensor(u, dtype=torch.long, device=device))
                                          for name, (c, u) in pairs.items() if c}))
    current: dict = {}

    def zeroing(name: str):
        def hook(module, inputs, output):
            plan = current["plan"].get(name)
            if plan is None:
                return None
            group, size = current["shape"]
            if not isinstance(output, torch.Tensor) or output.dim() < 2 or output.shape[0] != group * size:
                raise RuntimeError(f"module {name!r} does not output a (batch, channels, ...) tensor of the batch")
            # A new tensor, not an in-place edit: an in-place module (ReLU) shares storage with its input.
            ablated = output.clone()
            ablated.view(group, size, *output.shape[1:])[plan[0], :, plan[1]] = 0
            return ablated
        return hook

    hits = torch.zeros(len(ablations), dtype=torch.long, device=device)
    handles = [module.register_forward_hook(zeroing(name)) for name, module in modules.items()]
    try:
        for start in range(0, count, images):
            chunk = x[start:start + images].to(device)
            targets = y[start:start + images]
            size = len(chunk)
            for first, group, plan in plans:
                current.update(plan=plan, shape=(group, size))
                batch = chunk.repeat(group, *([1] * (chunk.dim() - 1)))
                predictions = engine.predict(model, batch, batch_size=len(batch))
                hits[first:first + group] += (predictions.view(group, size) == targets).sum(1)
    finally:
        for handle in handles:
            handle.remove()
    return hits


def _rates(hits: torch.Tensor, count: int) -> list[float]:
    # float32 division, as accuracy.attack_success_rate's float mean: the same percentages to the digit.
    return [percent(fraction) for fraction in (hits.float() / count).tolist()]


def ablation_asr(model: nn.Module, ablations: Sequence[Ablation], x: torch.Tensor,
                 labels: torch.Tensor | int, batch_size: int = BATCH_SIZE) -> list[float]:
    """Percent of the images predicted as ``labels`` with each ablation's units zeroed, everything
    else untouched: ASR for triggered images and their target, clean accuracy for clean images and
    their true labels. An empty ablation gives the model's own. The model is left as it was."""
    return _rates(_target_hits(model, ablations, x, labels, batch_size), len(x))


def unit_ablation_asr(model: nn.Module, module_names: Sequence[str], x_triggered: torch.Tensor,
                      y_target: torch.Tensor | int, batch_size: int = BATCH_SIZE) -> dict[str, torch.Tensor]:
    """For every output channel (dim 1) of every named module, the ASR (percent, float64) of the
    model with that one channel zeroed and everything else untouched.

    ``x_triggered``: triggered images, uint8 or [0, 1] float, on any device; ``y_target``: the
    target per image, or one int. ``batch_size`` bounds the images of one forward pass (chunk of
    images times ablations evaluated together). Works on the model's device; the model is left
    as it was (its hooks are removed even when a pass fails). A module called more than once per
    forward pass is zeroed at every call. Cost: one forward pass of every image per unit."""
    counts = output_channels(model, module_names, x_triggered[:1])
    _require_units(counts, module_names)
    jobs = [(name, unit) for name in module_names for unit in range(counts[name])]
    asr = _rates(_target_hits(model, [{name: [unit]} for name, unit in jobs], x_triggered, y_target, batch_size),
                 len(x_triggered))
    result: dict[str, list[float]] = {name: [] for name in module_names}
    for (name, _), value in zip(jobs, asr):
        result[name].append(value)
    return {name: torch.tensor(values, dtype=torch.float64) for name, values in result.items()}


def oracle_units(unit_asr: torch.Tensor, count: int) -> list[int]:
    """The ``count`` units whose single ablation gives the lowest ASR; ties go to the lower index."""
    order = sorted(range(len(unit_asr)), key=lambda unit: (float(unit_asr[unit]), unit))
    return sorted(order[:count])


def random_ablations(layers: Mapping[str, tuple[int, int]], draws: int, seed: int) -> list[dict[str, list[int]]]:
    """``draws`` ablations of ``k`` units drawn uniformly without replacement from each layer's
    ``n`` (``layers``: name -> (n, k)). The generator is seeded from ``seed`` and the counts, so the
    same counts give the same draws in every cell of a stage, and other counts independent ones."""
    generator = torch.Generator().manual_seed(int(content_hash({"seed": seed, "layers": dict(layers)})[:8], 16))
    return [{name: sorted(torch.randperm(n, generator=generator)[:k].tolist()) for name, (n, k) in sorted(layers.items())}
            for _ in range(draws)]


def random_baseline(model: nn.Module, layers: Mapping[str, tuple[int, int]], draws: int, seed: int,
                    x_triggered: torch.Tensor, y_target: torch.Tensor | int, x_clean: torch.Tensor | None = None,
                    y_clean: torch.Tensor | None = None, batch_size: int = BATCH_SIZE) -> dict[str, list[float]]:
    """ASR and clean accuracy (percent) of the model under each of ``random_ablations(layers, draws,
    seed)``: {"asr": [...], "acc": [...]}, one value per draw ("acc" empty without clean images)."""
    ablations = random_ablations(layers, draws, seed)
    return {"asr": ablation_asr(model, ablations, x_triggered, y_target, batch_size),
            "acc": [] if x_clean is None else ablation_asr(model, ablations, x_clean, y_clean, batch_size)}


@dataclass
class SelectionQuality:
    """``selection_quality``'s answer: the metrics (``metrics()``), the undefended model's ASR and
    accuracy on the same images, the chance baseline's draws, and per layer what was selected
    against the oracle."""

    sel_asr: float
    oracle_asr: float
    sel_recall: float | None        # None: the defense selected nothing
    sel_acc: float | None           # None: measured without clean images
    rand_asr: list[float]           # one value per random draw (empty: nothing selected, nothing to draw)
    rand_acc: list[float]
    baseline_asr: float
    baseline_acc: float | None
    images: int
    # name -> {"units", "count", "selected", "oracle", "overlap", "unit_asr"}; "unit_asr" (each unit's
    # single-ablation ASR) is measured only where the defense selected something, else None;
    # "units" is None for a listed layer that does not run in the forward pass.
    layers: dict[str, dict]

    def metrics(self) -> dict[str, float | None]:
        def mean(values: list[float]) -> float | None:
            return round(sum(values) / len(values), 2) if values else None

        return {"sel_asr": self.sel_asr, "oracle_asr": self.oracle_asr, "rand_asr": mean(self.rand_asr),
                "sel_recall": self.sel_recall, "sel_acc": self.sel_acc, "rand_acc": mean(self.rand_acc)}

    def to_json(self) -> dict:
        data = asdict(self)
        for name in ("rand_asr", "rand_acc"):
            values = data[name]
            data[f"{name}_range"] = [min(values), max(values)] if values else None
        return data


UnitAsr = Callable[[str], torch.Tensor]                                # layer -> its units' single-ablation ASR
Baseline = Callable[[Mapping[str, tuple[int, int]]], dict[str, list[float]]]  # layer -> (n, k) to draws


def selection_quality(model: nn.Module, selection: Mapping[str, Sequence[int]], x_triggered: torch.Tensor,
                      y_target: torch.Tensor | int, x_clean: torch.Tensor | None = None,
                      y_clean: torch.Tensor | None = None, *, draws: int = 5, seed: int = 0,
                      batch_size: int = BATCH_SIZE, unit_asr: UnitAsr | None = None,
                      baseline: Baseline | None = None) -> SelectionQuality:
    """How well a defense's ``selection`` (module name -> output channels it ablated) hits the
    backdoor of ``model``, the undefended model (see the module docstring).

    ``sel_asr`` / ``sel_acc``: ASR / clean accuracy with all selected units zeroed together;
    ``oracle_asr``: ASR with, per layer, the k units (k = the defense's count there) whose single
    ablation lowers ASR most; ``rand_asr`` / ``rand_acc``: ``draws`` random draws of k units per
    layer; ``sel_recall``: (sum over layers of |selected & oracle|) / (sum of k), percent, None when
    k = 0 everywhere (then the ASRs are the undefended one and there is nothing to draw).
    ``unit_asr`` and ``baseline`` compute a layer's single-unit ASRs and the draws for given
    counts; by default directly on ``model`` (a cell passes versions shared across its stage).
    Without clean images (``x_clean``), the accuracies are None."""
    chosen = {name: sorted({int(unit) for unit in units}) for name, units in selection.items()}
    counts = output_channels(model, list(chosen), x_triggered[:1]) if chosen else {}
    active = [name for name, units in chosen.items() if units]
    _require_units(counts, active)
    for name in active:
        if not (0 <= chosen[name][0] and chosen[name][-1] < counts[name]):
            raise ValueError(f"selection of {name!r} has units outside 0..{counts[name] - 1}: {chosen[name]}")
    unit_asr = unit_asr or (lambda name: unit_ablation_asr(model, [name], x_triggered, y_target, batch_size)[name])
    baseline = baseline or (lambda layers: random_baseline(model, layers, draws, seed, x_triggered, y_target, x_clean,
                                                           y_clean, batch_size))
    single = {name: unit_asr(name) for name in active}
    oracle = {name: oracle_units(single[name], len(chosen[name])) for name in active}
    chosen_active = {name: chosen[name] for name in active}
    base_asr, sel_asr, oracle_asr = ablation_asr(model, [{}, chosen_active, oracle], x_triggered, y_target, batch_size)
    base_acc = sel_acc = None
    if x_clean is not None:
        base_acc, sel_acc = ablation_asr(model, [{}, chosen_active], x_clean, y_clean, batch_size)
    drawn = baseline({name: (counts[name], len(chosen[name])) for name in active}) if active else {"asr": [], "acc": []}
    layers = {}
    for name, units in chosen.items():
        picked = oracle.get(name, [])
        layers[name] = {"units": counts.get(name), "count": len(units), "selected": units, "oracle": picked,
                        "overlap": len(set(units) & set(picked)),
                        "unit_asr": single[name].tolist() if name in single else None}
    total = sum(layer["count"] for layer in layers.values())
    recall = percent(sum(layer["overlap"] for layer in layers.values()) / total) if total else None
    return SelectionQuality(sel_asr=sel_asr, oracle_asr=oracle_asr, sel_recall=recall, sel_acc=sel_acc,
                            rand_asr=drawn["asr"], rand_acc=drawn["acc"], baseline_asr=base_asr, baseline_acc=base_acc,
                            images=len(x_triggered), layers=layers)


@dataclass
class SelectionConfig:
    # Triggered test images behind the oracle (and as many clean ones for the accuracies); 0: off.
    # Linear cost: every unit of every layer a defense selects in is ablated once over them.
    samples: int = 1000
    # Random draws of the chance baseline (mean, min and max over them).
    draws: int = 5

    def __post_init__(self) -> None:
        require(self, samples=">= 0", draws=">= 1")


@register_metric("selection")
class Selection(Metric):
    """Did the units a defense ablated carry the backdoor: against an oracle's and a random choice.

    Measured on the cells whose defense declares the units it ablated (``DefenseResult.selection``),
    on attacks with a trigger."""

    Config = SelectionConfig
    version = "2"  # 2: the chance baseline (rand_asr, rand_acc) and sel_acc
    title = "Did the defense hit the backdoor's units?"
    description = (
        "Measured on the undefended model, before any fine-tuning, on the first test images (the "
        "defense never sees them): **selection ASR** zeroes exactly the units the defense selected; **oracle "
        "ASR** zeroes as many units per layer, chosen by their own effect on ASR; **random ASR** zeroes as many "
        "units per layer drawn at random (mean of the draws, [min–max]); **recall** is the share of the oracle's "
        "units the defense selected; **selection / random C-ACC** are the clean accuracies under the same "
        "ablations. A selection no lower than random did no better than chance; selection ASR below the oracle's "
        "means the backdoor sits in units that only matter together.")
    columns = (
        Column("sel_asr", "selection ASR", "lower",
               description="ASR of the undefended model after ablating the defense's selected units only"),
        Column("oracle_asr", "oracle ASR", "lower",
               description="ASR after ablating as many units per layer, chosen by their own effect on ASR"),
        Column("rand_asr", "random ASR", "lower",
               description="mean ASR after ablating as many units per layer, drawn uniformly at random"),
        Column("sel_recall", "selection recall", "higher",
               description="share of the oracle's top units that the defense selected"),
        Column("sel_acc", "selection C-ACC", "higher",
               description="clean accuracy of the undefended model with the selected units ablated"),
        Column("rand_acc", "random C-ACC", "higher",
               description="mean clean accuracy with as many units per layer ablated at random"),
    )

    def measure(self, ctx: MeasureContext) -> Measurement:
        config: SelectionConfig = self.config
        if config.samples == 0 or ctx.selection is None or ctx.triggered is None:
            return Measurement()
        x_trig, _, y_target = (t[:config.samples] for t in ctx.triggered)
        x_clean, y_clean = ctx.test.x[:config.samples], ctx.test.y[:config.samples]
        undefended = ctx.undefended_model()
        # the CPU is fastest at the oracle's own batch (measured there); a GPU wants the profile's larger one
        batch_size = max(BATCH_SIZE, ctx.batch_size) if ctx.device.type == "cuda" else BATCH_SIZE
        stage = ctx.spec.stage

        def unit_asr(name: str) -> torch.Tensor:
            def compute(_directory) -> dict:
                return {"unit_asr": unit_ablation_asr(undefended, [name], x_trig, y_target, batch_size)[name].tolist()}
            result, _ = ctx.shared.shared_result(stage, "unit-asr", {"layer": name, "samples": config.samples}, compute)
            return torch.tensor(result["unit_asr"], dtype=torch.float64)

        def baseline(layers: Mapping[str, tuple[int, int]]) -> dict[str, list[float]]:
            key = {"layers": {name: list(nk) for name, nk in sorted(layers.items())}, "samples": config.samples,
                   "draws": config.draws}
            result, _ = ctx.shared.shared_result(
                stage, "random-units", key,
                lambda _directory: random_baseline(undefended, layers, config.draws, ctx.seed, x_trig, y_target, x_clean,
                                                   y_clean, batch_size))
            return {"asr": result["asr"], "acc": result["acc"]}

        quality = selection_quality(undefended, ctx.selection, x_trig, y_target, x_clean, y_clean, draws=config.draws,
                                    seed=ctx.seed, batch_size=batch_size, unit_asr=unit_asr, baseline=baseline)
        return Measurement(quality.metrics(), quality.to_json())
