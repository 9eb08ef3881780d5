"""The selection-quality oracle (bench/metrics/selection.py) on models with known answers, and the
selections that Fine-Pruning, ANP and CLP declare, checked against what each did to the model.

No training: hand-set weights, random small nets, and each defense run on a random small CNN with
its expensive part cut short. Seconds in all.
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench import engine
from bench.data.base import DatasetInfo, ImageSet, to_unit
from bench.defense import DefenseContext
from bench.engine import TrainConfig
from bench.metrics.accuracy import attack_success_rate
from bench.metrics.selection import (
    ablation_asr,
    oracle_units,
    random_ablations,
    random_baseline,
    selection_quality,
    unit_ablation_asr,
)
from bench.models.base import build_model
from bench.runner import catalog_entries
from defenses.baselines.anp import ANP, ANPConfig
from defenses.baselines.clp import CLP, CLPConfig
from defenses.baselines.fp import FinePruning, FinePruningConfig

TARGET = 2
INFO = DatasetInfo("synthetic", 10, (3, 16, 16), mean=(0.5,) * 3, std=(0.25,) * 3, hflip=False)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny tensors: a second thread costs more than it saves (tests/conftest.py)."""


def trigger_model(target_weights: list[float], bias: float) -> nn.Sequential:
    """conv 1x1 (4 channels, each the input itself) -> ReLU -> global max pool -> linear.

    Every channel's pooled feature is the image's brightest pixel p; the target class's logit is
    sum_c w_c p + bias against 0 for class 0 and -5 for class 1, so channel c carries w_c of the
    trigger's response and ablating it lowers that logit by w_c p."""
    model = nn.Sequential(nn.Conv2d(1, 4, 1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.zero_()
        model[4].weight.zero_()
        model[4].weight[TARGET] = torch.tensor(target_weights)
        model[4].bias.copy_(torch.tensor([0.0, -5.0, bias]))
    return model.eval()


def triggered_images(values: list[int]) -> torch.Tensor:
    """uint8 1x4x4 images, black but for a 2x2 trigger patch of the given brightness."""
    x = torch.zeros(len(values), 1, 4, 4, dtype=torch.uint8)
    for i, value in enumerate(values):
        x[i, :, 1:3, 1:3] = value
    return x


# Graded: channel c carries w_c = (0, 1, 2, 4) with bias -1, on patches p = 40/255 .. 128/255.
# The target wins while the remaining weight W satisfies W p > 1: all four images with every
# channel (7p > 1 from p = 0.157), and with channel 0 cut; cutting 1 keeps p > 1/6 (3 images),
# cutting 2 keeps p > 1/5 (2), cutting 3 keeps p > 1/3 (1). Margins >= 6% of the logit.
GRADED = ([0.0, 1.0, 2.0, 4.0], -1.0)
PATCHES = [40, 46, 70, 128]


def test_single_unit_ablation_asr_is_exact_on_a_hand_built_model():
    model = trigger_model(*GRADED)
    asr = unit_ablation_asr(model, ["0"], triggered_images(PATCHES), TARGET)
    assert asr["0"].tolist() == [100.0, 75.0, 50.0, 25.0]
    # One channel alone carries it: the harmless ones leave 100, that one leaves 0.
    alone = unit_ablation_asr(trigger_model([0.0, 0.0, 3.0, 0.0], -1.0), ["0"], triggered_images([255] * 3), TARGET)
    assert alone["0"].tolist() == [100.0, 100.0, 0.0, 100.0]


def test_oracle_takes_the_largest_drops_and_breaks_ties_by_index():
    model = trigger_model(*GRADED)
    asr = unit_ablation_asr(model, ["0"], triggered_images(PATCHES), TARGET)["0"]
    assert [oracle_units(asr, k) for k in range(5)] == [[], [3], [2, 3], [1, 2, 3], [0, 1, 2, 3]]
    assert oracle_units(torch.tensor([50.0, 0.0, 50.0, 0.0, 50.0]), 3) == [0, 1, 3]


@pytest.mark.parametrize("selected, recall, sel_asr", [
    ([2, 3], 100.0, 0.0),   # the oracle's own pair: only w = 1 remains, no image reaches the target
    ([0, 1], 0.0, 75.0),    # the harmless and the weakest channel: W = 6, p > 1/6 still wins
    ([0, 3], 50.0, 25.0),   # half right: W = 3, only p = 128/255 > 1/3 wins
])
def test_recall_and_selection_asr_of_right_wrong_and_half_right_selections(selected, recall, sel_asr):
    model = trigger_model(*GRADED)
    quality = selection_quality(model, {"0": selected, "3": []}, triggered_images(PATCHES), TARGET)
    assert ranked(quality) == {"sel_asr": sel_asr, "oracle_asr": 0.0, "sel_recall": recall}
    assert quality.baseline_asr == 100.0 and quality.images == 4
    assert quality.layers["0"] == {"units": 4, "count": 2, "selected": selected, "oracle": [2, 3],
                                   "overlap": int(recall) // 50, "unit_asr": [100.0, 75.0, 50.0, 25.0]}
    # A layer analysed and left alone: counted, never measured.
    assert quality.layers["3"] == {"units": 4, "count": 0, "selected": [], "oracle": [], "overlap": 0,
                                   "unit_asr": None}
    assert quality.to_json()["layers"]["0"]["oracle"] == [2, 3]


def test_a_backdoor_no_single_ablation_finds_is_judged_by_the_combined_effect():
    """Channels 2 and 3 each carry the whole trigger response (2p > 1 on p = 200/255): cutting
    either alone changes nothing, so every single ablation leaves 100% and the oracle's budget of
    two goes, by index, to the harmless 0 and 1. A defense that cut 2 and 3 together removed the
    backdoor (selection ASR 0) though its recall against the oracle is 0."""
    model = trigger_model([0.0, 0.0, 2.0, 2.0], -1.0)
    quality = selection_quality(model, {"0": [3, 2, 2]}, triggered_images([200] * 5), TARGET)
    assert quality.layers["0"]["unit_asr"] == [100.0] * 4
    assert quality.layers["0"]["selected"] == [2, 3] and quality.layers["0"]["oracle"] == [0, 1]
    assert ranked(quality) == {"sel_asr": 0.0, "oracle_asr": 100.0, "sel_recall": 0.0}


def test_an_empty_selection_has_no_recall_and_the_undefended_asr():
    model = trigger_model(*GRADED)
    x = triggered_images(PATCHES[:2])
    quality = selection_quality(model, {"0": [], "4": []}, x, TARGET)
    assert quality.sel_recall is None
    assert quality.sel_asr == quality.oracle_asr == quality.baseline_asr == 100.0
    assert selection_quality(model, {}, x, TARGET).metrics() == {"sel_asr": 100.0, "oracle_asr": 100.0, "rand_asr": None,
                                                                   "sel_recall": None, "sel_acc": None, "rand_acc": None}


def ranked(quality) -> dict:
    """The metrics that judge the selection against the oracle's ranking."""
    return {name: quality.metrics()[name] for name in ("sel_asr", "oracle_asr", "sel_recall")}


def test_the_chance_baseline_is_the_mean_over_random_draws_of_as_many_units():
    """On the graded model a random pair of the 4 channels leaves W = 7 - w_a - w_b of the weight.
    Over the 6 pairs the images that still reach the target (W p > 1, p = 40, 46, 70, 128 / 255) are
    3 (cut 0,1: W = 6), 2 (0,2: W = 5), 1 (0,3: W = 3), 2 (1,2: W = 4), 1 (1,3: W = 2, p = 0.502),
    0 (2,3) of 4: 37.5% on average. 600 seeded draws land within 4 points of it (the standard error
    of the mean is 1 point), and each draw's ASR is exactly that of ablating the drawn pair; clean
    images (0 patch) never reach the target."""
    model = trigger_model(*GRADED)
    x = triggered_images(PATCHES)
    clean = triggered_images([0] * 4)
    labels = torch.zeros(4, dtype=torch.long)
    drawn = random_baseline(model, {"0": (4, 2)}, 600, 0, x, TARGET, clean, labels)
    assert abs(sum(drawn["asr"]) / 600 - 37.5) < 4.0
    assert drawn["acc"] == [100.0] * 600
    pairs = random_ablations({"0": (4, 2)}, 600, 0)
    assert all(len(set(pair["0"])) == 2 and set(pair["0"]) <= {0, 1, 2, 3} for pair in pairs)
    assert len({tuple(pair["0"]) for pair in pairs}) == 6
    assert drawn["asr"][:20] == ablation_asr(model, pairs[:20], x, TARGET)
    quality = selection_quality(model, {"0": [2, 3]}, x, TARGET, clean, labels, draws=600)
    assert quality.metrics()["rand_asr"] == round(sum(drawn["asr"]) / 600, 2)
    assert quality.metrics()["sel_acc"] == quality.metrics()["rand_acc"] == 100.0
    assert quality.to_json()["rand_asr_range"] == [0.0, 75.0]


def test_random_draws_depend_on_the_seed_and_the_counts_and_on_nothing_else():
    layers = {"a": (64, 3), "b": (32, 1)}
    assert random_ablations(layers, 5, 0) == random_ablations(dict(reversed(layers.items())), 5, 0)
    assert random_ablations(layers, 5, 0) != random_ablations(layers, 5, 1)
    assert random_ablations(layers, 5, 0) != random_ablations({"a": (64, 4), "b": (32, 1)}, 5, 0)
    assert random_ablations(layers, 3, 0) == random_ablations(layers, 5, 0)[:3]


def test_selected_units_outside_the_layer_are_refused():
    with pytest.raises(ValueError, match="outside 0..3"):
        selection_quality(trigger_model(*GRADED), {"0": [4]}, triggered_images(PATCHES), TARGET)
    with pytest.raises(ValueError, match="no module named 'conv9'"):
        unit_ablation_asr(trigger_model(*GRADED), ["conv9"], triggered_images(PATCHES), TARGET)


def test_uint8_and_float_images_give_the_same_answers():
    model = trigger_model(*GRADED)
    x = triggered_images(PATCHES)
    as_uint8 = selection_quality(model, {"0": [0, 3]}, x, torch.full((4,), TARGET))
    as_float = selection_quality(model, {"0": [0, 3]}, to_unit(x), TARGET)
    assert as_uint8 == as_float


class ResidualNet(nn.Module):
    """conv-BN-ReLU stem, a residual conv block, global average pool, linear: the zeroed stem
    channel reaches the head both through the block and through the skip connection."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.block = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.stem(x)))
        h = h + F.relu(self.block(h))
        return self.head(h.mean((2, 3)))


def random_residual_net() -> tuple[ResidualNet, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = ResidualNet()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 1.5)
        # Larger weights than the default init, so that predictions vary and single channels matter.
        model.block.weight.mul_(5)
        model.head.weight.mul_(5)
    model.eval()
    x = torch.randint(0, 256, (23, 3, 8, 8), dtype=torch.uint8)
    # The most frequent prediction as the target: a substantial ASR for ablations to move.
    target = int(torch.mode(engine.predict(model, x)).values)
    return model, x, torch.full((len(x),), target)


@contextlib.contextmanager
def outputs_zeroed(model: nn.Module, units: dict[str, list[int]]):
    """Each named module's listed output channels zeroed in every image, by hand: the reading of
    a selection that the oracle's batched hooks must reproduce."""
    modules = dict(model.named_modules())

    def zero(selected):
        def hook(module, inputs, output):
            output = output.clone()
            output[:, selected] = 0
            return output
        return hook

    handles = [modules[name].register_forward_hook(zero(selected)) for name, selected in units.items()]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def reference_asr(model: nn.Module, units: dict[str, list[int]], x: torch.Tensor, y: torch.Tensor) -> float:
    """The slow way: zero the units by hand, predict everything, count."""
    with outputs_zeroed(model, units):
        return attack_success_rate(engine.predict(model, x), y)


@pytest.mark.parametrize("batch_size", [1024, 50, 23, 7])  # all at once; 2 ablations a pass; 1; chunks of 7
def test_batched_ablations_equal_the_reference_loop_on_a_residual_net(batch_size):
    model, x, y = random_residual_net()
    names = ["stem", "bn", "block"]
    batched = unit_ablation_asr(model, names, x, y, batch_size=batch_size)
    reference = {name: [reference_asr(model, {name: [unit]}, x, y) for unit in range(6)] for name in names}
    assert {name: values.tolist() for name, values in batched.items()} == reference
    assert len(set(sum(reference.values(), []))) > 2, "the net is too uniform to test anything"
    selection = {"bn": [1, 4], "block": [0, 2, 5]}
    quality = selection_quality(model, selection, x, y, batch_size=batch_size)
    oracle = {name: oracle_units(batched[name], len(units)) for name, units in selection.items()}
    assert quality.sel_asr == reference_asr(model, selection, x, y)
    assert quality.oracle_asr == reference_asr(model, oracle, x, y)
    assert quality.baseline_asr == reference_asr(model, {}, x, y)
    assert ablation_asr(model, [{}, selection, oracle], x, y, batch_size=batch_size) == \
        [quality.baseline_asr, quality.sel_asr, quality.oracle_asr]


def test_a_listed_layer_that_never_runs_is_accepted_only_when_left_alone():
    """ANP lists every BatchNorm the model defines, used or not."""
    model, x, y = random_residual_net()
    model.spare = nn.BatchNorm2d(6).eval()
    quality = selection_quality(model, {"bn": [0], "spare": []}, x, y)
    assert quality.layers["spare"]["units"] is None and quality.layers["bn"]["units"] == 6
    with pytest.raises(ValueError, match="'spare' does not run"):
        selection_quality(model, {"spare": [0]}, x, y)


def test_the_model_is_left_unchanged_even_when_a_pass_fails():
    model, x, y = random_residual_net()
    before = copy.deepcopy(model.state_dict())

    def hooks() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    selection_quality(model, {"stem": [0, 3], "block": [1]}, x, y)
    unit_ablation_asr(model, ["bn"], x, y, batch_size=10)
    with pytest.raises(IndexError):
        ablation_asr(model, [{"block": [6]}], x, y)  # unit 6 of 6 channels: fails inside the hook
    assert hooks() == 0 and not model.training
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# --- the baselines' declared selections ------------------------------------------------

def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return build_model("small-cnn", INFO).eval()


def context(model: nn.Module, reserve: ImageSet, tmp_path: Path) -> DefenseContext:
    return DefenseContext(model=model, build_model=lambda: build_model("small-cnn", INFO), train=reserve,
                          reserve=reserve, info=INFO, train_config=TrainConfig(),
                          finetune_config=TrainConfig(batch_size=32, epochs=1), device=torch.device("cpu"),
                          seed=0, artifact_dir=tmp_path, log=lambda message: None)


def self_labelled_reserve(model: nn.Module, count: int = 64) -> ImageSet:
    """Random images labelled by the model itself: reserve accuracy starts at 100%."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (count, *INFO.shape), dtype=torch.uint8, generator=generator)
    return ImageSet(x, engine.predict(model, x))


@torch.no_grad()
def logits_with_outputs_zeroed(model: nn.Module, selection: dict[str, list[int]], x: torch.Tensor) -> torch.Tensor:
    with outputs_zeroed(model, selection):
        return model.eval()(to_unit(x))


def test_fine_pruning_declares_the_cut_features_as_body_channels(tmp_path, monkeypatch):
    """FP zeroes classifier columns; the declared selection, read as body's output channels
    zeroed, must give the pruned model before fine-tuning exactly (captured where it starts)."""
    model = small_cnn()
    original = copy.deepcopy(model)
    reserve = self_labelled_reserve(model)
    probe = reserve.x[:16]
    captured = {}

    def no_finetune(net, *args, **kwargs):
        with torch.no_grad():
            captured["logits"] = net.eval()(to_unit(probe))
        return []

    monkeypatch.setattr(engine, "train", no_finetune)
    result = FinePruning(FinePruningConfig(acc_ratio=0.9, max_prune_ratio=0.5), seed=0).run(context(model, reserve, tmp_path))
    cut = result.selection["body"]
    assert list(result.selection) == ["body"]
    assert cut == sorted(result.details["pruned_channels"]) and 0 < len(cut) <= 32
    weight = model.classifier.weight
    assert torch.count_nonzero(weight[:, cut]) == 0
    kept = [c for c in range(64) if c not in cut]
    assert bool((weight[:, kept] != 0).any(0).all())
    torch.testing.assert_close(logits_with_outputs_zeroed(original, result.selection, probe), captured["logits"])


def test_anp_declares_the_batchnorm_channels_it_pruned(tmp_path):
    """Masks trained a few steps with a large step size, and the largest threshold accepted
    (max_acc_drop 1): some channels fall under it. The declared ones are those whose mask is below
    the threshold, their gamma is zero (the channel outputs its beta whatever the input), and
    every other parameter is as it was."""
    model = small_cnn()
    before = copy.deepcopy(model.state_dict())
    reserve = self_labelled_reserve(model)
    cfg = ANPConfig(iterations=4, batch_size=32, mask_lr=5.0, augment=False, max_acc_drop=1.0, threshold_step=0.3)
    result = ANP(cfg, seed=0).run(context(model, reserve, tmp_path))
    threshold = result.details["threshold"]
    assert threshold == 0.9
    bns = ["body.1", "body.5", "body.9", "body.12"]
    assert list(result.selection) == bns
    modules = dict(model.named_modules())
    outputs = {}
    handles = [modules[name].register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o))
               for name in bns]
    with torch.no_grad():
        model.eval()(to_unit(reserve.x[:8]))
    for handle in handles:
        handle.remove()
    for name in bns:
        pruned = result.selection[name]
        assert pruned == torch.nonzero(result.tensors[f"mask.{name}"] < threshold).flatten().tolist()
        kept = [c for c in range(len(before[f"{name}.weight"])) if c not in pruned]
        assert torch.count_nonzero(modules[name].weight[pruned]) == 0
        assert torch.equal(modules[name].weight[kept], before[f"{name}.weight"][kept])
        assert torch.equal(modules[name].bias, before[f"{name}.bias"])
        beta = modules[name].bias[pruned].view(1, -1, 1, 1)
        torch.testing.assert_close(outputs[name][:, pruned], beta.expand_as(outputs[name][:, pruned]))
    total = sum(len(units) for units in result.selection.values())
    assert total == result.details["pruned_neurons"] and 0 < total < result.details["neurons"]


def test_clp_declares_the_batchnorm_of_a_paired_channel(tmp_path):
    model = small_cnn()
    with torch.no_grad():
        model.body[8].weight[5] *= 20
    original = copy.deepcopy(model)
    empty = ImageSet(torch.zeros(1, *INFO.shape, dtype=torch.uint8), torch.zeros(1, dtype=torch.long))
    result = CLP(CLPConfig(), seed=0).run(context(model, empty, tmp_path))
    assert result.selection == {"body.1": [], "body.5": [], "body.9": [5], "body.12": []}
    x = torch.randint(0, 256, (8, *INFO.shape), dtype=torch.uint8)
    torch.testing.assert_close(logits_with_outputs_zeroed(original, result.selection, x), model(to_unit(x)))


def test_clp_declares_the_conv_where_it_cuts_the_filter(tmp_path):
    """An affine-free BatchNorm's channel is cut at its conv's filter (the BN then outputs a
    constant, the conv 0), and a conv with no BatchNorm has filter and bias cut: both are the conv."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, bias=False), nn.BatchNorm2d(16, affine=False), nn.ReLU(),
                          nn.Conv2d(16, 16, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[0].weight[3] *= 20
        model[3].weight[7] *= 20
    model.eval()
    original = copy.deepcopy(model)
    empty = ImageSet(torch.zeros(1, *INFO.shape, dtype=torch.uint8), torch.zeros(1, dtype=torch.long))
    result = CLP(CLPConfig(), seed=0).run(context(model, empty, tmp_path))
    assert result.selection == {"0": [3], "3": [7]}
    x = torch.randint(0, 256, (8, *INFO.shape), dtype=torch.uint8)
    torch.testing.assert_close(logits_with_outputs_zeroed(original, result.selection, x), model(to_unit(x)))


def test_unit_selecting_defenses_get_selection_metrics_in_results_json(smoke_cell, workspace, tmp_path, capsys):
    """A smoke grid's none, fp, anp and clp cells store sel_asr, oracle_asr, sel_recall and the
    chance baseline (rand_asr, rand_acc, with each draw in the details), with the per-layer
    details, and `python -m bench results --format json` shows them; a defense that selects no unit
    (ft) gets none of them. The cells of the stage share one computation per layer and per set of
    counts (the shared directories beside the stage)."""
    import json

    from bench import cli
    from bench.spec import CellSpec
    from bench.store import ResultStore

    store = ResultStore(tmp_path / "bench.sqlite", workspace.root)
    store.record_catalog(catalog_entries())  # what a run records
    for defense in ("none", "fp", "anp", "clp", "ft"):
        result = smoke_cell("badnets", defense)
        spec = CellSpec.from_json(result["spec"])
        store.stage_running(spec.stage)
        store.stage_done(spec.stage.id, json.loads((workspace.root / spec.stage.id / "result.json").read_text()))
        store.cell_running(spec)
        store.cell_done(spec.id, result)
    assert cli.main(["results", "--store", str(tmp_path / "bench.sqlite"), "--format", "json"]) in (0, None)
    rows = {row["defense"]: row for row in json.loads(capsys.readouterr().out)}
    for defense in ("none", "fp", "anp", "clp"):
        metrics = rows[defense]["metrics"]
        assert {"sel_asr", "oracle_asr", "sel_recall", "rand_asr", "rand_acc", "sel_acc"} <= set(metrics), defense
        assert 0 <= metrics["sel_asr"] <= 100 and 0 <= metrics["oracle_asr"] <= 100
        details = rows[defense]["measurements"]["selection"]["details"]
        assert sum(layer["count"] for layer in details["layers"].values()) > 0, defense
        assert len(details["rand_asr"]) == len(details["rand_acc"]) == 5
        assert metrics["rand_asr"] == round(sum(details["rand_asr"]) / 5, 2)
        assert rows[defense]["timings"]["selection_s"] > 0
    assert "sel_asr" not in rows["ft"]["metrics"] and "rand_asr" not in rows["ft"]["metrics"]
    stage = CellSpec.from_json(smoke_cell("badnets", "none")["spec"]).stage
    selected_layers = {name for defense in ("none", "fp", "anp", "clp")
                       for name, layer in rows[defense]["measurements"]["selection"]["details"]["layers"].items()
                       if layer["count"]}
    per_layer = list(workspace.root.glob(f"{stage.id}-unit-asr-*"))
    assert len(per_layer) == len(selected_layers), "one single-unit computation per layer, shared by the cells"
    from bench.reporting import write_report

    report = write_report(store, "synthetic", tmp_path / "reports", tsne_figure=False)
    readme = (report / "README.md").read_text()
    section = readme.split("Did the defense hit the backdoor's units?", 1)[1].split("\n## ", 1)[0]
    for defense in ("none", "fp", "anp", "clp"):
        assert f"| {defense} | badnets |" in section
    assert "random ASR [min–max]" in section and "random C-ACC [min–max]" in section
    assert "| ft |" not in section
    assert (report / "figures" / "selection.png").is_file() and "figures/selection.png" in readme
