"""A model's units, read from one forward pass: which modules run, in what order, how often, what
they output, and which module reads which module's output.

Defenses that prune, mask, reset or read output channels, and the metrics that judge those
choices, need the same few facts about an arbitrary model; this module is the one place that
finds them. ``trace`` runs a probe batch once in eval mode with a hook on every module and
records each call; the queries below read that record:

- ``last_conv``: Fine-Pruning's last convolution (defenses/baselines/fp.py);
- ``stage_outputs``: NAD's attention layers (defenses/baselines/nad.py);
- ``conv_bn_pairs``: CLP's convolution -> BatchNorm pairs (defenses/baselines/clp.py);
- ``modules_of_kind``: ANP's BatchNorm neurons, without a forward pass (defenses/baselines/anp.py);
- ``ModelUnits.executed`` and ``ModelUnits.readers``: the layers NONE analyses and, when fx cannot
  trace the model, their BatchNorms (defenses/none/graph.py);
- ``output_channels``: the units per module of the selection metrics (bench/metrics/selection.py);
- ``last_spatial_layer``: the layer ABS-style stimulation sets (bench/metrics/reasr.py).

What hooks can see, and what they cannot: a module's calls, its output, and the identity of its
first input. A functional operation (``x + shortcut``, ``F.relu``) is invisible, so a link
``ModelUnits.readers`` reports means "this module received exactly that tensor object", never
"nothing else did something to it on the way" beyond what the tensor's version counter shows
(an in-place operation bumps it). Structural questions that need the dataflow graph (NONE's
consumers and activations) are answered by defenses/none/graph.py with torch.fx.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from bench.data.base import to_unit

Kind = Literal["conv", "linear", "batchnorm", "norm", "activation", "identity", "pool", "container", "other"]

# Elementwise activation modules: what NONE's ``act`` site links (defenses/none/graph.py).
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus,
)
# The identity in eval mode, where every trace runs.
IDENTITIES: tuple[type[nn.Module], ...] = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.AlphaDropout)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# The other normalisations NAD never takes for a stage's output (each an affine copy of its input,
# at the input's resolution): exactly those it always skipped, so its choices stay what they were.
_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
_POOLS = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
          nn.modules.pooling._AdaptiveMaxPoolNd, nn.modules.pooling._LPPoolNd)


def kind_of(module: nn.Module) -> Kind:
    """What a module is, for unit selection. The checks run in this order, so a BatchNorm with
    children (timm's BatchNorm + activation) is a ``batchnorm``; ``conv`` is a non-transposed
    Conv1d/2d/3d (or subclass), ``container`` any other module with children."""
    if isinstance(module, _CONVS) and not getattr(module, "transposed", False):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "batchnorm"
    if isinstance(module, _NORMS):
        return "norm"
    if isinstance(module, ACTIVATIONS):
        return "activation"
    if isinstance(module, IDENTITIES):
        return "identity"
    if isinstance(module, _POOLS):
        return "pool"
    return "container" if next(module.children(), None) is not None else "other"


def modules_of_kind(model: nn.Module, *kinds: Kind) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module of these kinds that the model defines, in definition order,
    whether or not it runs: no forward pass (ANP masks every BatchNorm the model has)."""
    return [(name, module) for name, module in model.named_modules() if kind_of(module) in kinds]


@dataclass(frozen=True)
class TensorRef:
    """One tensor object seen during a trace: ``id`` numbers the distinct objects of that trace
    (0, 1, ...), ``version`` is its in-place version counter when it was seen."""

    id: int
    version: int


@dataclass(frozen=True)
class Call:
    """One call of one module in the traced forward pass."""

    module: str                      # the module's name, as in ``named_modules``
    step: int                        # 0, 1, ...: when the call finished (a container after its children)
    shape: tuple[int, ...] | None    # the output's shape; None when the output is not a tensor
    input: TensorRef | None          # the first positional argument as the call started, when a tensor
    output: TensorRef | None         # the output as the call finished, when a tensor

    @property
    def channels(self) -> int | None:
        """Dim 1 of a (batch, channels, ...) output."""
        return self.shape[1] if self.shape is not None and len(self.shape) >= 2 else None

    @property
    def feature_map(self) -> tuple[int, ...] | None:
        """(height, width) of a (batch, channels, height, width) output."""
        return self.shape[2:] if self.shape is not None and len(self.shape) == 4 else None


@dataclass(frozen=True)
class Unit:
    """One module of the model and its calls in the traced pass (none: it did not run)."""

    name: str
    kind: Kind
    leaf: bool                       # no child modules
    calls: tuple[Call, ...]
    module: nn.Module = field(repr=False, compare=False)

    @property
    def ran(self) -> bool:
        return bool(self.calls)

    @property
    def channels(self) -> int | None:
        """Output channels: dim 1 of the first call's output that is a (batch, channels, ...) tensor."""
        return next((call.channels for call in self.calls if call.channels is not None), None)


@dataclass(frozen=True)
class ModelUnits:
    """``trace``'s record: every module of the model and every call, in execution order."""

    model: str                       # the model's class name, for messages
    units: dict[str, Unit]           # every module, by name, in definition order (``named_modules``)
    calls: tuple[Call, ...]          # every call, by ``step``

    def __getitem__(self, name: str) -> Unit:
        return self.units[name]

    def executed(self) -> list[Unit]:
        """The modules that ran, in the order their first call finished."""
        first: dict[str, Unit] = {}
        for call in self.calls:
            first.setdefault(call.module, self.units[call.module])
        return list(first.values())

    def readers(self, tensor: TensorRef) -> list[Call]:
        """The calls whose first input was exactly this tensor object (at any version), in order."""
        return [call for call in self.calls if call.input is not None and call.input.id == tensor.id]


def trace(model: nn.Module, probe: torch.Tensor) -> ModelUnits:
    """Run ``probe`` (a small batch of uint8 or [0, 1] float images; moved to the model's device)
    through ``model`` once in eval mode, without gradients, and record every module's calls.

    Each module's training flag is restored afterwards, so BatchNorm statistics never move. Every
    tensor a hook sees is kept alive until the trace ends, so Python ids, and with them
    ``TensorRef.id``, denote one object each: keep probes small."""
    parameter = next(model.parameters(), None)
    if parameter is not None:
        probe = probe.to(parameter.device)
    probe = to_unit(probe)
    seen: dict[int, tuple[int, torch.Tensor]] = {}  # id(tensor) -> (TensorRef.id, the tensor, kept alive)
    started: dict[str, list[TensorRef | None]] = {}  # per module, inputs of the calls still running
    calls: list[Call] = []

    def ref(value) -> TensorRef | None:
        if not isinstance(value, torch.Tensor):
            return None
        entry = seen.setdefault(id(value), (len(seen), value))
        return TensorRef(entry[0], value._version)

    def before(name: str):
        def hook(module, args):
            started.setdefault(name, []).append(ref(args[0]) if args else None)
        return hook

    def after(name: str):
        def hook(module, args, output):
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else None
            calls.append(Call(name, len(calls), shape, started[name].pop(), ref(output)))
        return hook

    modules = list(model.named_modules())
    modes = [(module, module.training) for _, module in modules]
    handles = []
    try:
        for name, module in modules:
            handles.append(module.register_forward_pre_hook(before(name)))
            handles.append(module.register_forward_hook(after(name)))
        model.eval()
        with torch.no_grad():
            model(probe)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    by_module: dict[str, list[Call]] = {}
    for call in calls:
        by_module.setdefault(call.module, []).append(call)
    units = {name: Unit(name, kind_of(module), next(module.children(), None) is None,
                        tuple(by_module.get(name, ())), module) for name, module in modules}
    return ModelUnits(type(model).__name__, units, tuple(calls))


# --- queries --------------------------------------------------------------------------------
def output_channels(model: nn.Module, names: Sequence[str], probe: torch.Tensor) -> dict[str, int]:
    """Output channels (dim 1) of each named module, from one forward pass of ``probe``. A module
    that does not run, or does not output a (batch, channels, ...) tensor, is left out: a defense
    may list such a layer as analysed and untouched (ANP lists every BatchNorm the model defines).
    ValueError for a name that is not a module. In the order the modules first output channels."""
    known = {name for name, _ in model.named_modules()}
    missing = [name for name in names if name not in known]
    if missing:
        raise ValueError(f"no module named {', '.join(map(repr, missing))} in {type(model).__name__}")
    if len(probe) == 0:  # no images, no forward pass, as engine.predict: nothing runs
        return {}
    wanted = set(names)
    counts: dict[str, int] = {}
    for call in trace(model, probe).calls:
        if call.module in wanted and call.channels is not None:
            counts.setdefault(call.module, call.channels)
    return counts


def last_conv(model: nn.Module, probe: torch.Tensor) -> str | None:
    """The ``nn.Conv2d`` whose call finishes last in a forward pass of ``probe``; None without one."""
    units = trace(model, probe)
    return next((call.module for call in reversed(units.calls)
                 if isinstance(units[call.module].module, nn.Conv2d)), None)


def conv_bn_pairs(model: nn.Module, probe: torch.Tensor) -> list[tuple[str, str | None]]:
    """(convolution, BatchNorm) for every ``conv`` that runs, in the order of their first calls: the
    BatchNorm is one whose input is exactly a tensor this convolution output, unmodified (an
    in-place operation in between, such as ``ReLU(inplace=True)``, bumps the tensor's version and
    breaks the pair); None when no BatchNorm reads it so. A convolution read by several
    BatchNorms (or one BatchNorm called on it twice) has one pair per such call, in call order."""
    units = trace(model, probe)
    pairs: list[tuple[str, str | None]] = []
    for unit in units.executed():
        if unit.kind != "conv":
            continue
        outputs = {call.output.id: call.output.version for call in unit.calls if call.output is not None}
        bns = [call.module for call in units.calls if call.input is not None and units[call.module].kind == "batchnorm"
               and outputs.get(call.input.id) == call.input.version]
        pairs += [(unit.name, bn) for bn in bns] or [(unit.name, None)]
    return pairs


def stage_outputs(model: nn.Module, probe: torch.Tensor, count: int, scope: str = "body") -> list[str]:
    """The modules whose outputs are the deepest ``count`` stages' feature maps, shallow to deep,
    named within ``scope`` (the model's ``body``; the whole model when it has no such module).

    A stage is the group of layers at one spatial size. A module's output (its last call's) is a
    candidate when it is a 4-D map at a size some ``nn.Conv2d`` of the scope outputs (a
    convolutional feature map, not e.g. a transformer's (heads, tokens, dim) tensor), larger than
    1x1 (a one-position map is constant after normalisation), and the module is not a
    normalisation (an affine copy of its input; in pre-activation blocks the next stage's first
    BatchNorm still runs at the old resolution). Per size, the candidate whose call finishes last
    is that stage's output: a container such as a ResNet stage finishes after its inner layers."""
    units = trace(model, probe)
    prefix = f"{scope}." if scope and scope in units.units else ""
    last: dict[str, Call] = {}
    conv_sizes: set[tuple[int, ...]] = set()
    for call in units.calls:
        if not call.module.startswith(prefix) or not call.module:
            continue
        last[call.module] = call
        if call.feature_map is not None and isinstance(units[call.module].module, nn.Conv2d):
            conv_sizes.add(call.feature_map)
    deepest: dict[tuple[int, ...], Call] = {}
    for name, call in last.items():
        size = call.feature_map
        if size not in conv_sizes or units[name].kind in ("batchnorm", "norm") or size[0] * size[1] <= 1:
            continue
        if size not in deepest or call.step > deepest[size].step:
            deepest[size] = call
    stages = sorted(deepest.values(), key=lambda call: call.step)
    return [call.module[len(prefix):] for call in stages[-count:]]


def last_spatial_layer(model: nn.Module, probe: torch.Tensor) -> str | None:
    """The leaf module whose call finishes last with a feature map larger than 1x1 as output (a
    (batch, channels, height, width) tensor); None when no leaf outputs one."""
    units = trace(model, probe)
    return next((call.module for call in reversed(units.calls)
                 if units[call.module].leaf and call.feature_map is not None
                 and call.feature_map[0] * call.feature_map[1] > 1), None)
