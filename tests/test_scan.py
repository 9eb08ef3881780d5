"""The trigger-inversion scanner (REASR): a hand-built linear model whose answer is known,
and a planted BadNets trigger against a benign model trained on the same synthetic data."""
from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from bench.data.base import DatasetInfo, ImageSet
from bench.grid import GridRequest, expand
from bench.metrics.reasr import ScanConfig, scan
from tests.bounds import SEED, at_least, at_most

SIDE = 16
PATCH = 2  # the known trigger: a white 2x2 patch at the top-left corner


def hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while len(h) < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def linear_case() -> tuple[nn.Module, ImageSet, DatasetInfo]:
    """Class c images are grey plus 0.2 x the Hadamard sign pattern c (zero on the patch) plus
    noise; the model is linear: logit_c = <pattern_c, x - 0.5> / 50, which gives each image a
    margin of about 1 (at least ~0.75) over the runner-up. Label 3 also gets
    +1.0 x sum(patch pixels - 0.5): a white patch adds 0.5 per pixel, so all 4 pixels (+2.0)
    flip every image to 3, but 1 pixel (+0.5) flips none. Any other pixel moves a logit gap by
    at most 2 x 0.7 / 50 = 0.028, so no other trigger of a few pixels exists."""
    info = DatasetInfo("linear", 10, (1, SIDE, SIDE), (0.5,), (0.25,), False)
    signs = hadamard(SIDE * SIDE)[1:11].view(10, 1, SIDE, SIDE).clone()
    signs[:, :, :PATCH, :PATCH] = 0
    generator = torch.Generator().manual_seed(0)
    y = torch.arange(400) % 10
    x = 0.5 + 0.2 * signs[y] + 0.05 * torch.randn(400, 1, SIDE, SIDE, generator=generator)
    images = ImageSet((x.clamp(0, 1) * 255).round().to(torch.uint8), y)
    weight = signs.view(10, -1) / 50
    weight[3].view(1, SIDE, SIDE)[:, :PATCH, :PATCH] += 1.0
    linear = nn.Linear(SIDE * SIDE, 10)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(-0.5 * weight.sum(1))
    return nn.Sequential(nn.Flatten(), linear), images, info


def test_linear_model_known_trigger(tmp_path, one_thread):
    model, images, info = linear_case()
    x = images.x.float() / 255
    logits = model(x).detach()
    assert (logits.argmax(1) == images.y).all()
    # The premise: every margin lies between what 1 patch pixel (+0.5) and 4 (+2.0) add.
    top2 = logits.topk(2, dim=1).values
    assert 0.6 < (top2[:, 0] - top2[:, 1]).min() and (top2[:, 0] - top2[:, 1]).max() < 1.4
    # bound 0.004 of 256 px = 1 pixel (far too small); 0.02 = 5.12 px covers the 4-pixel patch.
    config = ScanConfig(bounds=(0.004, 0.02), images_per_class=5, eval_images_per_class=20, steps=60,
                        refine_steps=30, lr=0.2, seed=0)
    result = scan(model, images, info, config)
    # Measured: REASR 0.0% at 0.004 (no candidate flips any image) and 100.0% (label 3) at 0.02.
    assert result.reasr[0.02] >= 98 and result.best_label[0.02] == 3
    assert result.reasr[0.004] <= 5
    assert result.max_reasr == result.reasr[0.02]
    # The reported triggers respect their bounds, and the one found sits on the patch.
    for bound in config.bounds:
        assert result.mask_l1[bound] * SIDE * SIDE <= bound * SIDE * SIDE + 1e-4
    # 0.02 allows floor(5.12) = 5 pixels: the 4 of the patch plus one that is free to be anything.
    mask = result.masks[1, 0]
    assert mask[:PATCH, :PATCH].min() > 0.5
    assert (mask > 0).sum() <= 5
    assert result.patterns[1, 0, :PATCH, :PATCH].min() > 0.8  # white
    assert result.opt_images == 50 and result.eval_images == 200  # 5 + 20 per class
    # Seeded: the same scan gives the same triggers, and so does one run in chunks of 2 triggers
    # (each trigger's starting point is drawn up front; chunking is a speed setting).
    again = scan(model, images, info, config)
    assert torch.equal(again.masks, result.masks) and again.reasr == result.reasr
    chunked = scan(model, images, info, ScanConfig(**{**config.__dict__, "max_batch_images": 100}))
    assert torch.allclose(chunked.masks, result.masks, atol=1e-5) and chunked.reasr == result.reasr
    # The report's figures render from a result and from its JSON form.
    from bench.reporting.figures import save
    from bench.reporting.reasr_figures import plot_reasr, trigger_grid

    curve = save(plot_reasr({"linear": result.reasr, "json": result.to_json()["reasr"]}), tmp_path / "reasr", "").png
    grid = save(trigger_grid({"linear": result}), tmp_path / "grid", "").png
    assert curve.stat().st_size > 1000 and grid.stat().st_size > 1000


def test_early_stop_keeps_the_known_trigger_and_skips_steps(one_thread, monkeypatch):
    """With early_stop, the patch trigger (label 3 at the 2% bound) is still found, and the
    triggers that flip every optimisation image stop taking steps: fewer model calls than the
    (rows x steps) of the full run. The rows that cannot succeed run to the end."""
    from bench.metrics import reasr

    model, images, info = linear_case()
    calls = []
    counted = nn.Sequential(model)
    counted.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    full = ScanConfig(bounds=(0.004, 0.02), images_per_class=5, eval_images_per_class=20, steps=60, refine_steps=30,
                      lr=0.2, seed=0, max_batch_images=4096)  # one pass per step: the calls count images
    stopped = scan(counted, images, info, reasr.ScanConfig(**{**full.__dict__, "early_stop": True}))
    optimised_images = sum(calls[:-3])  # the last calls: held-out clean and stamped images
    assert stopped.reasr[0.02] >= 98 and stopped.best_label[0.02] == 3 and stopped.reasr[0.004] <= 5
    # 20 rows (2 bounds x 10 labels) x 50 images per step; only the patch row can converge, and it
    # skips at least 30 of its 90 steps (measured: 68, so 86,600 images of 90,000)
    assert optimised_images <= 20 * 50 * (full.steps + full.refine_steps) - 50 * 30


def stage_model(workspace, smoke_cell, attack: str):
    smoke_cell(attack, "undefended")
    cell = expand(GridRequest("synthetic", "smoke", attacks=[attack], defenses=["undefended"], seeds=[SEED]))[0]
    model, _, _ = workspace.load_stage(cell.stage)
    info, _, _, test = workspace.split(cell.stage)
    return model, info, test


@pytest.mark.trained
def test_scanner_finds_planted_badnets_trigger(workspace, smoke_cell):
    # BadNets on 16x16: a 2x2 white square = 4 px = 1.6% of the area, so the 2% bound (5 px) fits it.
    # A reduced budget for speed (defaults: 300 + 100 steps, 10 images per class).
    config = ScanConfig(bounds=(0.02,), images_per_class=5, eval_images_per_class=30, steps=60, refine_steps=30,
                        lr=0.2)
    badnets_model, info, test = stage_model(workspace, smoke_cell, "badnets")
    badnets = scan(badnets_model, test, info, config)
    benign_model, _, benign_test = stage_model(workspace, smoke_cell, "benign")
    benign = scan(benign_model, benign_test, info, config)
    # Over seeds 0-2 x 1-2 threads x AVX-512 / AVX2: badnets REASR 94.1-100% (bound 80), benign
    # 0-1.5%, the mask's share of the 4x4 corner 0.40-1 (bound 0.25; uniform would be 0.06).
    # Measured (seed 0): badnets REASR 97.4% at 2% with label 0 (the target; the true trigger's
    # test ASR is ~99%), 97.4% / 96.3% with scan seeds 1 / 2; benign REASR 0.4% at 2%. (Stages
    # trained with 1 CPU thread come out slightly different: 98.9% vs 0.0%.) (Benign over
    # all six bounds at 100+50 steps: 2.4, 18.0, 40.4, 65.6, 91.3, 98.7% -- natural backdoors grow
    # with the bound; badnets: 100% at every bound.)
    assert badnets.best_label[0.02] == 0
    at_least("badnets REASR", badnets.reasr[0.02], 80)
    at_most("benign REASR", benign.reasr[0.02], badnets.reasr[0.02] - 30)
    assert badnets.mask_l1[0.02] <= 0.02 + 1e-6 and benign.mask_l1[0.02] <= 0.02 + 1e-6
    # The reversed mask sits where the model saw the trigger: the bottom-right 2x2 square,
    # moved by up to 2 px by the random-crop augmentation, i.e. the bottom-right 4x4 corner.
    mask = badnets.masks[0, 0]
    at_least("mask share in the corner", (mask[-4:, -4:].sum() / mask.sum()).item(), 0.25)  # 6% of the area


@pytest.mark.trained
def test_stimulation_candidates_then_inversion(workspace, smoke_cell):
    """ABS mode: neuron stimulation picks 2 of the 10 labels, and inverting only those still
    finds the planted trigger. Measured: candidates [0, 5], the top neuron elevating label 0
    (score ~11.6, next label ~6.0); REASR at 2% 99.3%. Over seeds 0-2 x 1-2 threads x AVX-512 /
    AVX2: 41.1-100% (bound 30; a benign model's REASR at 2% is 0-1.5%)."""
    model, info, test = stage_model(workspace, smoke_cell, "badnets")
    config = ScanConfig(bounds=(0.02,), images_per_class=5, eval_images_per_class=30, steps=60, refine_steps=30,
                        lr=0.2, candidates="stimulation", max_candidates=2)
    result = scan(model, test, info, config)
    # The target is among the 2 candidates (first for seed 0; second, after label 5, for seed 1).
    assert len(result.candidates) == 2 and 0 in result.candidates
    assert result.per_candidate.shape == (1, 2)
    assert result.stimulation["layer"] and 0 in {neuron["label"] for neuron in result.stimulation["top_neurons"]}
    assert result.best_label[0.02] == 0
    at_least("REASR", result.reasr[0.02], 30)


def test_split_is_disjoint_stratified_and_seeded():
    from bench.metrics.reasr import split_images

    labels = torch.arange(100) % 10
    labels[:7] = 0  # class 0 has 16 images, classes 1..6 have 9, 7..9 have 10
    config = ScanConfig(images_per_class=5, eval_images_per_class=3)
    opt, held = split_images(labels, 10, config, torch.Generator().manual_seed(0))
    assert set(opt.tolist()).isdisjoint(held.tolist())
    assert torch.bincount(labels[opt], minlength=10).tolist() == [5, 4, 4, 4, 4, 4, 4, 5, 5, 5]  # at most half a class
    assert torch.bincount(labels[held], minlength=10).tolist() == [3] * 10
    again = split_images(labels, 10, config, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], opt) and torch.equal(again[1], held)


def test_clean_errors_are_not_credited():
    """A model that predicts label 5 for everything has no trigger to find: REASR must be 0,
    not 100 (its errors would all count as 'sent to 5' if clean predictions were not excluded)."""
    info = DatasetInfo("const", 10, (1, 8, 8), (0.5,), (0.25,), False)
    linear = nn.Linear(64, 10)
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.zero_()
        linear.bias[5] = 100.0
    model = nn.Sequential(nn.Flatten(), linear)
    images = ImageSet(torch.randint(0, 256, (100, 1, 8, 8), dtype=torch.uint8), torch.arange(100) % 10)
    result = scan(model, images, info, ScanConfig(bounds=(0.1, 1.0), images_per_class=2, steps=3, refine_steps=1))
    assert result.reasr == {0.1: 0.0, 1.0: 0.0}


def test_config_validation():
    from bench.errors import BenchError

    with pytest.raises(BenchError):
        ScanConfig(bounds=(0.0,))
    with pytest.raises(BenchError):
        ScanConfig(candidates="some")


@pytest.mark.trained
def test_cells_that_change_nothing_share_one_scan(workspace, smoke_cell):
    """On the benign row, the undefended cell and CLP pruning nothing (u=100: no channel is that
    far out) hold the stage's own model: the first computes the scan in the stage's shared scan
    directory, the second reuses it (the same REASR and trigger bytes). A damaged shared scan is
    detected and computed again, and gives the same numbers (the scan is deterministic)."""
    from bench.cell import run_defense_cell

    smoke_cell("benign", "undefended")  # the stage, trained once per session
    cells = expand(GridRequest("synthetic", "smoke", attacks=["benign"], defenses=["undefended", "clp"], seeds=[SEED],
                               overrides=["defense.clp.u=100", "metric.reasr.rows=benign"]))
    undefended, clp = (run_defense_cell(cell, workspace) for cell in cells)
    assert clp["details"]["pruned_channels"] == 0
    shared = workspace.root / undefended["measurements"]["reasr"]["details"]["shared"]
    assert clp["measurements"]["reasr"]["details"]["shared"] == shared.name
    assert clp["metrics"]["reasr"] == undefended["metrics"]["reasr"]
    first = (workspace.root / cells[0].id / "scan.safetensors").read_bytes()
    assert (workspace.root / cells[1].id / "scan.safetensors").read_bytes() == first
    (shared / "scan.safetensors").write_bytes(b"damaged")
    shutil.rmtree(workspace.root / cells[1].id)
    again = run_defense_cell(cells[1], workspace)
    assert again["metrics"]["reasr"] == undefended["metrics"]["reasr"]
    assert (shared / "scan.safetensors").read_bytes() == first
