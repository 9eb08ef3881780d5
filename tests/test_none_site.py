"""NONE's read site (``defense.none.site``: conv | bn | act) on hand-built models whose per-channel
maxima are computed by hand, its fallbacks, and the selection NONE declares."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.config import build_config
from bench.data.base import DatasetInfo, ImageSet
from bench.defense import DefenseContext
from bench.device import memory_format
from bench.engine import TrainConfig
from bench.errors import BenchError
from bench.models.base import ImageClassifier, build_model
from defenses.none import NoneConfig
from defenses.none.defense import NONE
from defenses.none.graph import analyse_model, read_sites
from defenses.none.scoring import collect

# Mean 0, std 1: the model sees the pixels themselves, so every value below is exact.
INFO = DatasetInfo("t", 2, (1, 2, 2), mean=(0.0,), std=(1.0,), hflip=False)

# Sample A has pixels 0 and 1, sample B only 0 (as x in [0, 1]: uint8 0 and 255).
IMAGES = ImageSet(torch.tensor([[[[0, 255], [255, 0]]], [[[0, 0], [0, 0]]]], dtype=torch.uint8),
                  torch.tensor([0, 1]))

# The analysed convolution (1x1, one input channel) computes w x + b per channel:
#   ch0 = x, ch1 = 2x - 1, ch2 = 0.5 - x; the BatchNorm (mean 0, var 1, eps 0) g y + beta:
#   ch0 = x, ch1 = -(2x - 1) + 3 = 4 - 2x (negative gamma: its maximum moves to x = 0),
#   ch2 = 2 (0.5 - x) - 10 = -9 - 2x (all negative: 0 after ReLU). Maxima over space, for A and B:
EXPECTED = {
    "conv": [[1.0, 1.0, 0.5], [0.0, -1.0, 0.5]],
    "bn": [[1.0, 4.0, -9.0], [0.0, 4.0, -9.0]],
    "act": [[1.0, 4.0, 0.0], [0.0, 4.0, 0.0]],
}


class _ConvBnAct(nn.Module):
    """stem -> conv -> BatchNorm -> activation -> average pool, with the activation given as a
    module, a torch.nn.functional call (also an in-place one), a torch function or a tensor method; ``bn=False`` drops
    the BatchNorm, ``residual=True`` adds the stem's output after the BatchNorm instead of the
    activation (so no activation directly follows it)."""

    def __init__(self, activation: str = "module", bn: bool = True, residual: bool = False,
                 module: nn.Module | None = None) -> None:
        super().__init__()
        self.activation, self.residual = activation, residual
        self.stem = nn.Conv2d(1, 1, 1, bias=False)
        self.conv = nn.Conv2d(1, 3, 1)
        self.bn = nn.BatchNorm2d(3, eps=0.0) if bn else None
        self.act = module if module is not None else nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        with torch.no_grad():
            self.stem.weight.fill_(1.0)
            self.conv.weight.copy_(torch.tensor([1.0, 2.0, -1.0]).view(3, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.0, -1.0, 0.5]))
            if self.bn is not None:
                self.bn.weight.copy_(torch.tensor([1.0, -1.0, 2.0]))
                self.bn.bias.copy_(torch.tensor([0.0, 3.0, -10.0]))

    def forward(self, x):
        stem = self.stem(x)
        out = self.conv(stem)
        if self.bn is not None:
            out = self.bn(out)
        if self.residual:
            out = out + stem
        elif self.activation == "module":
            out = self.act(out)
        elif self.activation == "functional":
            out = F.relu(out)
        elif self.activation == "torch":
            out = torch.relu(out)
        elif self.activation == "leaky-in-place":
            out = F.leaky_relu(out, 0.5, True)  # in place, by position
        else:
            out = out.relu()
        return torch.flatten(self.pool(out), 1)


def _model(**kwargs) -> ImageClassifier:
    return ImageClassifier(_ConvBnAct(**kwargs), 3, INFO).eval()


def _read(model: nn.Module, site: str):
    """collect's per-channel maxima of the analysed layer, its read sites and the softmax outputs."""
    graph = analyse_model(model, IMAGES.batch(torch.arange(2))[0])
    assert [layer.name for layer in graph.layers] == ["body.conv"]
    sites = read_sites(graph, site)
    stats = collect(model, IMAGES, {"body.conv": 3}, batch_size=2, sites=sites)
    return stats.acts["body.conv"].tolist(), sites["body.conv"], stats.probs, graph


@pytest.mark.parametrize("site", ["conv", "bn", "act"])
def test_each_site_reads_the_hand_computed_maxima(site, one_thread):
    values, read, _, graph = _read(_model(), site)
    assert values == EXPECTED[site]
    assert (read.site, read.fallback) == (site, None)
    link = graph.layers[0]
    assert (link.bn, link.act) == ("body.bn", "body.act")
    assert graph.to_json()["layers"][0]["act"] == "body.act" and "act_fn" not in graph.to_json()["layers"][0]


@pytest.mark.parametrize("activation, name", [("functional", "torch.nn.functional.relu"), ("torch", "torch.relu"),
                                              ("method", "Tensor.relu")])
def test_a_functional_activation_is_found_in_the_graph(activation, name, one_thread):
    values, read, _, graph = _read(_model(activation=activation), "act")
    assert graph.layers[0].act == name
    assert values == EXPECTED["act"] and (read.site, read.module, read.fallback) == ("act", "body.bn", None)


@pytest.mark.parametrize("in_place", ["module", "function"])
def test_an_in_place_activation_is_read_without_changing_the_network(in_place, one_thread):
    """An in-place LeakyReLU(0.5) is not idempotent: applying it to the BatchNorm's own output
    inside the hook would scale the negative values twice, and the logits would change."""
    model = _model(module=nn.LeakyReLU(0.5, inplace=True)) if in_place == "module" else _model(
        activation="leaky-in-place")
    values, _, probs, _ = _read(model, "act")
    assert values == [[1.0, 4.0, -4.5], [0.0, 4.0, -4.5]]
    assert _read(model, "bn")[0] == EXPECTED["bn"]  # the BatchNorm's output before the in-place activation
    assert torch.equal(probs, _read(model, "conv")[2])


def test_without_batchnorm_bn_falls_back_to_conv_and_act_follows_the_conv(one_thread):
    model = _model(bn=False)
    values, read, _, graph = _read(model, "bn")
    assert values == EXPECTED["conv"] and read.site == "conv"
    assert read.fallback == "bn -> conv: no BatchNorm directly follows body.conv"
    values, read, _, _ = _read(model, "act")
    assert values == [[1.0, 1.0, 0.5], [0.0, 0.0, 0.5]] and (read.site, read.module, read.fallback) == (
        "act", "body.conv", None)
    assert graph.layers[0].bn is None and graph.layers[0].act == "body.act"


def test_a_batchnorm_feeding_a_residual_add_falls_back_to_bn(one_thread):
    values, read, _, graph = _read(_model(residual=True), "act")
    assert values == EXPECTED["bn"] and read.site == "bn"
    assert read.fallback == "act -> bn: no activation directly follows body.bn"
    assert graph.layers[0].act is None and "add" in graph.layers[0].note


class _Untraceable(_ConvBnAct):
    def forward(self, x):
        out = self.bn(self.conv(self.stem(x)))
        if out.sum() > -1e9:  # data-dependent control flow: fx cannot trace it
            out = self.act(out)
        return torch.flatten(self.pool(out), 1)


def test_the_hook_fallback_reads_conv_and_bn_and_act_falls_back_to_bn(one_thread):
    model = ImageClassifier(_Untraceable(), 3, INFO).eval()
    graph = analyse_model(model, IMAGES.batch(torch.arange(2))[0])
    assert graph.method == "hooks" and graph.layers[0].bn == "body.bn" and graph.layers[0].act is None
    for site, expected_site in (("conv", "conv"), ("bn", "bn"), ("act", "bn")):
        read = read_sites(graph, site)["body.conv"]
        values = collect(model, IMAGES, {"body.conv": 3}, 2, {"body.conv": read}).acts["body.conv"].tolist()
        assert read.site == expected_site and values == EXPECTED[expected_site]
    assert read.fallback == "act -> bn: the forward-hook analysis cannot see activations"


def test_site_conv_reads_exactly_what_collect_read_before(one_thread):
    """Site conv is the convolution's own output: the same numbers as collect without sites (the
    code path before the site existed) and as an independent hook on every analysed layer."""
    torch.manual_seed(0)
    info = DatasetInfo("s", 10, (3, 16, 16), mean=(0.5,) * 3, std=(0.25,) * 3, hflip=False)
    model = build_model("small-cnn", info).eval()
    data = ImageSet(torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8), torch.zeros(40, dtype=torch.long))
    graph = analyse_model(model, data.batch(torch.arange(2))[0])
    layers = {layer.name: layer.channels for layer in graph.layers}
    with_sites = collect(model, data, layers, 16, read_sites(graph, "conv"))
    without = collect(model, data, layers, 16)
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(lambda m, i, o, name=name: seen[name].append(o.amax((2, 3))))
               for name in layers]
    with torch.no_grad():
        for _, x, _ in data.batches(16):
            model(x.contiguous(memory_format=memory_format(torch.device("cpu"))))  # as collect feeds it
    for handle in handles:
        handle.remove()
    assert torch.equal(with_sites.probs, without.probs)
    for name in layers:
        assert torch.equal(with_sites.acts[name], without.acts[name])
        assert torch.equal(with_sites.acts[name], torch.cat(seen[name]))


def test_site_is_validated_with_the_valid_values_named():
    from bench.grid import parse_overrides

    assert NoneConfig().site == "conv"
    assert parse_overrides(["defense.none.site=conv,bn,act"]).defense["none"]["site"] == ["conv", "bn", "act"]
    with pytest.raises(BenchError, match="expected one of conv, bn, act"):
        parse_overrides(["defense.none.site=relu"])
    with pytest.raises(BenchError, match=r"defense\.none\.site='relu': must be one of conv, bn, act"):
        build_config(NoneConfig, {"site": "relu"}, "defense.none.")


# --- NONE's run: the declared selection ---------------------------------------------------------
class _MixedBody(nn.Module):
    """One analysed convolution with a BatchNorm (the reset silences the BatchNorm's output) and
    one without (the reset silences the convolution's own output)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 16, 3, padding=1)
        self.a_bn = nn.BatchNorm2d(16)
        self.b = nn.Conv2d(16, 12, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        out = F.relu(self.a_bn(self.a(torch.relu(self.stem(x)))))
        return torch.flatten(self.pool(F.relu(self.b(out))), 1)


def test_none_declares_the_channels_it_reset_keyed_by_the_silenced_module(tmp_path, one_thread):
    from bench.data.synthetic import make_synthetic

    info = DatasetInfo("synthetic", 10, (3, 16, 16), mean=(0.5,) * 3, std=(0.25,) * 3, hflip=False)
    train, _ = make_synthetic(200, 0, 10, 3, 16, seed=0)
    torch.manual_seed(0)
    logs: list[str] = []
    model = ImageClassifier(_MixedBody(), 12, info)
    ctx = DefenseContext(model=model, build_model=lambda: ImageClassifier(_MixedBody(), 12, info), train=train,
                         reserve=train.subset(torch.arange(0)), info=info, train_config=TrainConfig(),
                         finetune_config=TrainConfig(), device=torch.device("cpu"), seed=0,
                         artifact_dir=Path(tmp_path), log=logs.append)
    # Two rounds of the reset alone (no fine-tuning), 20% of each layer per round.
    config = NoneConfig(rounds=2, finetune_epochs=0, max_reset_fraction=0.2, site="bn")
    result = NONE(config, seed=0).run(ctx)
    details = result.details
    silenced = {layer["name"]: layer["bn"] or layer["name"] for layer in details["graph"]["layers"]}
    assert silenced == {"body.a": "body.a_bn", "body.b": "body.b"}
    expected: dict[str, set[int]] = {key: set() for key in silenced.values()}
    for record in details["rounds"]:
        for entry in record["selected"]:
            expected[silenced[entry["layer"]]].add(entry["channel"])
    assert result.selection == {key: sorted(channels) for key, channels in expected.items()}
    assert all(result.selection[key] == sorted(set(result.selection[key])) for key in result.selection)
    assert 4 <= len(result.selection["body.a_bn"]) <= 8 and 3 <= len(result.selection["body.b"]) <= 6
    # what the selection says is silent is silent: those output channels of the reset model are 0
    outputs = {}
    modules = dict(model.named_modules())
    for key in result.selection:
        modules[key].register_forward_hook(lambda m, i, o, key=key: outputs.setdefault(key, o))
    with torch.no_grad():
        model.eval()(train.batch(torch.arange(8))[0])
    for key, channels in result.selection.items():
        assert (outputs[key][:, channels] == 0).all()
    # site=bn: body.b has no BatchNorm, read at conv, recorded in the details and logged once
    assert details["settings"]["site"] == "bn"
    assert details["site"] == {"requested": "bn", "read": {"body.a": "bn", "body.b": "conv"},
                               "fallbacks": {"body.b": "bn -> conv: no BatchNorm directly follows body.b"}}
    assert sum("site=bn" in line for line in logs) == 1
