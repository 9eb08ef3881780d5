"""Selection quality of a defense that resets, prunes or masks units (NONE, Fine-Pruning, ANP, CLP):
did it pick the units that carry the backdoor?

An evaluation-only oracle, like the detection metrics: it uses ground truth the defense never
sees, the triggered test images and the attack's target (docs/protocol.md). A defense declares
its ablated units in ``DefenseResult.selection`` (bench/defense.py), keyed by the module whose
output channels (dim 1) they are. Three numbers, all measured on the *undefended* model:

- ``sel_asr``: ASR with every selected unit zeroed at once (all layers together), nothing else
  changed: what the selection alone does to the backdoor;
- ``oracle_asr``: ASR with, in each layer, as many units zeroed as the defense selected there,
  chosen as those whose single-unit ablation lowers ASR most (ties: the lower index): the best a
  per-unit ranking can do with the same budget;
- ``sel_recall``: the share of the oracle's units the defense selected, in percent.

Both ASRs are measured before any fine-tuning and on the same model, because what is compared is
the choice of units, not what a defense's later training makes of it. They are measured
separately, rather than judging the selection by the recall alone, because a defense may pick
units that no single ablation identifies: a backdoor spread over several units survives the
removal of any one of them, so the oracle's ranking can miss it, and then ``sel_asr`` below
``oracle_asr`` says the defense found what a per-unit search does not. The ablation is zeroing
the unit's output; a defense whose own ablation leaves a constant instead (ANP zeroes a
BatchNorm's gamma and keeps its beta) is judged on the zeroed units.

The images are a fixed subset of the triggered test set: the caller passes the first N triggered
samples (those whose true label is not the target, as for ASR). Percentages have two decimals,
as in bench/metrics/accuracy.py.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from bench import engine
from bench.metrics.accuracy import percent

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


def unit_counts(model: nn.Module, module_names: Sequence[str], probe: torch.Tensor) -> dict[str, int]:
    """Output channels (dim 1) of each named module, from one forward pass of ``probe`` (images).
    A module that does not run, or does not output a (batch, channels, ...) tensor, is left out:
    a defense may list such a layer as analysed and untouched (ANP lists every BatchNorm the
    model defines)."""
    counts: dict[str, int] = {}

    def record(name: str):
        def hook(module, inputs, output):
            if isinstance(output, torch.Tensor) and output.dim() >= 2:
                counts.setdefault(name, output.shape[1])
        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in _modules(model, module_names).items()]
    try:
        engine.predict(model, probe[:1])
    finally:
        for handle in handles:
            handle.remove()
    return counts


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


def _asr(hits: torch.Tensor, count: int) -> list[float]:
    # float32 division, as accuracy.attack_success_rate's float mean: the same percentages to the digit.
    return [percent(fraction) for fraction in (hits.float() / count).tolist()]


def ablation_asr(model: nn.Module, ablations: Sequence[Ablation], x_triggered: torch.Tensor,
                 y_target: torch.Tensor | int, batch_size: int = BATCH_SIZE) -> list[float]:
    """ASR (percent) of the model with each ablation's units zeroed, everything else untouched;
    an empty ablation gives the model's own ASR. The model is left as it was."""
    return _asr(_target_hits(model, ablations, x_triggered, y_target, batch_size), len(x_triggered))


def unit_ablation_asr(model: nn.Module, module_names: Sequence[str], x_triggered: torch.Tensor,
                      y_target: torch.Tensor | int, batch_size: int = BATCH_SIZE) -> dict[str, torch.Tensor]:
    """For every output channel (dim 1) of every named module, the ASR (percent, float64) of the
    model with that one channel zeroed and everything else untouched.

    ``x_triggered``: triggered images, uint8 or [0, 1] float, on any device; ``y_target``: the
    target per image, or one int. ``batch_size`` bounds the images of one forward pass (chunk of
    images times ablations evaluated together). Works on the model's device; the model is left
    as it was (its hooks are removed even when a pass fails). A module called more than once per
    forward pass is zeroed at every call. Cost: one forward pass of every image per unit."""
    counts = unit_counts(model, module_names, x_triggered)
    _require_units(counts, module_names)
    jobs = [(name, unit) for name in module_names for unit in range(counts[name])]
    asr = _asr(_target_hits(model, [{name: [unit]} for name, unit in jobs], x_triggered, y_target, batch_size),
               len(x_triggered))
    result: dict[str, list[float]] = {name: [] for name in module_names}
    for (name, _), value in zip(jobs, asr):
        result[name].append(value)
    return {name: torch.tensor(values, dtype=torch.float64) for name, values in result.items()}


def oracle_units(unit_asr: torch.Tensor, count: int) -> list[int]:
    """The ``count`` units whose single ablation gives the lowest ASR; ties go to the lower index."""
    order = sorted(range(len(unit_asr)), key=lambda unit: (float(unit_asr[unit]), unit))
    return sorted(order[:count])


@dataclass
class SelectionQuality:
    """``selection_quality``'s answer: the three metrics (bench/metrics/__init__.py), the undefended
    model's ASR on the same images, and per layer what was selected against the oracle."""

    sel_asr: float
    oracle_asr: float
    sel_recall: float | None        # None: the defense selected nothing
    baseline_asr: float
    images: int
    # name -> {"units", "count", "selected", "oracle", "overlap", "unit_asr"}; "unit_asr" (each unit's
    # single-ablation ASR) is measured only where the defense selected something, else None;
    # "units" is None for a listed layer that does not run in the forward pass.
    layers: dict[str, dict]

    def metrics(self) -> dict[str, float | None]:
        return {"sel_asr": self.sel_asr, "oracle_asr": self.oracle_asr, "sel_recall": self.sel_recall}

    def to_json(self) -> dict:
        return asdict(self)


def selection_quality(model: nn.Module, selection: Mapping[str, Sequence[int]], x_triggered: torch.Tensor,
                      y_target: torch.Tensor | int, batch_size: int = BATCH_SIZE) -> SelectionQuality:
    """How well a defense's ``selection`` (module name -> output channels it ablated) hits the
    backdoor of ``model``, the undefended model, on triggered images (see the module docstring).

    ``sel_asr``: ASR with all selected units zeroed together; ``oracle_asr``: the same with, per
    layer, the k units (k = the defense's count there) whose single ablation lowers ASR most;
    ``sel_recall``: (sum over layers of |selected & oracle|) / (sum of k), percent, None when k = 0
    everywhere (then both ASRs are the undefended one). Single-unit ASRs are measured only in
    layers with k > 0, which is where the oracle chooses."""
    chosen = {name: sorted({int(unit) for unit in units}) for name, units in selection.items()}
    counts = unit_counts(model, list(chosen), x_triggered) if chosen else {}
    active = [name for name, units in chosen.items() if units]
    _require_units(counts, active)
    for name in active:
        if not (0 <= chosen[name][0] and chosen[name][-1] < counts[name]):
            raise ValueError(f"selection of {name!r} has units outside 0..{counts[name] - 1}: {chosen[name]}")
    single = unit_ablation_asr(model, active, x_triggered, y_target, batch_size) if active else {}
    oracle = {name: oracle_units(single[name], len(chosen[name])) for name in active}
    if active:
        baseline, sel_asr, oracle_asr = ablation_asr(model, [{}, chosen, oracle], x_triggered, y_target, batch_size)
    else:
        baseline = sel_asr = oracle_asr = ablation_asr(model, [{}], x_triggered, y_target, batch_size)[0]
    layers = {}
    for name, units in chosen.items():
        picked = oracle.get(name, [])
        layers[name] = {"units": counts.get(name), "count": len(units), "selected": units, "oracle": picked,
                        "overlap": len(set(units) & set(picked)),
                        "unit_asr": single[name].tolist() if name in single else None}
    total = sum(layer["count"] for layer in layers.values())
    recall = percent(sum(layer["overlap"] for layer in layers.values()) / total) if total else None
    return SelectionQuality(sel_asr=sel_asr, oracle_asr=oracle_asr, sel_recall=recall, baseline_asr=baseline,
                            images=len(x_triggered), layers=layers)
