"""bench/units.py: what one traced forward pass says about a model's units, checked against the
architectures in bench/models/ (small-cnn, resnet18-w16, preact-resnet18), module by module."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.data.base import DatasetInfo
from bench.models.base import build_model
from bench.units import (
    conv_bn_pairs,
    kind_of,
    last_conv,
    last_spatial_layer,
    modules_of_kind,
    output_channels,
    stage_outputs,
    trace,
)

FMNIST = DatasetInfo("fmnist-shaped", 10, (1, 28, 28), (0.5,), (0.25,), False)
CIFAR = DatasetInfo("cifar-shaped", 10, (3, 32, 32), (0.5,) * 3, (0.25,) * 3, True)


def probe(info: DatasetInfo) -> torch.Tensor:
    return torch.rand(2, *info.shape, generator=torch.Generator().manual_seed(0))


def convs(model: nn.Module, x: torch.Tensor) -> list[str]:
    return [unit.name for unit in trace(model, x).executed() if unit.kind == "conv"]


# --- small-cnn: conv-BN-ReLU x 4 (16-32-64-64), max-pool between the three stages ------------------

def test_small_cnn(one_thread):
    model, x = build_model("small-cnn", FMNIST), probe(FMNIST)
    units = trace(model, x)
    # body: 0 conv 1 bn 2 relu 3 pool | 4 conv 5 bn 6 relu 7 pool | 8 conv 9 bn 10 relu
    #       11 conv 12 bn 13 relu | 14 global average pool 15 flatten
    assert convs(model, x) == ["body.0", "body.4", "body.8", "body.11"]
    assert [units[f"body.{i}"].kind for i in range(16)] == [
        "conv", "batchnorm", "activation", "pool", "conv", "batchnorm", "activation", "pool",
        "conv", "batchnorm", "activation", "conv", "batchnorm", "activation", "pool", "other"]
    assert (units["body"].kind, units["body"].leaf, units["body.0"].leaf) == ("container", False, True)
    assert [units[f"body.{i}"].calls[0].feature_map for i in (0, 4, 8, 11, 14)] == [
        (28, 28), (14, 14), (7, 7), (7, 7), (1, 1)]
    assert units["body.15"].calls[0].shape == (2, 64) and units["classifier"].calls[0].shape == (2, 10)
    assert conv_bn_pairs(model, x) == [
        ("body.0", "body.1"), ("body.4", "body.5"), ("body.8", "body.9"), ("body.11", "body.12")]
    assert last_conv(model, x) == "body.11"
    # the last ReLU at each resolution (28, 14, 7), named within body as NAD hooks them
    assert stage_outputs(model, x, 3) == ["2", "6", "13"]
    assert stage_outputs(model, x, 2) == ["6", "13"]
    assert last_spatial_layer(model, x[:1]) == "body.13"
    assert output_channels(model, ["body.0", "body.4", "body.8", "body.11", "body.3", "body", "classifier"], x[:1]) == {
        "body.0": 16, "body.3": 16, "body.4": 32, "body.8": 64, "body.11": 64, "body": 64, "classifier": 10}


# --- resnet18-w16: stem + 4 stages x 2 post-activation basic blocks (16-32-64-128) -------------

def test_resnet18_w16(one_thread):
    model, x = build_model("resnet18-w16", CIFAR), probe(CIFAR)
    blocks = [f"body.layer{stage}.{block}" for stage in (1, 2, 3, 4) for block in (0, 1)]
    # BasicBlock.forward runs conv1, conv2, then the projection shortcut (first block of stages 2-4)
    expected = ["body.conv1"]
    for block in blocks:
        expected += [f"{block}.conv1", f"{block}.conv2"]
        if block.endswith(".0") and not block.startswith("body.layer1"):
            expected.append(f"{block}.shortcut.0")
    assert convs(model, x) == expected and len(expected) == 20
    # every convolution has its own BatchNorm, the shortcut's inside its Sequential
    pairs = dict(conv_bn_pairs(model, x))
    assert len(pairs) == 20 and pairs["body.conv1"] == "body.bn1"
    for block in blocks:
        assert (pairs[f"{block}.conv1"], pairs[f"{block}.conv2"]) == (f"{block}.bn1", f"{block}.bn2")
    assert pairs["body.layer3.0.shortcut.0"] == "body.layer3.0.shortcut.1"
    assert last_conv(model, x) == "body.layer4.1.conv2"
    # stages at 32, 16, 8, 4 px; each stage's Sequential finishes after its blocks
    assert stage_outputs(model, x, 3) == ["layer2", "layer3", "layer4"]
    assert stage_outputs(model, x, 4) == ["layer1", "layer2", "layer3", "layer4"]
    assert last_spatial_layer(model, x[:1]) == "body.layer4.1.act2"
    widths = {"body.conv1": 16, "body.layer1.1.conv2": 16, "body.layer2.0.conv1": 32, "body.layer3.0.shortcut.0": 64,
              "body.layer4.1.bn2": 128, "body.layer4": 128, "body.pool": 128, "body": 128, "classifier": 10}
    assert output_channels(model, list(widths), x[:1]) == widths
    units = trace(model, x)
    assert units["body.layer1.0.shortcut"].kind == "identity" and units["body.layer2.0.shortcut"].kind == "container"
    assert [units[f"body.layer{s}"].calls[0].feature_map for s in (1, 2, 3, 4)] == [(32, 32), (16, 16), (8, 8), (4, 4)]


# --- preact-resnet18: pre-activation blocks, BatchNorm after the residual add -------------------

def test_preact_resnet18(one_thread):
    model, x = build_model("preact-resnet18", CIFAR), probe(CIFAR)
    order = convs(model, x)
    # PreActBlock.forward: bn1, the shortcut (on bn1's output), conv1, bn2, conv2
    assert order[:8] == ["body.conv1", "body.layer1.0.conv1", "body.layer1.0.conv2", "body.layer1.1.conv1",
                         "body.layer1.1.conv2", "body.layer2.0.shortcut", "body.layer2.0.conv1", "body.layer2.0.conv2"]
    assert len(order) == 20 and order[-1] == "body.layer4.1.conv2"
    pairs = dict(conv_bn_pairs(model, x))
    # conv1 feeds bn2; conv2 and the shortcut feed the residual add, the stem the first block's bn1
    assert pairs["body.conv1"] == "body.layer1.0.bn1"
    assert pairs["body.layer3.1.conv1"] == "body.layer3.1.bn2"
    assert pairs["body.layer3.1.conv2"] is None and pairs["body.layer3.0.shortcut"] is None
    assert sum(bn is not None for bn in pairs.values()) == 9  # the stem and the 8 conv1s
    assert last_conv(model, x) == "body.layer4.1.conv2"
    # a pre-activation block's bn1 still runs at the previous resolution: not a stage output
    assert stage_outputs(model, x, 3) == ["layer2", "layer3", "layer4"]
    # the final ReLU is functional (F.relu): the last leaf with a 4x4 map is the BatchNorm before it
    assert last_spatial_layer(model, x[:1]) == "body.bn"
    assert output_channels(model, ["body.layer2.0.shortcut", "body.layer4.1.bn2", "body.bn"], x[:1]) == {
        "body.layer2.0.shortcut": 128, "body.layer4.1.bn2": 512, "body.bn": 512}


# --- modules that do not run; what a trace leaves as it found it -----------------------------

def test_a_module_that_does_not_run_is_reported_as_such(one_thread):
    model, x = build_model("resnet18-w16", CIFAR), probe(CIFAR)
    model.body.spare = nn.BatchNorm2d(16)  # defined, never called by ResNetBody.forward
    units = trace(model, x)
    spare = units["body.spare"]
    assert (spare.kind, spare.ran, spare.calls, spare.channels) == ("batchnorm", False, (), None)
    assert "body.spare" not in [unit.name for unit in units.executed()]
    assert all(call.module != "body.spare" for call in units.calls)
    assert units["body.bn1"].ran and units["body.bn1"].channels == 16
    # output channels leave it out; ANP's enumeration, which needs no forward pass, keeps it
    assert output_channels(model, ["body.spare", "body.bn1"], x[:1]) == {"body.bn1": 16}
    assert "body.spare" in [name for name, _ in modules_of_kind(model, "batchnorm")]
    assert "body.spare" not in dict(conv_bn_pairs(model, x)).values()
    with pytest.raises(ValueError, match="no module named 'body.nothing' in ImageClassifier"):
        output_channels(model, ["body.nothing"], x)


def test_trace_counts_calls_follows_tensors_and_leaves_the_model_as_it_was(one_thread):
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            return self.bn(self.act(self.conv(self.conv(x))))

    model = Twice().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    units = trace(model, torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8))  # uint8 images are fine
    assert [call.module for call in units.calls] == ["conv", "conv", "act", "bn", ""]
    assert len(units["conv"].calls) == 2 and [unit.name for unit in units.executed()] == ["conv", "act", "bn", ""]
    second = units["conv"].calls[1]
    assert units.readers(units["conv"].calls[0].output) == [second]
    # the in-place ReLU hands the BatchNorm the conv's own tensor, modified: no conv -> BN pair
    act, bn = units.readers(second.output)
    assert (act.module, bn.module) == ("act", "bn") and act.output.id == second.output.id
    assert act.input.version == second.output.version < bn.input.version
    assert conv_bn_pairs(model, torch.rand(1, 3, 8, 8)) == [("conv", None)]
    assert model.training and all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0


def test_kinds():
    assert [kind_of(m) for m in (nn.Conv1d(1, 1, 1), nn.ConvTranspose2d(1, 1, 1), nn.Linear(1, 1), nn.SyncBatchNorm(1),
                                 nn.GroupNorm(1, 1), nn.GELU(), nn.Dropout(), nn.AdaptiveMaxPool2d(1),
                                 nn.Sequential(nn.ReLU()), nn.Flatten())] == [
        "conv", "other", "linear", "batchnorm", "norm", "activation", "identity", "pool", "container", "other"]
