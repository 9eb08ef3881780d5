"""Core behaviour: registries, overrides, splits, metrics, the engine, and a real badnets cell."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from bench.config import parse_field_values
from bench.data.splits import make_splits
from bench.errors import BenchError
from bench.grid import GridRequest, expand
from bench.metrics.accuracy import (
    attack_success_rate,
    clean_accuracy,
    defense_effectiveness_rating,
    robust_accuracy,
)
from bench.metrics.detection import detection_metrics
from bench.registry import ATTACKS, DATASETS, DEFENSES, MODELS


# --- registries and overrides ------------------------------------------------------------
@pytest.mark.parametrize("registry,kind", [(DATASETS, "dataset"), (MODELS, "model"), (ATTACKS, "attack"), (DEFENSES, "defense")])
def test_unknown_name_lists_valid_ones(registry, kind):
    with pytest.raises(BenchError) as info:
        registry.get("no-such-thing")
    message = str(info.value)
    assert f"unknown {kind} 'no-such-thing'" in message
    for name in registry.names():
        assert name in message


def test_grid_rejects_unknown_names():
    with pytest.raises(BenchError, match="unknown attack 'nope'"):
        expand(GridRequest("synthetic", "smoke", attacks=["nope"], defenses=["undefended"]))
    with pytest.raises(BenchError, match="unknown profile 'fast'"):
        expand(GridRequest("synthetic", "fast", attacks=["badnets"], defenses=["undefended"]))
    with pytest.raises(BenchError, match="unknown model 'resnet999'"):
        expand(GridRequest("synthetic", "smoke", model="resnet999", attacks=["badnets"], defenses=["undefended"]))


def test_override_validation():
    config = ATTACKS.get("badnets").Config
    assert parse_field_values(config, "poison_rate", "0.05", "k") == [0.05]
    assert parse_field_values(config, "poison_rate", "0.05,0.1", "k") == [0.05, 0.1]
    assert parse_field_values(config, "target_mode", "all-to-all", "k") == ["all-to-all"]
    assert parse_field_values(config, "size", "none", "k") == [None]
    with pytest.raises(BenchError, match="has no field 'poison_rat'.*poison_rate"):
        parse_field_values(config, "poison_rat", "0.1", "attack.badnets.poison_rat")
    with pytest.raises(BenchError, match="expected a number"):
        parse_field_values(config, "poison_rate", "lots", "attack.badnets.poison_rate")
    with pytest.raises(BenchError, match="expected one of all-to-one, all-to-all"):
        parse_field_values(config, "target_mode", "some", "attack.badnets.target_mode")
    request = GridRequest("synthetic", "smoke", attacks=["badnets"], defenses=["undefended"])
    for bad, pattern in [("train.epochz=3", "no field 'epochz'"), ("foo.bar=1", "section must be one of"),
                         ("attack.badnets=1", "expected attack.<name>.<field>"), ("train.epochs", "expected section"),
                         ("attack.badnets.poison_rate=2", r"attack.badnets.poison_rate=2.0: must be in \[0, 1\]"),
                         ("defense.none2.x=1", "unknown defense 'none2'")]:
        with pytest.raises(BenchError, match=pattern):
            expand(dataclasses.replace(request, overrides=[bad]))


def test_sweep_expands_into_cells_with_distinct_ids():
    cells = expand(GridRequest("synthetic", "smoke", attacks=["badnets"], defenses=["undefended"], seeds=[0, 1],
                               overrides=["attack.badnets.poison_rate=0.05,0.1", "train.epochs=2"]))
    assert len(cells) == 4
    assert len({c.id for c in cells}) == 4
    assert sorted((c.stage.seed, c.stage.attack_config["poison_rate"]) for c in cells) == [(0, 0.05), (0, 0.1), (1, 0.05), (1, 0.1)]
    assert all(c.stage.train["epochs"] == 2 for c in cells)
    # Identity is stable across expansions.
    again = expand(GridRequest("synthetic", "smoke", attacks=["badnets"], defenses=["undefended"], seeds=[0, 1],
                               overrides=["attack.badnets.poison_rate=0.05,0.1", "train.epochs=2"]))
    assert [c.id for c in cells] == [c.id for c in again]


# --- splits -----------------------------------------------------------------------------
def test_splits_are_deterministic_stratified_and_disjoint():
    labels = torch.arange(2000) % 10
    first, again, other = make_splits(labels, 0), make_splits(labels, 0), make_splits(labels, 1)
    assert torch.equal(first.reserve, again.reserve) and torch.equal(first.train, again.train)
    assert not torch.equal(first.reserve, other.reserve)
    assert len(set(first.reserve.tolist()) & set(first.train.tolist())) == 0
    assert len(first.reserve) + len(first.train) == 2000
    assert torch.bincount(labels[first.reserve], minlength=10).tolist() == [10] * 10  # 5% of each class


# --- metrics ----------------------------------------------------------------------------
def test_metric_formulas_on_hand_made_predictions():
    labels = torch.tensor([0, 1, 2, 3])
    assert clean_accuracy(torch.tensor([0, 1, 0, 0]), labels) == 50.0
    assert attack_success_rate(torch.tensor([0, 0, 0, 2]), torch.zeros(4, dtype=torch.long)) == 75.0
    assert robust_accuracy(torch.tensor([0, 1, 0, 3]), labels) == 75.0
    assert clean_accuracy(torch.tensor([1, 1, 1]), torch.tensor([1, 1, 0])) == 66.67


def test_der_sign_and_range():
    # ASR 90 -> 10 at no accuracy cost: (0.8 - 0 + 1) / 2
    assert defense_effectiveness_rating(90, 10, 95, 95) == 0.9
    # The accuracy drop is a penalty (a toolbox ships it with the sign flipped).
    assert defense_effectiveness_rating(90, 10, 95, 85) == 0.85
    # An accuracy gain or an ASR increase is not rewarded / penalised beyond 0.
    assert defense_effectiveness_rating(50, 60, 90, 95) == 0.5
    assert defense_effectiveness_rating(100, 0, 100, 0) == 0.5
    assert defense_effectiveness_rating(0, 0, 100, 0) == 0.0


def test_detection_metrics():
    result = detection_metrics(flagged=torch.tensor([0, 1, 2, 5]), poisoned=torch.tensor([0, 1, 2, 3]), num_samples=10)
    assert result == {"det_precision": 75.0, "det_recall": 75.0, "det_fpr": round(100 / 6, 2), "det_flagged": 4}
    assert detection_metrics(torch.tensor([], dtype=torch.long), torch.tensor([1]), 4)["det_recall"] == 0.0


# --- engine -----------------------------------------------------------------------------
def test_training_is_deterministic_on_cpu():
    from bench.data.synthetic import make_synthetic
    from bench.engine import TrainConfig, train
    from bench.models import build_model

    info = DATASETS.get("synthetic").info
    data, _ = make_synthetic(256, 10, 10, 3, 16)
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model("small-cnn", info)
        train(model, data, TrainConfig(epochs=1, batch_size=64), info, seed=3)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_nonfinite_loss_fails_loudly():
    from bench.data.synthetic import make_synthetic
    from bench.engine import NonFiniteLoss, TrainConfig, train
    from bench.models import build_model

    info = DATASETS.get("synthetic").info
    data, _ = make_synthetic(128, 10, 10, 3, 16)
    model = build_model("small-cnn", info)
    with pytest.raises(NonFiniteLoss, match="loss became nan"):
        train(model, data, TrainConfig(epochs=1, batch_size=64), info, seed=0,
              loss_fn=lambda m, x, y, i: m(x).sum() * float("nan"))


def test_batchnorm_recalibration_sets_the_exact_data_statistics():
    from torch import nn

    from bench.engine import recalibrate_batchnorm

    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    model[0].running_mean.fill_(5.0)  # stale statistics, as a fit that stops at a high lr leaves them
    x = (torch.rand(256, 3, 4, 4) * 255).to(torch.uint8)
    recalibrate_batchnorm(model, x, batch_size=128)
    pixels = x.float().div(255).permute(1, 0, 2, 3).flatten(1)  # (channels, all pixels)
    torch.testing.assert_close(model[0].running_mean, pixels.mean(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(model[0].running_var, pixels.var(1), atol=2e-3, rtol=0)  # mean of batch variances
    assert model[0].momentum == 0.1 and not model.training  # the module is left as it was configured, in eval mode


def test_augmentation_keeps_shape_and_shifts():
    from bench.data.augment import augment

    x = torch.rand(64, 3, 16, 16)
    out = augment(x, padding=2, hflip=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert not torch.equal(out, x)
    assert torch.equal(augment(x, padding=0, hflip=False), x)


# --- a real cell --------------------------------------------------------------------------
@pytest.mark.trained
def test_badnets_undefended_cell_learns_the_backdoor(smoke_cell):
    """Over seeds 0-2 x 1-2 threads x AVX-512 / AVX2 kernels: ASR 96.7-98.8%, C-ACC 100%."""
    from tests.bounds import at_least

    result = smoke_cell("badnets", "undefended")
    metrics = result["metrics"]
    at_least("ASR", metrics["asr"], 90.0)
    at_least("C-ACC", metrics["c_acc"], 80.0)  # 10 classes: chance is 10%
    assert metrics["der"] == 0.5  # the reference row changes nothing
    assert metrics["asr"] == result["undefended"]["asr"]


def test_readme_plugin_lists_are_generated_from_the_registries():
    from bench.readme import render

    readme = (__import__("pathlib").Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert render(readme) == readme, "README's plugin lists are stale: run `make readme`"
    for name in DATASETS.names() + MODELS.names() + ATTACKS.names() + DEFENSES.names():
        assert f"`{name}`" in readme


def test_plugin_contract_page_is_generated_from_the_current_docstrings():
    from bench.readme import CONTRACT, plugin_contract

    assert CONTRACT.read_text() == plugin_contract(), "docs/plugins.md is stale: run `make readme`"
    assert "docs/plugins.md" in (CONTRACT.parents[1] / "README.md").read_text()


def test_the_contract_pages_flagging_defense_runs_and_gets_detection_metrics(tmp_path, smoke_cell, registries):
    """The second example of docs/plugins.md, as a user would save it: a --plugin file."""
    import re

    from bench.readme import CONTRACT
    from bench.registry import load_plugin_file

    block = re.search(r"<!-- example-flagging-defense -->\s*```python\n(.*?)```", CONTRACT.read_text(), re.S)
    plugin = tmp_path / "spectral.py"
    plugin.write_text(block.group(1))
    load_plugin_file(plugin)
    result = smoke_cell("badnets", "spectral", overrides=["defense.spectral.epochs=2"])
    metrics = result["metrics"]
    assert {"det_precision", "det_recall", "det_fpr", "det_flagged"} <= set(metrics)
    assert metrics["det_flagged"] == result["details"]["removed"] > 0


def test_profile_attack_defaults_apply_to_their_attack_and_yield_to_the_user():
    """The quick profile fits Input-Aware's mask generator for 5 epochs (a setting keyed by the
    attack's name); the paper profile's poison rate (a shared field) reaches every attack that has
    it; the user's -o wins over both and is the only thing recorded as user-set."""
    quick = {c.stage.attack: c for c in expand(GridRequest("synthetic", "quick", attacks=["input-aware", "badnets"],
                                                           defenses=["undefended"]))}
    assert quick["input-aware"].stage.attack_config["mask_epochs"] == 5
    assert "mask_epochs" not in quick["badnets"].stage.attack_config
    paper = expand(GridRequest("synthetic", "paper", attacks=["input-aware"], defenses=["undefended"]))[0]
    assert paper.stage.attack_config["mask_epochs"] == 25 and paper.stage.attack_config["poison_rate"] == 0.05
    user = expand(GridRequest("synthetic", "quick", attacks=["input-aware"], defenses=["undefended"],
                              overrides=["attack.input-aware.mask_epochs=7"]))[0]
    assert user.stage.attack_config["mask_epochs"] == 7 and user.user_set["attack"] == {"mask_epochs": 7}


def test_benign_rows_get_the_reasr_scan_and_none_its_natural_preset():
    cells = expand(GridRequest("synthetic", "quick", attacks=["badnets", "benign"], defenses=["undefended", "none"]))
    by_row = {(c.stage.attack, c.defense): c for c in cells}
    assert "reasr" in by_row[("benign", "undefended")].metrics and "reasr" not in by_row[("badnets", "undefended")].metrics
    assert by_row[("benign", "none")].defense_config["preset"] == "natural"
    assert by_row[("badnets", "none")].defense_config["preset"] == "injected"
    explicit = expand(GridRequest("synthetic", "quick", attacks=["benign"], defenses=["none"],
                                  overrides=["defense.none.preset=injected", "metric.reasr.rows=off"]))[0]
    assert explicit.defense_config["preset"] == "injected" and "reasr" not in explicit.metrics
