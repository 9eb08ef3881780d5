"""Every registered model on every registered dataset's shape, plus the paper architectures' facts.

Shapes for all (model, dataset) pairs are checked with forward and backward passes on the
``meta`` device (shape propagation without arithmetic: every pair, 224 px included, in
seconds). Real arithmetic, where NaNs, dead gradients or in-place overwrites would show,
runs on CPU at the smallest grey and colour dataset shapes; every other shape (up to
224 px) runs for real in the slow suite.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.data.base import DatasetInfo
from bench.models.base import build_model
from bench.registry import DATASETS, MODELS

MODEL_NAMES = MODELS.names()
INFOS = [DATASETS.get(name).info for name in DATASETS.names()]


def distinct_shapes(infos: list[DatasetInfo]) -> list[DatasetInfo]:
    """One dataset per distinct image shape."""
    chosen: dict[tuple[int, ...], DatasetInfo] = {}
    for info in infos:
        chosen.setdefault(info.shape, info)
    return list(chosen.values())


def smallest_per_channel_count(infos: list[DatasetInfo]) -> list[DatasetInfo]:
    """The smallest-side dataset of each channel count (grey and colour stems both run)."""
    chosen: dict[int, DatasetInfo] = {}
    for info in sorted(infos, key=lambda i: i.side):
        chosen.setdefault(info.channels, info)
    return list(chosen.values())


def cifar10_info() -> DatasetInfo:
    return DATASETS.get("cifar10").info


def meta_model(name: str, info: DatasetInfo) -> nn.Module:
    with torch.device("meta"):
        return build_model(name, info)


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_forward_backward_shapes_on_every_dataset(model_name):
    for info in INFOS:
        model = meta_model(model_name, info).train()
        x = torch.empty(2, *info.shape, device="meta")
        logits = model(x)
        assert tuple(logits.shape) == (2, info.num_classes), f"{model_name} on {info.name}: {tuple(logits.shape)}"
        assert tuple(model.features(x).shape) == (2, model.classifier.in_features), f"{model_name} on {info.name}"
        F.cross_entropy(logits, torch.zeros(2, dtype=torch.long, device="meta")).backward()
        no_grad = [n for n, p in model.named_parameters() if p.grad is None]
        assert not no_grad, f"{model_name} on {info.name}: no gradient reaches {no_grad[:5]}"


def real_step(model_name: str, info: DatasetInfo) -> None:
    """One forward/backward on CPU: finite outputs and gradients, and convolution outputs left intact."""
    torch.manual_seed(0)
    model = build_model(model_name, info).train()
    records: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def hook(name):
        def record(module, inputs, output):
            records.append((name, output, output.detach().clone()))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    x = torch.rand(2, *info.shape)
    logits = model(x)
    for handle in handles:
        handle.remove()
    assert torch.isfinite(logits).all(), f"{model_name} on {info.name}: non-finite logits"
    # A hook on a convolution (NONE, fine-pruning) must see its output as the layer produced it.
    changed = [name for name, output, copy in records if not torch.equal(output.detach(), copy)]
    assert not changed, f"{model_name}: an in-place operation overwrote the output of {changed[:3]}"
    F.cross_entropy(logits, torch.tensor([0, info.num_classes - 1])).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), f"{model_name}: bad gradient at {name}"
    assert any(float(p.grad.abs().sum()) > 0 for p in model.parameters()), f"{model_name}: all gradients are zero"


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_real_step_on_the_smallest_shapes(model_name, one_thread):
    for info in smallest_per_channel_count(INFOS):
        real_step(model_name, info)


@pytest.mark.slow
@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_real_step_on_every_dataset_shape(model_name, one_thread):
    fast = {info.shape for info in smallest_per_channel_count(INFOS)}
    for info in distinct_shapes(INFOS):
        if info.shape not in fast:
            real_step(model_name, info)


# --- the paper's architectures ----------------------------------------------------------------

def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_paper_models_have_the_published_parameter_counts():
    info = cifar10_info()
    # CIFAR ResNet-18 (BasicBlock, 1x1 projection shortcuts): 11,173,962 with 10 classes; the
    # activation has no parameters. VGG-16 without BatchNorm, one linear layer: 14,719,818.
    # NiN: 966,986 (the last 192->10 1x1 convolution becomes the 192->10 linear layer).
    expected = {"resnet18": 11_173_962, "resnet18-leakyrelu": 11_173_962, "resnet18-elu": 11_173_962,
                "resnet18-softplus": 11_173_962, "vgg16": 14_719_818, "nin": 966_986}
    for name, count in expected.items():
        assert parameter_count(meta_model(name, info)) == count, name


def test_resnet18_activation_variants():
    info = cifar10_info()
    kinds = {"resnet18": nn.ReLU, "resnet18-leakyrelu": nn.LeakyReLU, "resnet18-elu": nn.ELU,
             "resnet18-softplus": nn.Softplus}
    activations = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.Softplus)
    for name, kind in kinds.items():
        model = meta_model(name, info)
        used = [type(m) for m in model.modules() if isinstance(m, activations)]
        # stem + two per basic block (8 blocks) = 17, all of the variant's kind
        assert len(used) == 17 and set(used) == {kind}, f"{name}: {set(used)} x{len(used)}"
    assert meta_model("resnet18-leakyrelu", info).body.act.negative_slope == 0.01


def pool_input_side(model: nn.Module, pool_type: type, info: DatasetInfo) -> int:
    """Spatial side of the tensor entering the model's global pooling layer, at the dataset's shape."""
    seen = []
    pool = [m for m in model.modules() if isinstance(m, pool_type)][-1]
    pool.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[-1]))
    model(torch.empty(1, *info.shape, device="meta"))
    return seen[0]


def test_paper_geometry_at_32_px():
    info = cifar10_info()
    resnet = meta_model("resnet18", info)
    stem = resnet.body.conv1
    assert (stem.kernel_size, stem.stride) == ((3, 3), (1, 1))
    assert not any(isinstance(m, nn.MaxPool2d) for m in resnet.modules()), "CIFAR ResNet has no max-pool"
    assert pool_input_side(resnet, nn.AdaptiveAvgPool2d, info) == 4  # the paper's AvgPool2d(4)

    vgg = meta_model("vgg16", info)
    convs = [m for m in vgg.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13 and all(c.kernel_size == (3, 3) and c.bias is not None for c in convs)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in vgg.modules())
    assert pool_input_side(vgg, nn.AdaptiveMaxPool2d, info) == 2  # the paper's fifth MaxPool2d(2)
    assert vgg.classifier.in_features == 512

    nin = meta_model("nin", info)
    kernels = [m.kernel_size[0] for m in nin.modules() if isinstance(m, nn.Conv2d)]
    assert kernels == [5, 1, 1, 5, 1, 1, 3, 1]
    assert sum(isinstance(m, nn.Dropout) for m in nin.modules()) == 2
    assert pool_input_side(nin, nn.AdaptiveAvgPool2d, info) == 8  # the paper's AvgPool2d(8)


def test_vgg16_handles_odd_sides():
    # MNIST's 28 px: the rounding-up pools give 14, 7, 4, 2 before the global pool.
    info = DATASETS.get("mnist").info
    assert pool_input_side(meta_model("vgg16", info), nn.AdaptiveMaxPool2d, info) == 2


# --- NONE's graph analysis ------------------------------------------------------------------------

@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_none_graph_analysis_finds_the_layers(model_name, one_thread):
    graph_module = pytest.importorskip("defenses.none.graph", reason="NONE's graph analysis is not present")
    info = DATASETS.get("synthetic").info
    torch.manual_seed(0)
    model = build_model(model_name, info)
    graph = graph_module.analyse_model(model, torch.rand(2, *info.shape))
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    analysed = [layer.name for layer in graph.layers]
    assert analysed, f"{model_name}: NONE found no layer to analyse"
    # Default selection: every convolution except the first, each either analysed or excluded with a reason.
    assert set(analysed) | set(graph.excluded) >= set(convs[1:]), f"{model_name}: convolutions missing from the analysis"
    if model_name in ("resnet18", "resnet18-leakyrelu", "resnet18-elu", "resnet18-softplus", "vgg16", "nin"):
        assert graph.method == "fx", f"{model_name}: {graph.fallback_reason}"
        assert analysed == convs[1:]
        if model_name.startswith("resnet18"):
            # every convolution has its own BatchNorm; inside a block conv1 feeds conv2 unambiguously
            assert all(layer.bn is not None for layer in graph.layers)
            assert all(layer.consumer == layer.name.replace("conv1", "conv2")
                       for layer in graph.layers if layer.name.endswith("conv1"))
        else:
            # plain chains: each convolution's channels go to the next one, the last one's to the classifier
            assert [layer.consumer for layer in graph.layers] == analysed[1:] + ["classifier"]


# --- resnet18-w16: the paper's ResNet-18 at a quarter of the width --------------------------------

def test_resnet18_w16_is_resnet18_at_a_quarter_width(one_thread):
    for name in ("fashion-mnist", "cifar10"):  # 1x28x28 and 3x32x32
        info = DATASETS.get(name).info
        torch.manual_seed(0)
        model = build_model("resnet18-w16", info).eval()
        with torch.no_grad():
            logits = model(torch.rand(2, *info.shape))
        assert tuple(logits.shape) == (2, info.num_classes) and torch.isfinite(logits).all(), name
        widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert widths == [w // 4 for w in (m.out_channels for m in meta_model("resnet18", info).modules()
                                           if isinstance(m, nn.Conv2d))], name
    # convolutions scale with width squared, BatchNorm and the classifier with width: ~1/16
    assert parameter_count(meta_model("resnet18-w16", cifar10_info())) == 701_466
    ratio = parameter_count(meta_model("resnet18", cifar10_info())) / 701_466
    assert 15 < ratio < 16.5


def test_none_graph_analysis_sees_resnet18_w16_as_resnet18(one_thread):
    graph_module = pytest.importorskip("defenses.none.graph", reason="NONE's graph analysis is not present")
    info = DATASETS.get("synthetic").info
    example = torch.rand(2, *info.shape)
    graphs = {}
    for name in ("resnet18", "resnet18-w16"):
        torch.manual_seed(0)
        model = build_model(name, info)
        graph = graph_module.analyse_model(model, example)
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        assert graph.method == "fx", f"{name}: {graph.fallback_reason}"
        assert [layer.name for layer in graph.layers] == convs[1:]  # every convolution but the stem
        assert all(layer.bn is not None for layer in graph.layers)
        # a block's conv1 feeds its conv2 unambiguously; conv2 and the shortcuts end in a residual add
        assert all(layer.consumer == layer.name.replace("conv1", "conv2") if layer.name.endswith("conv1")
                   else layer.consumer is None for layer in graph.layers)
        graphs[name] = graph.to_json()
    wide, narrow = graphs["resnet18"], graphs["resnet18-w16"]
    assert [layer["channels"] for layer in wide["layers"]] == [4 * layer["channels"] for layer in narrow["layers"]]
    def structure(graph: dict) -> list[dict]:
        return [{k: v for k, v in layer.items() if k != "channels"} for layer in graph["layers"]]

    assert structure(wide) == structure(narrow) and wide["excluded"] == narrow["excluded"]
