"""Which layers NONE analyses, and what else a channel reset must touch, read from the model's graph.

NONE resets a selected channel j of a layer by zeroing (a) the layer's filter j and bias j,
(b) gamma_j and beta_j of the BatchNorm that *directly* follows the layer, and (c) the
input slice j of the single layer that consumes the channel. Which BatchNorm and which
consumer those are is read from the model's dataflow graph, never from parameter names,
so the same code serves every architecture.

Which layers run, in what order and how often comes from one forward pass of a real batch
(``trace`` in bench/units.py), whichever method then reads the links.

Primary method: ``torch.fx`` symbolic tracing plus shape propagation on the same batch.
Convolutions, linear layers and BatchNorms (including subclasses, e.g. timm's fused
BatchNorm+activation) are kept as leaf modules so they appear as single graph nodes. A graph
that calls a module a different number of times than the forward pass did is not the model
that runs: then the fallback applies.

* The BatchNorm is linked only when it is the *only* user of the layer's output. In a
  PreAct residual block the BatchNorm comes after the residual add, so the block's last
  convolution has no BatchNorm of its own: the add mixes its channel j with the skip
  path's channel j, and zeroing a BatchNorm there would reset more than the channel.
* The consumer is linked only when the channel reaches exactly one Conv2d/Linear through
  channel-wise unary operations (activations, dropout, identity, pooling, and a flatten
  / view of an (N, C, 1, 1) tensor), each taking it as its only tensor input. Any
  residual add, concatenation, multiplication by another tensor (squeeze-excitation),
  graph output or unknown operation on the way makes the consumer ambiguous: then only
  (a) and (b) are reset, and the reason is recorded.
* A module called more than once per forward pass (weight sharing) is never analysed,
  linked or used as a consumer: its channel index does not denote one tensor.
* The activation (``act``) is linked when the only user of the BatchNorm's output (of the
  layer's own output when no BatchNorm is linked) is an elementwise activation, a module
  (``nn.ReLU``, ``nn.GELU``, ...), a function (``F.relu``, ``torch.relu``, ...) or a tensor
  method (``x.relu()``), taking it as its only tensor input. It is never reset; NONE can
  read its output instead of the layer's (``defense.none.site=act``, see ``read_sites``).

Fallback, for models fx cannot trace (data-dependent control flow): the forward pass's own
record. Tensor identities link a layer to a BatchNorm whose input is exactly that
layer's output tensor and which is the only layer or BatchNorm receiving it. Functional operations
(``x + shortcut``, ``torch.cat``) are invisible to hooks, so no consumer can be shown to
be unambiguous: in this mode no consumer slice is ever zeroed (documented in the result),
and for the same reason no activation is linked.
"""
from __future__ import annotations

import fnmatch
import functools
import inspect
import operator
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Callable, Literal, get_args

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from bench.units import ACTIVATIONS, IDENTITIES, ModelUnits, trace

ANALYSABLE = (nn.Conv2d, nn.Linear)
BATCHNORM = nn.modules.batchnorm._BatchNorm

# Elementwise activations (modules: bench/units.py's ``activation`` kind): NONE's ``act`` site,
# and channel-wise on the way to a consumer.
_ACTIVATION_FUNCTIONS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu, F.mish,
    F.hardswish, F.hardsigmoid, F.hardtanh, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh, F.softplus,
}
_ACTIVATION_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}
# Modules that map channel j of their only tensor input to channel j of their output.
_CHANNELWISE_MODULES = ACTIVATIONS + IDENTITIES + (
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)
_CHANNELWISE_FUNCTIONS = _ACTIVATION_FUNCTIONS | {
    F.dropout, F.dropout2d, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
}
_CHANNELWISE_METHODS = _ACTIVATION_METHODS | {"contiguous", "clone"}
# Reshapes keep the channel index only when every non-channel dimension is 1.
_RESHAPE_MODULES = (nn.Flatten,)
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze}
_RESHAPE_METHODS = {"flatten", "view", "reshape", "squeeze"}


@dataclass
class LayerLink:
    """One analysed layer and what its channel reset touches (module names), plus the
    activation that follows it (read by NONE's ``act`` site, never reset)."""

    name: str
    kind: str                   # "Conv2d" | "Linear"
    channels: int
    bn: str | None = None
    consumer: str | None = None
    note: str = ""              # why bn/act/consumer are absent, when they are
    act: str | None = None      # the activation's module name, or the function / method it calls
    # The activation as a callable on the tensor it receives (a module, or the function with
    # its other arguments bound), on a copy when it is in place; runtime only, not in the JSON.
    act_fn: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "act_fn"}


@dataclass
class ModelGraph:
    layers: list[LayerLink]
    method: str                 # "fx" or "hooks"
    fallback_reason: str | None = None
    excluded: dict[str, str] = field(default_factory=dict)  # analysable module -> why not analysed

    def to_json(self) -> dict:
        return {"method": self.method, "fallback_reason": self.fallback_reason,
                "layers": [layer.to_json() for layer in self.layers], "excluded": self.excluded}


class _LeafTracer(fx.Tracer):
    """Keeps convolutions, linear layers and BatchNorms (subclasses too) as single nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, ANALYSABLE + (BATCHNORM,)) or super().is_leaf_module(m, qualname)


def analyse_model(model: nn.Module, example: torch.Tensor, *, patterns: tuple[str, ...] = (),
                  include_linear: bool = False, skip_first_conv: bool = True) -> ModelGraph:
    """The analysed layers of ``model`` with their BatchNorm and consumer links.

    ``example`` is a small real input batch on the model's device (shapes are propagated
    through it). ``patterns`` (fnmatch on module names) replaces the default selection:
    every Conv2d (and Linear with ``include_linear``) except the first convolution and the
    last linear layer (the classifier).
    """
    units = trace(model, example)
    was_training = model.training
    model.eval()  # a shape-propagation pass must not move BatchNorm running statistics
    try:
        with torch.no_grad():
            try:
                return _analyse_fx(model, example, units, patterns, include_linear, skip_first_conv)
            except Exception as exc:  # tracing limits vary by model; the traced pass always applies
                reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
                return _analyse_hooks(units, patterns, include_linear, skip_first_conv, reason)
    finally:
        model.train(was_training)


def _select(order: list[tuple[str, nn.Module]], calls: dict[str, int], patterns: tuple[str, ...],
            include_linear: bool, skip_first_conv: bool) -> tuple[list[str], dict[str, str]]:
    """Analysed module names in execution order, and why each other analysable module was left out."""
    excluded: dict[str, str] = {}
    chosen: list[str] = []
    first_conv = next((name for name, m in order if isinstance(m, nn.Conv2d)), None)
    linears = [name for name, m in order if isinstance(m, nn.Linear)]
    last_linear = linears[-1] if linears else None
    for name, module in order:
        if calls[name] > 1:
            excluded[name] = f"called {calls[name]} times per forward pass (shared weights)"
        elif patterns:
            if any(fnmatch.fnmatchcase(name, p) for p in patterns):
                chosen.append(name)
            else:
                excluded[name] = "not matched by layers"
        elif skip_first_conv and name == first_conv:
            excluded[name] = "first convolution"
        elif name == last_linear:
            excluded[name] = "classifier (last linear layer)"
        elif isinstance(module, nn.Linear) and not include_linear:
            excluded[name] = "linear layer (include_linear is off)"
        else:
            chosen.append(name)
    return chosen, excluded


def _channels(module: nn.Module) -> int:
    return module.out_channels if isinstance(module, nn.Conv2d) else module.out_features


# --- torch.fx -----------------------------------------------------------------------------
def _analyse_fx(model, example, units: ModelUnits, patterns, include_linear, skip_first_conv) -> ModelGraph:
    graph = _LeafTracer().trace(model)
    gm = fx.GraphModule(model, graph)  # shares the model's modules and parameters
    ShapeProp(gm).propagate(example)
    modules = dict(model.named_modules())
    nodes = Counter(node.target for node in graph.nodes if node.op == "call_module")
    for target, count in nodes.items():
        if len(units[target].calls) != count:
            raise RuntimeError(f"the graph calls {target} {count} times, the forward pass "
                               f"{len(units[target].calls)}")
    calls = {target: len(units[target].calls) for target in nodes}
    # Modules inside a leaf node (children of a fused BatchNorm, say) have no node to link.
    order = [(unit.name, unit.module) for unit in units.executed()
             if unit.name in nodes and isinstance(unit.module, ANALYSABLE)]
    chosen, excluded = _select(order, calls, patterns, include_linear, skip_first_conv)
    node_of = {node.target: node for node in graph.nodes if node.op == "call_module"}
    layers = []
    for name in chosen:
        module = modules[name]
        link = LayerLink(name, "Conv2d" if isinstance(module, nn.Conv2d) else "Linear", _channels(module))
        node = node_of[name]
        users = list(node.users)
        source = node
        bn_reason = ""
        if len(users) == 1 and _is_module(users[0], modules, BATCHNORM) and calls[users[0].target] == 1 \
                and users[0].args[0] is node:
            link.bn = users[0].target
            source = users[0]
        elif any(_is_module(u, modules, BATCHNORM) for u in users):
            bn_reason = "the output feeds a BatchNorm and other operations; "
        link.act, link.act_fn, act_reason = _find_activation(source, modules)
        consumer, reason = _find_consumer(source, modules, calls, _channels(module))
        link.consumer = consumer
        link.note = "; ".join(part for part in (bn_reason.strip("; "), act_reason, reason) if part)
        layers.append(link)
    return ModelGraph(layers, "fx", excluded=excluded)


def _is_module(node: fx.Node, modules: dict[str, nn.Module], kind) -> bool:
    return node.op == "call_module" and isinstance(modules.get(node.target), kind)


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _other_tensor_inputs(user: fx.Node, node: fx.Node) -> bool:
    """Whether ``user`` takes a tensor other than ``node`` (e.g. the other operand of an add)."""
    inputs = [a for a in user.all_input_nodes if a is not node]
    return any(_shape(a) is not None for a in inputs) or (user.args[:1] != (node,))


def _channelwise(user: fx.Node, node: fx.Node, modules: dict[str, nn.Module], calls: dict[str, int]) -> bool:
    if _other_tensor_inputs(user, node):
        return False
    if user.op == "call_module":
        module = modules.get(user.target)
        if calls.get(user.target, 0) > 1:
            return False
        if isinstance(module, _CHANNELWISE_MODULES):
            return True
        if isinstance(module, _RESHAPE_MODULES):
            return _keeps_channel_reshape(node, user)
        return False
    if user.op == "call_function":
        if user.target in _CHANNELWISE_FUNCTIONS:
            return True
        if user.target in _RESHAPE_FUNCTIONS:
            return _keeps_channel_reshape(node, user)
        return False
    if user.op == "call_method":
        if user.target in _CHANNELWISE_METHODS:
            return True
        if user.target in _RESHAPE_METHODS:
            return _keeps_channel_reshape(node, user)
        if user.target == "mean":
            return _keeps_channel_reshape(node, user, reduce_ok=True)
    return False


def _keeps_channel_reshape(node: fx.Node, user: fx.Node, reduce_ok: bool = False) -> bool:
    before, after = _shape(node), _shape(user)
    if before is None or after is None or len(before) < 2 or len(after) < 2:
        return False
    if before[:2] != after[:2]:
        return False
    if reduce_ok:
        return all(d == 1 for d in after[2:])
    return all(d == 1 for d in before[2:]) and all(d == 1 for d in after[2:])


def _find_activation(source: fx.Node, modules: dict[str, nn.Module]) -> tuple[str | None, Callable | None, str | None]:
    """The elementwise activation applied to ``source`` and nothing else, possibly after
    identities (timm's blocks put an ``nn.Identity`` drop-block between BatchNorm and activation;
    dropout is one in eval mode, where NONE reads): (its name, it as a callable on ``source``'s
    output, None), or (None, None, why there is none)."""
    node = source
    while True:
        users = list(node.users)
        if len(users) != 1:
            return None, None, f"no activation: {_describe(node)} has {len(users)} users"
        user = users[0]
        rest = (*user.args[1:], *user.kwargs.values())
        if _other_tensor_inputs(user, node) or any(isinstance(a, fx.Node) for a in rest):
            return None, None, f"no activation: {_describe(node)} feeds {_describe(user)}"
        if not _is_module(user, modules, IDENTITIES):
            break
        node = user
    if user.op == "call_module" and isinstance(modules.get(user.target), ACTIVATIONS):
        # A shared activation module (torchvision's ResNet reuses one ReLU) is still one function.
        module = modules[user.target]
        return user.target, _out_of_place(module, bool(getattr(module, "inplace", False))), None
    if user.op == "call_function" and user.target in _ACTIVATION_FUNCTIONS:
        name = f"{getattr(user.target, '__module__', None) or 'torch'}.{user.target.__name__}"
        call = functools.partial(user.target, *user.args[1:], **user.kwargs)
        return name, _out_of_place(call, _in_place_call(user)), None
    if user.op == "call_method" and user.target in _ACTIVATION_METHODS:
        call = operator.methodcaller(user.target, *user.args[1:], **user.kwargs)
        return f"Tensor.{user.target}", _out_of_place(call, user.target.endswith("_")), None
    return None, None, f"no activation: {_describe(node)} feeds {_describe(user)}"


def _in_place_call(node: fx.Node) -> bool:
    """Whether a call_function node overwrites its input (``relu_``, or ``inplace=True`` by keyword or position)."""
    if node.target.__name__.endswith("_"):
        return True
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):  # torch's builtins have no Python signature and no inplace argument
        return False
    return bool(bound.arguments.get("inplace", False))


def _out_of_place(call: Callable, in_place: bool) -> Callable:
    """``call`` on a copy when it would overwrite its input: NONE applies it to a tensor the
    network still uses, so the copy costs memory only where the activation is in place."""
    return (lambda tensor: call(tensor.clone())) if in_place else call


def _find_consumer(source: fx.Node, modules: dict[str, nn.Module], calls: dict[str, int],
                   channels: int) -> tuple[str | None, str | None]:
    """The single Conv2d/Linear that receives ``source``'s channels through channel-wise ops, or why none."""
    frontier = [source]
    found: list[fx.Node] = []
    while frontier:
        node = frontier.pop()
        if not node.users:
            return None, "the channel reaches no layer"
        for user in node.users:
            if user.op == "output":
                return None, "the channel reaches the model output"
            if user.op == "call_module" and isinstance(modules.get(user.target), ANALYSABLE):
                if _other_tensor_inputs(user, node) or calls[user.target] > 1:
                    return None, f"{user.target} is not a plain single-input consumer"
                found.append(user)
            elif _channelwise(user, node, modules, calls):
                frontier.append(user)
            else:
                return None, f"the channel flows into {_describe(user)} (ambiguous consumer)"
    if len(found) != 1:
        return None, f"the channel feeds {len(found)} layers"
    consumer = modules[found[0].target]
    expected = consumer.in_channels if isinstance(consumer, nn.Conv2d) else consumer.in_features
    if expected != channels:
        return None, f"{found[0].target} takes {expected} inputs, not {channels} channels"
    return found[0].target, None


def _describe(node: fx.Node) -> str:
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {node.target}"


# --- the traced pass alone ------------------------------------------------------------------
def _analyse_hooks(units: ModelUnits, patterns, include_linear, skip_first_conv, reason) -> ModelGraph:
    linkable = ANALYSABLE + (BATCHNORM,)
    order = [(unit.name, unit.module) for unit in units.executed() if unit.name and isinstance(unit.module, ANALYSABLE)]
    calls = {name: len(unit.calls) for name, unit in units.units.items() if isinstance(unit.module, linkable)}
    chosen, excluded = _select(order, calls, patterns, include_linear, skip_first_conv)
    layers = []
    for name in chosen:
        module = units[name].module
        link = LayerLink(name, "Conv2d" if isinstance(module, nn.Conv2d) else "Linear", _channels(module),
                         note="hook fallback: consumers and activations cannot be shown unambiguous without a graph")
        receivers = [call.module for call in units.readers(units[name].calls[0].output)
                     if call.module and isinstance(units[call.module].module, linkable)]
        if len(receivers) == 1 and isinstance(units[receivers[0]].module, BATCHNORM) and calls[receivers[0]] == 1:
            link.bn = receivers[0]
        layers.append(link)
    return ModelGraph(layers, "hooks", fallback_reason=reason, excluded=excluded)


# --- where NONE reads a layer ---------------------------------------------------------------
Site = Literal["conv", "bn", "act"]
SITES: tuple[str, ...] = get_args(Site)


@dataclass(frozen=True)
class ReadSite:
    """Where NONE reads one analysed layer's channels: the forward output of ``module``, passed
    through ``transform`` (the linked activation, which never overwrites its input) when there is one."""

    site: str                   # the site read: "conv" (the layer's own output), "bn" or "act"
    module: str
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    fallback: str | None = None  # why the requested site was not available, when it was not


def read_sites(graph: ModelGraph, site: Site) -> dict[str, ReadSite]:
    """Each analysed layer's read site: ``site`` where the graph links it, else the nearest
    earlier one (act -> bn -> conv), with the reason. ``act`` is read by applying the linked
    activation to the BatchNorm's (or the layer's) output: an activation module may be shared
    or called in place, and a functional one has no module to hook."""
    if site not in SITES:
        raise ValueError(f"site={site!r}: must be one of {', '.join(SITES)}")
    sites: dict[str, ReadSite] = {}
    for link in graph.layers:
        if site == "act" and link.act_fn is not None:
            sites[link.name] = ReadSite("act", link.bn or link.name, link.act_fn)
        elif site != "conv" and link.bn is not None:
            fallback = None if site == "bn" else f"act -> bn: {_no_activation(graph, link.bn)}"
            sites[link.name] = ReadSite("bn", link.bn, fallback=fallback)
        elif site == "conv":
            sites[link.name] = ReadSite("conv", link.name)
        else:
            reasons = [f"no BatchNorm directly follows {link.name}"]
            if site == "act":
                reasons.append(_no_activation(graph, link.name))
            sites[link.name] = ReadSite("conv", link.name, fallback=f"{site} -> conv: {'; '.join(reasons)}")
    return sites


def _no_activation(graph: ModelGraph, source: str) -> str:
    if graph.method != "fx":
        return "the forward-hook analysis cannot see activations"
    return f"no activation directly follows {source}"


# --- the reset ------------------------------------------------------------------------------
@torch.no_grad()
def reset_channels(model: nn.Module, link: LayerLink, channels: torch.Tensor) -> None:
    """Zero the selected channels: producer filter + bias, BatchNorm gamma/beta (running
    statistics kept), and the consumer's input slice, as linked in ``link``."""
    if len(channels) == 0:
        return
    modules = dict(model.named_modules())
    producer = modules[link.name]
    index = channels.to(producer.weight.device).long()
    producer.weight[index] = 0
    if producer.bias is not None:
        producer.bias[index] = 0
    if link.bn is not None:
        bn = modules[link.bn]
        if bn.weight is not None:
            bn.weight[index] = 0
        if bn.bias is not None:
            bn.bias[index] = 0
    if link.consumer is not None:
        consumer = modules[link.consumer]
        if isinstance(consumer, nn.Linear):
            consumer.weight[:, index] = 0
        else:
            # Grouped convolution: input channel j belongs to group j // per_group and is
            # input j % per_group of that group's filters only.
            per_group = consumer.in_channels // consumer.groups
            out_per_group = consumer.out_channels // consumer.groups
            rows = (index // per_group).unsqueeze(1) * out_per_group + torch.arange(out_per_group, device=index.device)
            consumer.weight[rows, (index % per_group).unsqueeze(1)] = 0
