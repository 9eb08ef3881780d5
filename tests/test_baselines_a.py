"""Behaviour of the FT, Fine-Pruning, NAD and ABL baselines on the synthetic smoke setting.

Each runs against badnets through the real cell pipeline (``smoke_cell``). Where a method
is known not to work in this setting, the test asserts what it does instead and says why.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import engine
from bench.cell import run_defense_cell
from bench.data.base import DatasetInfo, ImageSet
from bench.data.synthetic import make_synthetic
from bench.defense import DefenseContext
from bench.grid import GridRequest, expand
from bench.models.base import build_model
from bench.registry import DEFENSES
from tests.bounds import SEED, at_least, at_most


def history(workspace, result: dict) -> list[dict]:
    with open(Path(workspace.root) / result["id"] / "history.json") as handle:
        return json.load(handle)


def assert_accuracy_kept(result: dict, points: float = 10.0) -> None:
    at_least("C-ACC", result["metrics"]["c_acc"], result["undefended"]["c_acc"] - points)


# --- FT ---------------------------------------------------------------------------------

@pytest.mark.trained
def test_ft_with_the_profile_recipe_keeps_accuracy_and_the_backdoor(smoke_cell, workspace):
    """Fine-tuning alone does not remove a BadNets backdoor here, as Liu et al. (2018,
    Fine-Pruning) report: clean data barely activates the backdoor neurons, so their
    weights hardly move. On the smoke reserve (200 images) the profile's recipe is 5 epochs
    of 2 SGD steps at lr 0.01. Over seeds 0-2 x 1-2 threads x AVX-512 / AVX2 kernels: ASR
    95.9-98.3% (bound: half the undefended, ~49), C-ACC 100% (bound 90)."""
    result = smoke_cell("badnets", "ft")
    assert_accuracy_kept(result)
    at_least("ASR", result["metrics"]["asr"], 0.5 * result["undefended"]["asr"])
    curve = history(workspace, result)
    assert [r["epoch"] for r in curve] == [1, 2, 3, 4, 5]
    assert all("test_asr" in r and "test_c_acc" in r for r in curve), "the monitor's curves were not recorded"
    assert result["details"]["reserve_size"] == 200


@pytest.mark.trained
def test_ft_longer_and_stronger_erodes_the_backdoor(smoke_cell):
    """More fine-tuning (20 epochs at lr 0.1) forgets part of the backdoor without hurting
    clean accuracy. Measured over seeds 0-2 x 1-2 threads x AVX-512 / AVX2: ASR 0.2-51.1%
    (bound: 20 points below the undefended ~97-99%, worst margin 27.7), C-ACC 100%."""
    result = smoke_cell("badnets", "ft", ["defense.ft.epochs=20", "defense.ft.lr=0.1"])
    assert_accuracy_kept(result)
    at_most("ASR", result["metrics"]["asr"], result["undefended"]["asr"] - 20)
    assert result["details"]["epochs"] == 20 and result["details"]["lr"] == 0.1


# --- Fine-Pruning -----------------------------------------------------------------------

@pytest.mark.trained
def test_fp_prunes_dormant_channels_and_removes_badnets(smoke_cell):
    """Over seeds 0-2 x 1-2 threads x AVX-512 / AVX2 kernels FP's effect on the smoke task varies
    a lot: ASR 1.9-77.2% (undefended 96.7-98.8%), C-ACC 90-99.9%. So the bounds claim only that it
    lowers ASR, to at most 90% of the undefended model's (worst margin ~10 points), within 15
    points of C-ACC (worst margin 5); the pruning rule itself is checked exactly below."""
    result = smoke_cell("badnets", "fp")
    assert_accuracy_kept(result, points=15.0)
    at_most("ASR", result["metrics"]["asr"], 0.9 * result["undefended"]["asr"])
    d = result["details"]
    path, pruned = d["reserve_acc_path"], d["pruned"]
    assert len(path) == d["channels"] + 1 == 65
    assert 0 < pruned < d["channels"] and len(d["pruned_channels"]) == pruned
    # The stopping rule, on the reserve only: the kept step holds the threshold, the next one breaks it.
    assert d["reserve_acc_threshold"] == pytest.approx(0.9 * path[0], abs=0.01)
    assert path[pruned] >= d["reserve_acc_threshold"] > path[pruned + 1]
    assert d["last_conv"] == "body.11"


def test_fp_pruned_channels_stay_cut_after_fine_tuning(smoke_cell, workspace):
    """Fine-tuning must not revive the pruned channels: their classifier columns are zero in the saved model."""
    from safetensors.torch import load_file

    result = smoke_cell("badnets", "fp")
    weights = load_file(str(Path(workspace.root) / result["id"] / "model.safetensors"))["classifier.weight"]
    cut = torch.tensor(result["details"]["pruned_channels"])
    assert torch.count_nonzero(weights[:, cut]) == 0
    kept = torch.ones(weights.shape[1], dtype=torch.bool)
    kept[cut] = False
    assert torch.count_nonzero(weights[:, kept]) > 0


# --- NAD --------------------------------------------------------------------------------

def test_nad_attention_layers_are_the_last_three_stages():
    from bench.units import stage_outputs

    info = DatasetInfo("probe", 10, (3, 32, 32), (0.5,) * 3, (0.25,) * 3, False)
    probe = torch.rand(2, 3, 32, 32)
    assert stage_outputs(build_model("preact-resnet18", info), probe, 3) == ["layer2", "layer3", "layer4"]
    # The small CNN: the last ReLU at each of its three resolutions (32, 16, 8).
    assert stage_outputs(build_model("small-cnn", info), probe, 3) == ["2", "6", "13"]


@pytest.mark.trained
def test_nad_removes_badnets_through_attention(smoke_cell):
    """With the authors' schedule (20 student epochs, teacher 10) at lr 0.05 NAD removes the
    backdoor; the same run with all betas 0 — plain fine-tuning of the student — does not, so the
    attention term does the work. The authors' lr 0.1 on the 200-image smoke reserve cost up to 27
    points of C-ACC (72.5-99% over seeds 0-2 and CPU kernels), and its plain fine-tuning sometimes
    removed the backdoor too (ASR 16%), so the ablation said nothing; at lr 0.02 neither moved.
    With the profile's recipe (10 SGD steps at lr 0.01) neither teacher nor student moves.
    Over seeds 0-2 x 1-2 threads x AVX-512 / AVX2: ASR 0-0.8%, C-ACC 99.1-100%, ASR with betas 0
    50-78.8% (bound: NAD's + 30, worst margin 19.8)."""
    recipe = ["defense.nad.teacher_lr=0.05", "defense.nad.lr=0.05", "defense.nad.epochs=20"]
    result = smoke_cell("badnets", "nad", recipe)
    assert_accuracy_kept(result)
    at_most("ASR", result["metrics"]["asr"], 0.5 * result["undefended"]["asr"])
    assert result["details"]["layers"] == ["2", "6", "13"]
    ablated = smoke_cell("badnets", "nad", recipe + ["defense.nad.betas=0:0:0"])
    at_least("ASR with betas 0", ablated["metrics"]["asr"], result["metrics"]["asr"] + 30)


# --- ABL --------------------------------------------------------------------------------

@pytest.mark.trained
def test_abl_isolates_clean_samples_when_clean_data_is_learned_first(smoke_cell):
    """ABL's isolation rests on backdoor samples being learned faster than clean ones
    (Li et al. 2021, Anti-Backdoor Learning: its LGA isolation exploits that speed gap). On
    the synthetic textures the opposite holds: after one LGA epoch test C-ACC is 97.8% while
    ASR is 1.8%, so the 1% lowest-loss samples are clean, nothing poisoned is unlearned and the backdoor is learned in the
    continued training. Measured: 38 isolated, detection precision 0, ASR 98.56 -> 98.33,
    C-ACC 100 -> 98.9; over seeds 0-2 x 1-2 threads x AVX-512 / AVX2: precision 0 (bound 10),
    ASR 93.6-99% (bound: half the undefended)."""
    result = smoke_cell("badnets", "abl")
    m = result["metrics"]
    assert DEFENSES.get("abl").kind == "training-time"
    assert m["det_flagged"] == result["details"]["isolated"] == 38  # 1% of the 3800 training samples
    at_most("detection precision", m["det_precision"], 10.0)
    at_least("ASR", m["asr"], 0.5 * result["undefended"]["asr"])


def faint_backdoored_set(seed: int = 1 + SEED) -> tuple[DatasetInfo, ImageSet, torch.Tensor, ImageSet, torch.Tensor]:
    """The synthetic textures at 30% contrast under heavy noise, so the clean task takes
    several epochs, with a bright 3x3 corner patch relabelled to class 0 on 10%: the
    setting ABL is designed for (the backdoor is learned first)."""
    info = DatasetInfo("faint", 10, (3, 16, 16), (0.5,) * 3, (0.25,) * 3, False)
    train, test = make_synthetic(2000, 500, 10, 3, 16, seed=seed)
    generator = torch.Generator().manual_seed(seed)

    def faint(images: ImageSet) -> ImageSet:
        x = 128 + (images.x.float() - 128) * 0.3 + 40 * torch.randn(images.x.shape, generator=generator)
        return ImageSet(x.clamp(0, 255).round().to(torch.uint8), images.y)

    train, test = faint(train), faint(test)
    x, y = train.x.clone(), train.y.clone()
    candidates = torch.nonzero(y != 0).flatten()
    poisoned = candidates[torch.randperm(len(candidates), generator=generator)[:200]]
    x[poisoned, :, -3:, -3:] = 255
    y[poisoned] = 0
    triggered = test.x[test.y != 0].clone()
    triggered[:, :, -3:, -3:] = 255
    return info, ImageSet(x, y), poisoned, test, triggered


@pytest.mark.trained
def test_abl_isolates_and_unlearns_a_backdoor_learned_first(tmp_path):
    """Where its premise holds ABL finds the poisoned samples and its gradient ascent erases
    the backdoor. Isolation runs 4 of the 10 epochs here (the default 20% is 2, which at 16
    SGD steps per epoch leaves the backdoor samples barely separated: lowest-loss cut 0.02
    against 0.00 with 4). 10 unlearning epochs, since 20 isolated samples make one step per
    epoch. The monitor only records curves. Measured: precision 100%; ASR 100% after the
    continued training -> 2.9% after unlearning, test accuracy 96.8% -> 77.2% (unlearning
    costs accuracy in so small a model and set). Over seeds 0-2 x 1-2 threads x AVX-512 / AVX2:
    isolation precision 1 (bound 0.8), ASR 1.0 before and 0.07-0.32 after unlearning (bounds
    0.9, 0.5), accuracy after 0.74-0.82 (bound 0.6)."""
    from defenses.baselines.abl import AntiBackdoorLearning

    info, train, poisoned, test, triggered = faint_backdoored_set()

    def monitor(epoch: int, model: torch.nn.Module) -> dict:
        return {"asr": (engine.predict(model, triggered) == 0).float().mean().item(),
                "c_acc": (engine.predict(model, test.x) == test.y).float().mean().item()}

    recipe = engine.TrainConfig(epochs=10, batch_size=128, lr=0.05)
    ctx = DefenseContext(model=None, build_model=lambda: build_model("small-cnn", info), train=train,
                         reserve=ImageSet(train.x[:0], train.y[:0]), info=info, train_config=recipe,
                         finetune_config=recipe, device=torch.device("cpu"), seed=SEED, artifact_dir=tmp_path,
                         monitor=monitor, log=lambda message: None)
    defense = AntiBackdoorLearning(AntiBackdoorLearning.Config(isolation_epochs=4, unlearning_epochs=10), seed=SEED)
    result = defense.run(ctx)
    assert len(result.flagged) == 20
    at_least("isolation precision", torch.isin(result.flagged, poisoned).float().mean().item(), 0.8)
    phases = [r["phase"] for r in result.history]
    assert phases == ["isolation"] * 4 + ["training"] * 6 + ["unlearning"] * 10
    before = [r for r in result.history if r["phase"] == "training"][-1]
    after = result.history[-1]
    at_least("ASR before unlearning", before["asr"], 0.9)
    at_most("ASR after unlearning", after["asr"], 0.5 * before["asr"])
    at_least("C-ACC after unlearning", after["c_acc"], 0.6)  # chance is 0.1; some accuracy goes with the unlearning


# --- failures are surfaced ---------------------------------------------------------------

def test_a_diverging_defense_raises_from_the_cell(workspace):
    """A defense whose training diverges is an error of the cell (the runner records it as
    failed), never a stored result."""
    cell = expand(GridRequest("synthetic", "smoke", attacks=["badnets"], defenses=["ft"],
                              overrides=["defense.ft.lr=1e38", "defense.ft.epochs=1"]))[0]
    with pytest.raises(engine.NonFiniteLoss):
        run_defense_cell(cell, workspace)
    assert not (Path(workspace.root) / cell.id).exists()


def test_a_defense_that_raises_propagates_from_the_cell(workspace, monkeypatch):
    from defenses.baselines.fp import FinePruning

    def broken(self, ctx):
        raise RuntimeError("defense bug")

    monkeypatch.setattr(FinePruning, "run", broken)
    cell = expand(GridRequest("synthetic", "smoke", attacks=["badnets"], defenses=["fp"],
                              overrides=["defense.fp.acc_ratio=0.5"]))[0]
    with pytest.raises(RuntimeError, match="defense bug"):
        run_defense_cell(cell, workspace)
    assert not (Path(workspace.root) / cell.id).exists()
    assert not list(Path(workspace.root).glob(f"{cell.id}.tmp-*")), "a half-written artifact directory was left"
