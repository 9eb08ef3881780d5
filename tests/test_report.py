"""The report is rendered from the store alone: known numbers in, exactly those numbers out.

``fabricated_store`` writes stages and cells with chosen metrics through the store's own
methods (real stage specs from the grid; defenses that may not be registered get a
``CellSpec`` with a fixed id), plus fake artifact histories. One test adds a real smoke
cell to check the figures that need a model (t-SNE) and real training curves.
"""
from __future__ import annotations

import csv
import json
import re
import statistics
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from bench.grid import GridRequest, expand
from bench.metrics.accuracy import defense_effectiveness_rating
from bench.reporting import write_index, write_report
from bench.reporting.tables import HEADER
from bench.runner import catalog_entries
from bench.spec import CellSpec, StageSpec
from bench.store import ResultStore
from bench.workspace import cpu_name

ENV = {"bench": "0.1.0", "torch": "test", "torchvision": "test", "python": "3", "device": "cpu (test)", "host": "test"}
NONE_DEFAULT = {"max_reset_fraction": 0.03, "rounds": 1}
NONE_SWEEP = {"max_reset_fraction": 0.1, "rounds": 1}


@dataclass(frozen=True)
class FixedCell(CellSpec):
    """A real CellSpec whose id does not need the defense to be registered."""

    fixed_id: str = ""

    @property
    def id(self) -> str:
        return self.fixed_id


def stage_of(dataset: str, attack: str, seed: int) -> StageSpec:
    cells = expand(GridRequest(dataset, "smoke", attacks=[attack], defenses=["undefended"], seeds=[seed]))
    return cells[0].stage


# (dataset, attack, seed) -> undefended c_acc, asr, ra, stage seconds
STAGES = {
    ("synthetic", "badnets", 0): (98.5, 99.1, 0.8, 30.0),
    ("synthetic", "badnets", 1): (98.1, 98.7, 1.0, 32.0),
    ("synthetic", "benign", 0): (99.0, None, None, 20.0),
    ("fashion-mnist", "badnets", 0): (91.0, 97.0, 2.0, 50.0),
}
# (dataset, attack, seed, defense, config, status, c_acc, asr, ra, detection (precision, recall, fpr, flagged))
CELLS = [
    ("synthetic", "badnets", 0, "none", NONE_DEFAULT, "done", 97.0, 1.5, 90.0, (95.0, 88.0, 0.5, 350)),
    ("synthetic", "badnets", 1, "none", NONE_DEFAULT, "done", 96.0, 2.5, 88.0, (93.0, 91.0, 0.7, 372)),
    # per-attack defaults (NONE's natural preset on benign) are not a sweep: same row, no sensitivity plot
    ("synthetic", "benign", 0, "none", {**NONE_DEFAULT, "rounds": 2}, "done", 98.0, None, None, (0.0, 0.0, 1.0, 36)),
    ("synthetic", "badnets", 0, "none", NONE_SWEEP, "done", 95.0, 0.5, 93.0, (90.0, 97.0, 1.1, 410)),
    ("synthetic", "badnets", 1, "none", NONE_SWEEP, "failed", None, None, None, None),
    ("synthetic", "badnets", 0, "fine-pruning", {"prune_ratio": 0.2}, "failed", None, None, None, None),
    ("synthetic", "badnets", 1, "fine-pruning", {"prune_ratio": 0.2}, "failed", None, None, None, None),
    ("fashion-mnist", "badnets", 0, "none", NONE_DEFAULT, "done", 89.0, 3.0, 80.0, (80.0, 70.0, 2.0, 300)),
]
ERROR = "NonFiniteLoss: fine-tune: loss became nan in epoch 1 (lr 0.01); lower the learning rate"


def der(dataset, attack, seed, c_acc, asr):
    u_acc, u_asr = STAGES[(dataset, attack, seed)][:2]
    return None if asr is None else defense_effectiveness_rating(u_asr, asr, u_acc, c_acc)


def history(epochs: int, acc: float, asr: float | None) -> list[dict]:
    return [{"epoch": e, "loss": 1.0 / e, "lr": 0.01, "seconds": 0.1, "test_c_acc": acc - (epochs - e),
             "test_asr": None if asr is None else asr * e / epochs, "test_ra": None} for e in range(1, epochs + 1)]


def write_history(directory: Path, records: list[dict]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "history.json").write_text(json.dumps(records))


@pytest.fixture(scope="module")
def fabricated(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    store = ResultStore(root / "bench.sqlite")
    store.record_catalog(catalog_entries())  # what a run records
    stages = {}
    # a result from before a plugin version change: same settings, older, another id; superseded
    old = FixedCell(stage_of("synthetic", "badnets", 0), "undefended", {}, fixed_id="c-old")
    store.cell_running(old)
    store.cell_done(old.id, {"metrics": {"c_acc": 50.0, "asr": 50.0, "ra": 50.0, "der": 0.5}, "timings": {}})
    for (dataset, attack, seed), (acc, asr, ra, seconds) in STAGES.items():
        stage = stage_of(dataset, attack, seed)
        stages[(dataset, attack, seed)] = stage
        store.stage_running(stage)
        store.stage_done(stage.id, {"metrics": {"c_acc": acc, "asr": asr, "ra": ra, "poison_rate": 0.0 if asr is None else 10.0,
                                                "poisoned": 0 if asr is None else 380},
                                    "timings": {"total_s": seconds}, "environment": ENV})
        write_history(root / stage.id, history(4, acc, asr))
        undefended = CellSpec(stage, "undefended", {})
        store.cell_running(undefended)
        store.cell_done(undefended.id, {"metrics": {"c_acc": acc, "asr": asr, "ra": ra, "der": None if asr is None else 0.5},
                                        "timings": {"attack_s": seconds, "defense_s": 0.0, "eval_s": 0.1}, "environment": ENV})
    for number, (dataset, attack, seed, defense, config, status, acc, asr, ra, detection) in enumerate(CELLS):
        # the fields the user set, as the grid records them: the sweep's, none for the default variant
        user_set = {"defense": {"max_reset_fraction": 0.1}} if config == NONE_SWEEP else {}
        cell = FixedCell(stages[(dataset, attack, seed)], defense, dict(config), user_set=user_set,
                         fixed_id=f"c-fab{number:02d}")
        store.cell_running(cell)
        if status == "failed":
            store.cell_failed(cell.id, ERROR + "\nTraceback (most recent call last): ...")
            continue
        metrics = {"c_acc": acc, "asr": asr, "ra": ra, "der": der(dataset, attack, seed, acc, asr)}
        metrics.update(zip(("det_precision", "det_recall", "det_fpr", "det_flagged"), detection))
        store.cell_done(cell.id, {"metrics": metrics, "timings": {"attack_s": 30.0, "defense_s": 4.0 + number, "eval_s": 0.2},
                                  "environment": ENV, "details": {"rounds": 1}})
        write_history(root / cell.id, history(3, acc, asr))
        if defense == "none" and attack == "badnets" and seed == 0 and config == NONE_DEFAULT:
            Image.new("RGB", (40, 30), (200, 30, 30)).save(root / cell.id / "channel_scores.png")
    # a cell still running (e.g. an interrupted grid) must show up too
    running = FixedCell(stages[("synthetic", "benign", 0)], "fine-pruning", {"prune_ratio": 0.2}, fixed_id="c-fabrun")
    store.cell_running(running)
    out = tmp_path_factory.mktemp("reports")
    report = write_report(store, "synthetic", out)
    write_report(store, "fashion-mnist", out, tsne_figure=False)
    index = write_index(store, out)
    return store, report, index


def stat(values: list[float], digits: int = 2) -> str:
    mean = f"{statistics.mean(values):.{digits}f}"
    return mean if len(values) < 2 else f"{mean} ± {statistics.stdev(values):.{digits}f}"


def table_rows(markdown: str, heading: str) -> dict[str, list[str]]:
    """The first markdown table after ``heading``: first column -> the other columns."""
    section = markdown.split(heading, 1)[1]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("| :") and not line.startswith("| ---"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
            rows.setdefault(cells[0], cells[1:])
        elif rows and not line.startswith("|"):
            break
    return rows


def test_results_table_holds_exactly_the_stored_numbers(fabricated):
    _, report, _ = fabricated
    readme = (report / "README.md").read_text()
    rows = table_rows(readme, "## Results")
    assert rows["defense \\ attack"] == ["badnets", "benign"]
    # undefended x badnets: two seeds -> mean ± sample std of the known numbers
    expected = (f"{stat([98.5, 98.1])} / {stat([99.1, 98.7])} / {stat([0.8, 1.0])} · {stat([0.5, 0.5], 4)}")
    assert rows["undefended"][0] == expected
    none = "none (max_reset_fraction=0.03)"
    ders = [der("synthetic", "badnets", s, a, r) for s, a, r in ((0, 97.0, 1.5), (1, 96.0, 2.5))]
    assert rows[none][0] == f"{stat([97.0, 96.0])} / {stat([1.5, 2.5])} / {stat([90.0, 88.0])} · {stat(ders, 4)}"
    assert rows[none][1] == "98.00 / — / — · —"  # benign: no trigger, so only C-ACC
    # the sweep variant: one seed done, one failed -> the done seed's numbers, marked partial
    sweep = rows["none (max_reset_fraction=0.1)"][0]
    assert sweep.startswith(f"95.00 / 0.50 / 93.00 · {der('synthetic', 'badnets', 0, 95.0, 0.5):.4f}")
    assert "1/2 seeds; 1 failed" in sweep
    assert rows["fine-pruning"] == ["**failed**", "running"]
    assert rows["none (max_reset_fraction=0.1)"][1] == "—"  # never run
    # detection, cost and failures
    detection = table_rows(readme, "## Detection")
    assert detection[none][:6] == ["badnets", stat([95.0, 93.0]), stat([88.0, 91.0]), stat([0.5, 0.7]), stat([350, 372], 0),
                                   stat([380, 380], 0)]
    cost = table_rows(readme, "## Cost")
    assert cost["badnets"][0] == "31.0" and cost["benign"][0] == "20.0"
    failures = readme.split("## Failed and unfinished cells", 1)[1]
    assert failures.count(ERROR.replace("|", "\\|")) == 3 and "c-fabrun" in failures
    assert "1 older cell(s) of the same settings" in readme and "50.00" not in readme
    assert "NONE's ASR reduction vs undefended" in readme and f"{98.9 / 2.0:.2f}×" in readme


def test_results_from_before_the_cpu_was_recorded_say_so(fabricated):
    _, report, _ = fabricated
    assert table_rows((report / "README.md").read_text(), "Setup")["**CPU**"] == ["not recorded"]


def test_csv_round_trips_and_json_has_every_cell(fabricated):
    store, report, _ = fabricated
    with open(report / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    cells = store.cells(dataset="synthetic")
    by_cell: dict[str, dict[str, str]] = {}
    for row in rows:
        assert row["dataset"] == "synthetic"
        by_cell.setdefault(row["cell_id"], {})[row["metric"]] = row["value"]
        assert row["status"] == next(c["status"] for c in cells if c["id"] == row["cell_id"])
    cells = [c for c in cells if c["id"] != "c-old"]  # superseded by its re-run
    assert set(by_cell) == {c["id"] for c in cells}  # failed and running cells included
    for cell in cells:
        stored = {**(cell["metrics"] or {}), **(cell["timings"] or {})}
        parsed = {k: (None if v == "" else json.loads(v)) for k, v in by_cell[cell["id"]].items()}
        for metric in ("c_acc", "asr", "ra", "der"):
            assert parsed[metric] == stored.get(metric)
        assert {k: v for k, v in parsed.items() if v is not None} == {k: v for k, v in stored.items() if v is not None}
    payload = json.loads((report / "results.json").read_text())
    assert {c["id"]: c["status"] for c in payload["cells"]} == {c["id"]: c["status"] for c in cells}
    assert {c["id"]: c["metrics"] for c in payload["cells"]} == {c["id"]: c["metrics"] for c in cells}
    assert [c["id"] for c in payload["superseded"]] == ["c-old"]


def test_every_figure_is_a_valid_image_and_referenced(fabricated):
    _, report, index = fabricated
    readme = (report / "README.md").read_text()
    pngs = sorted((report / "figures").rglob("*.png"))
    names = {p.relative_to(report).as_posix() for p in pngs}
    for expected in ("figures/heatmap_asr.png", "figures/heatmap_c_acc.png", "figures/heatmap_der.png",
                     "figures/acc_vs_asr.png", "figures/bars.png", "figures/curves.png",
                     "figures/sweep_none_max_reset_fraction.png"):
        assert expected in names
    assert not any("sweep_none_rounds" in n for n in names)
    assert any("none/" in n and n.endswith("channel_scores.png") for n in names)  # NONE's own diagnostics, copied
    referenced = set(re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", readme))
    assert referenced == names
    for png in pngs + [index.parent / "summary.png"]:
        assert png.stat().st_size > 0
        with Image.open(png) as image:
            image.verify()
        with Image.open(png) as image:
            assert image.size[0] > 30 and image.size[1] > 20
    drawn = [p for p in pngs if "/none/" not in p.as_posix()]  # NONE's own figures are copied as they are
    svgs = [p.with_suffix(".svg") for p in drawn] + [index.parent / "summary.svg"]
    for svg in svgs:
        assert ET.parse(svg).getroot().tag.endswith("svg")
    # fabricated cells stored no features: t-SNE is skipped with a note naming the cell, not an error
    assert "t-SNE: badnets: the undefended cell" in readme and "stored no features" in readme


def test_index_is_the_directorys_readme_with_its_notes(fabricated, tmp_path):
    """The cross-dataset page is README.md (a browsed reports/ or study directory opens on it), it
    includes NOTES.md beside it, and replaces a generated index.md of the page's older name, never
    a hand-written one."""
    store, _, index = fabricated
    assert index.name == "README.md" and index.read_text().startswith(HEADER)
    (tmp_path / "NOTES.md").write_text("## A study\n\nThe commands that rebuild its store.\n")
    (tmp_path / "index.md").write_text(HEADER + "\n\nan old generated page\n")
    page = write_index(store, tmp_path).read_text()
    assert "## A study" in page and page.index("## A study") < page.index("## Cross-dataset summary")
    assert not (tmp_path / "index.md").exists()
    (tmp_path / "index.md").write_text("# written by hand\n")
    write_index(store, tmp_path)
    assert (tmp_path / "index.md").read_text() == "# written by hand\n"


def test_index_summarises_across_datasets(fabricated):
    _, _, index = fabricated
    text = index.read_text()
    rows = table_rows(text, "## Cross-dataset summary")
    header = rows.pop("defense")
    assert header == ["fashion-mnist", "synthetic", "mean over datasets"]
    summary = {defense: dict(zip(header, values)) for defense, values in rows.items()}
    # defense default variant: mean ASR over triggered attacks, mean C-ACC over all attacks (done cells)
    assert summary["none"]["synthetic"] == f"{statistics.mean([1.5, 2.5]):.2f} / {statistics.mean([97.0, 96.0, 98.0]):.2f}"
    assert summary["none"]["fashion-mnist"] == "3.00 / 89.00"
    assert summary["none"]["mean over datasets"] == f"{statistics.mean([2.0, 3.0]):.2f} / {statistics.mean([97.0, 89.0]):.2f}"
    assert summary["undefended"]["synthetic"] == (f"{statistics.mean([99.1, 98.7]):.2f} / "
                                                  f"{statistics.mean([98.5, 98.1, 99.0]):.2f}")
    assert summary["fine-pruning"]["synthetic"].startswith("no finished cell (0/3)")
    assert summary["fine-pruning"]["fashion-mnist"] == "—"
    factors = table_rows(text, "## NONE's ASR reduction factor")
    assert factors["synthetic"] == ["98.90", "2.00", f"{98.9 / 2.0:.2f}×", "2"]
    assert factors["fashion-mnist"] == ["97.00", "3.00", f"{97.0 / 3.0:.2f}×", "1"]
    pooled_u, pooled_d = statistics.mean([99.1, 98.7, 97.0]), statistics.mean([1.5, 2.5, 3.0])
    assert factors["**all datasets**"][2] == f"{pooled_u / pooled_d:.2f}×"
    assert "[synthetic/README.md](synthetic/README.md)" in text


def test_real_smoke_cell_gives_tsne_and_curves(smoke_cell, workspace, tmp_path):
    """A real badnets x undefended smoke cell put in a store: the t-SNE of the rebuilt model and its
    test curves render; the ASR printed in the table is the cell's measured one."""
    result = smoke_cell("badnets", "undefended")
    spec = CellSpec.from_json(result["spec"])
    store = ResultStore(workspace.root / f"report-{tmp_path.name}.sqlite")
    store.record_catalog(catalog_entries())  # what a run records
    stage_result = json.loads((workspace.root / spec.stage.id / "result.json").read_text())
    store.stage_running(spec.stage)
    store.stage_done(spec.stage.id, stage_result)
    store.cell_running(spec)
    store.cell_done(spec.id, result)
    report = write_report(store, "synthetic", tmp_path)
    readme = (report / "README.md").read_text()
    assert (report / "figures" / "tsne.png").is_file() and "figures/tsne.png" in readme
    with Image.open(report / "figures" / "tsne.png") as image:
        image.verify()
    assert "no finished none cell" in readme  # the focus defense, NONE by default, did not run
    # the machine that made the result is named: other CPUs give other floats for the same seed
    assert table_rows(readme, "Setup")["**CPU**"][0].startswith(cpu_name())
    row = table_rows(readme, "## Results")["undefended"][0]
    assert row.startswith(f"{result['metrics']['c_acc']:.2f} / {result['metrics']['asr']:.2f} / ")
    assert (report / "figures" / "curves.png").is_file()


def test_a_report_from_an_exported_store_draws_the_figures_its_artifacts_held(smoke_cell, workspace, tmp_path):
    """Before: ``export`` copied the results alone, so the report regenerated from a committed copy
    (reports/fidelity) on another machine lost its curves and NONE's diagnostics. The copy keeps the
    files the report reads, and a copy of the copy still has them: the same PNGs are drawn."""
    result = smoke_cell("badnets", "none")
    spec = CellSpec.from_json(result["spec"])
    store = ResultStore(workspace.root / f"export-{tmp_path.name}.sqlite")
    store.record_catalog(catalog_entries())
    store.stage_running(spec.stage)
    store.stage_done(spec.stage.id, json.loads((workspace.root / spec.stage.id / "result.json").read_text()))
    store.cell_running(spec)
    store.cell_done(spec.id, result)
    here = write_report(store, "synthetic", tmp_path / "here", tsne_figure=False)

    store.export(tmp_path / "elsewhere" / "copy.sqlite")
    ResultStore(tmp_path / "elsewhere" / "copy.sqlite").export(tmp_path / "further" / "copy.sqlite")
    copy = ResultStore(tmp_path / "further" / "copy.sqlite")
    assert not (copy.artifacts_root / spec.id).exists() and not (copy.artifacts_root / spec.stage.id).exists()
    there = write_report(copy, "synthetic", tmp_path / "there", tsne_figure=False)

    def pngs(report: Path) -> dict[str, bytes]:
        return {str(p.relative_to(report / "figures")): p.read_bytes() for p in (report / "figures").rglob("*.png")}

    drawn, redrawn = pngs(here), pngs(there)
    assert "curves.png" in drawn
    diagnostics = [name for name in drawn if name.startswith("none/")]
    assert diagnostics, "NONE drew no figures of its own for the smoke cell"
    assert sorted(redrawn) == sorted(drawn)
    for name in diagnostics:  # copied as the cell drew them
        assert redrawn[name] == drawn[name]
    assert "no none figures" not in (there / "README.md").read_text()


# --- REASR (trigger inversion) -------------------------------------------------------------------
# Bounds as fractions of the image area, and REASR % per (defense, seed) at each bound.
SCAN_BOUNDS = (0.02, 0.06, 0.1)
SCANS = {
    ("undefended", 0): (10.0, 40.0, 70.0),
    ("undefended", 1): (20.0, 50.0, 90.0),
    ("none", 0): (0.5, 2.25, 5.0),
}


def scan_details(values: tuple[float, ...]) -> dict:
    """What a scanning cell's reasr metric stores as its details (ScanResult.to_json(), the parts the report reads)."""
    reasr = {f"{b:g}": v for b, v in zip(SCAN_BOUNDS, values)}
    details = {"reasr": reasr, "best_label": {f"{b:g}": 3 for b in SCAN_BOUNDS}, "candidates": [0, 1, 2, 3],
               "seconds": 1.5}
    details.update(bounds=list(SCAN_BOUNDS), max_reasr=max(values), mean_reasr=round(statistics.mean(values), 2),
                   mask_l1={f"{b:g}": b for b in SCAN_BOUNDS})
    return details


def write_scan_tensors(directory: Path) -> None:
    """scan.safetensors as the cell saves it (ScanResult.tensors())."""
    import torch
    from safetensors.torch import save_file

    masks = torch.zeros(len(SCAN_BOUNDS), 1, 8, 8)
    masks[:, :, :2, :2] = 1.0
    tensors = {"masks": masks, "patterns": torch.rand(len(SCAN_BOUNDS), 3, 8, 8, generator=torch.Generator().manual_seed(0)),
               "bounds": torch.tensor(SCAN_BOUNDS), "per_candidate": torch.zeros(len(SCAN_BOUNDS), 4)}
    directory.mkdir(parents=True, exist_ok=True)
    save_file({"scan_" + k: v for k, v in tensors.items()}, str(directory / "scan.safetensors"))


def scanned_report(root: Path, without_artifacts: tuple[str, ...] = ()) -> Path:
    """A store with a benign row whose undefended (2 seeds) and NONE (1 seed) cells ran the scan,
    plus a badnets row without scans; the report of it (no t-SNE: no models here)."""
    store = ResultStore(root / "bench.sqlite")
    store.record_catalog(catalog_entries())  # what a run records
    stages = {}
    for attack, seed in (("benign", 0), ("benign", 1), ("badnets", 0)):
        stage = stages[(attack, seed)] = stage_of("synthetic", attack, seed)
        store.stage_running(stage)
        store.stage_done(stage.id, {"metrics": {"c_acc": 99.0, "asr": None if attack == "benign" else 99.0, "ra": None},
                                    "timings": {"total_s": 10.0}, "environment": ENV})
    unscanned = FixedCell(stages[("badnets", 0)], "undefended", {}, fixed_id="c-noscan")
    store.cell_running(unscanned)
    store.cell_done(unscanned.id, {"metrics": {"c_acc": 99.0, "asr": 99.0, "ra": 1.0, "der": 0.5}, "timings": {},
                                   "environment": ENV})
    for (defense, seed), values in SCANS.items():
        config = {} if defense == "undefended" else NONE_DEFAULT
        cell = FixedCell(stages[("benign", seed)], defense, dict(config), fixed_id=f"c-scan-{defense}-{seed}")
        store.cell_running(cell)
        store.cell_done(cell.id, {"metrics": {"c_acc": 98.0, "asr": None, "ra": None, "der": None, "reasr": max(values)},
                                  "timings": {"defense_s": 1.0, "accuracy_s": 0.1, "reasr_s": 1.5}, "environment": ENV,
                                  "measurements": {"reasr": {"key": "k", "seconds": 1.5, "details": scan_details(values)}}})
        if defense not in without_artifacts:
            write_scan_tensors(root / cell.id)
    return write_report(store, "synthetic", root / "reports", tsne_figure=False)


def assert_valid_figure(png: Path) -> None:
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.size[0] > 100 and image.size[1] > 100
    assert ET.parse(png.with_suffix(".svg")).getroot().tag.endswith("svg")


def test_reasr_table_and_figures_from_stored_scans(tmp_path):
    report = scanned_report(tmp_path)
    readme = (report / "README.md").read_text()
    assert "lower is better" in readme.split("## REASR (trigger inversion)", 1)[1].split("|", 1)[0].lower()
    rows = table_rows(readme, "## REASR (trigger inversion)")
    assert rows.pop("defense") == ["2%", "6%", "10%", "max", "mean"]
    undefended = [SCANS[("undefended", s)] for s in (0, 1)]
    per_bound = [stat([v[i] for v in undefended]) for i in range(len(SCAN_BOUNDS))]
    assert rows["undefended"] == [*per_bound, stat([max(v) for v in undefended]),
                                  stat([round(statistics.mean(v), 2) for v in undefended])]  # as stored
    none = SCANS[("none", 0)]
    assert rows["none"] == ["0.50", "2.25", "5.00", "5.00", f"{round(statistics.mean(none), 2):.2f}"]
    assert list(rows) == ["undefended", "none"]  # the main table's order; only the scanned attack row
    assert "### benign" in readme and "### badnets" not in readme
    for name in ("reasr_benign", "triggers_benign"):
        png = report / "figures" / f"{name}.png"
        assert f"(figures/{name}.png)" in readme
        assert_valid_figure(png)
    # exports: the max REASR per cell in the CSV, and its mean over seeds in the JSON summary
    with open(report / "results.csv", newline="") as handle:
        stored = {r["cell_id"]: json.loads(r["value"]) for r in csv.DictReader(handle) if r["metric"] == "reasr"}
    assert stored == {f"c-scan-{d}-{s}": max(v) for (d, s), v in SCANS.items()}
    summary = json.loads((report / "results.json").read_text())["summary"]
    record = next(r for r in summary if r["defense_label"] == "undefended" and r["attack_label"] == "benign")
    assert record["reasr"] == statistics.mean([70.0, 90.0])


def test_reasr_report_survives_missing_artifacts(tmp_path):
    report = scanned_report(tmp_path, without_artifacts=("none",))
    readme = (report / "README.md").read_text()
    rows = table_rows(readme, "## REASR (trigger inversion)")
    assert rows["none"][-2] == "5.00"  # the numbers come from the store, not the artifacts
    assert "reversed triggers of none on benign not drawn: no scan.safetensors" in readme
    assert_valid_figure(report / "figures" / "triggers_benign.png")  # the undefended row alone
    # no triggers at all: no grid, the rest of the section still there
    bare = scanned_report(tmp_path / "bare", without_artifacts=("none", "undefended"))
    text = (bare / "README.md").read_text()
    assert not (bare / "figures" / "triggers_benign.png").exists() and "triggers_benign" not in text
    assert_valid_figure(bare / "figures" / "reasr_benign.png")


def test_every_defense_has_its_own_colour_and_marker_plugins_included():
    """Before: abl and nad were drawn in the same blue, ibau and nc in near-identical light blues."""
    from matplotlib.colors import to_rgb

    from bench.registry import DEFENSES
    from bench.reporting.catalog import Catalog
    from bench.reporting.palette import defense_markers, defense_palette

    plugins = [f"plugin-{i}" for i in range(6)]
    palette = defense_palette(Catalog(defenses={name: cls.catalog() for name, cls in DEFENSES.items()}), plugins)
    markers = defense_markers(palette)
    names = DEFENSES.names() + plugins
    assert set(names) <= set(palette) and set(names) <= set(markers)
    colours = [to_rgb(palette[name]) for name in names]
    closest = min(sum((a - b) ** 2 for a, b in zip(c1, c2)) ** 0.5
                  for i, c1 in enumerate(colours) for c2 in colours[i + 1:])
    assert closest >= 0.15, f"two defenses' colours are {closest:.3f} apart in RGB"
    assert len({markers[name] for name in DEFENSES.names()}) == len(DEFENSES.names())


def test_tsne_draws_the_features_cells_stored_and_never_builds_a_model(smoke_cell, workspace, tmp_path, monkeypatch):
    """Cells store penultimate features of the same clean and triggered test images (the smoke
    profile's metric.features.samples=100 each); the report embeds those, with --focus choosing the
    defense beside the undefended model, and builds no model to do it."""
    from safetensors.torch import load_file

    results = {defense: smoke_cell("badnets", defense) for defense in ("undefended", "ft")}
    stored = {d: load_file(str(workspace.root / r["id"] / "features.safetensors")) for d, r in results.items()}
    for features in stored.values():
        assert features["features"].shape[0] == 200 and int(features["triggered"].sum()) == 100
        assert features["features"].isfinite().all()
    assert stored["undefended"]["labels"].equal(stored["ft"]["labels"])  # the same images for every cell of a stage
    assert not stored["undefended"]["features"].equal(stored["ft"]["features"])  # fine-tuning moved them
    triggered = stored["undefended"]["triggered"]
    asr = (stored["undefended"]["predicted"][triggered] == stored["undefended"]["targets"][triggered]).float().mean()
    assert abs(100 * float(asr) - results["undefended"]["metrics"]["asr"]) < 15  # a 100-image sample of the same ASR

    store = ResultStore(workspace.root / f"report-{tmp_path.name}.sqlite")
    store.record_catalog(catalog_entries())  # what a run records
    for result in results.values():
        spec = CellSpec.from_json(result["spec"])
        store.stage_running(spec.stage)
        store.stage_done(spec.stage.id, json.loads((workspace.root / spec.stage.id / "result.json").read_text()))
        store.cell_running(spec)
        store.cell_done(spec.id, result)

    def no_model(*args, **kwargs):
        raise AssertionError("the report built a model")

    monkeypatch.setattr("bench.models.base.build_model", no_model)
    report = write_report(store, "synthetic", tmp_path, focus="ft")
    readme = (report / "README.md").read_text()
    assert (report / "figures" / "tsne.png").is_file() and "t-SNE:" not in readme
    assert "**ft's ASR reduction vs undefended**" in readme
    assert "NONE's ASR reduction" not in readme


def _ranking_setup(scores: dict[str, list[float]]):
    """A setup whose defenses have these per-seed DERs on one triggered attack."""
    import pandas as pd

    from bench.reporting.collect import Setup

    rows = [{"defense": d, "defense_label": d, "attack": "badnets", "attack_label": "badnets", "attack_sort": "badnets",
             "defense_sort": d, "seed": seed, "status": "done", "der": der, "asr": 100 * (1 - der), "c_acc": 90.0,
             "undef_asr": 99.0, "primary": True} for d, values in scores.items() for seed, der in enumerate(values)]
    return Setup(key="k", label="test", cells=pd.DataFrame(rows))


def test_ranking_separates_only_what_the_seeds_support():
    """Known answer: a and c differ by less than their seed-to-seed noise, b is clearly worse than
    both (paired 95% intervals over three seeds), so a and c share ranks 1-2 and b is 3rd."""
    from bench.reporting.ranking import ranking, ranking_section, separable

    setup = _ranking_setup({"a": [0.90, 0.91, 0.92], "b": [0.50, 0.52, 0.51], "c": [0.89, 0.93, 0.90]})
    table = ranking(setup).set_index("defense")
    assert (table.loc["a", "best"], table.loc["a", "worst"]) == (1, 2)
    assert (table.loc["c", "best"], table.loc["c", "worst"]) == (1, 2)
    assert (table.loc["b", "best"], table.loc["b", "worst"]) == (3, 3)
    assert abs(table.loc["b", "der_std"] - 0.01) < 1e-9
    import pandas as pd

    assert separable(pd.Series([0.9, 0.91, 0.92]), pd.Series([0.5, 0.52, 0.51])) == 1
    assert separable(pd.Series([0.5]), pd.Series([0.9])) == 0  # one common seed: nothing is separable
    text = "\n".join(ranking_section(setup))
    assert "| 1–2 | a |" in text and "| 3 | b |" in text and "One seed cannot" not in text


def test_one_seed_says_it_cannot_rank():
    from bench.reporting.ranking import ranking_section

    text = "\n".join(ranking_section(_ranking_setup({"a": [0.9], "b": [0.5]})))
    assert "One seed cannot rank these defenses" in text and "| 1–2 | a |" in text and "| 1–2 | b |" in text


def test_reproduce_gives_one_command_per_set_of_user_fields(fabricated):
    """The default grid and the sweep run apart are two commands, not one that would multiply them."""
    _, report, _ = fabricated
    readme = (report / "README.md").read_text()
    block = readme.split("Reproduce (", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = block.strip().splitlines()
    assert len(commands) == 2, commands
    defaults, sweep = commands
    assert "-o " not in defaults and "--defenses fine-pruning,none,undefended" in defaults
    assert sweep.endswith("--defenses none --seeds 0,1 -o defense.none.max_reset_fraction=0.1"), sweep


def test_focus_defense_across_setups_puts_every_configuration_in_one_table(tmp_path):
    """Two setups of one dataset (the stage's lr 0.05 and 0.01), NONE at two reset fractions: the
    report's cross-setup table has one row per setup x configuration x attack, with the stored
    numbers as mean ± std over seeds, the same configuration label in both setups, and no row for a
    configuration a setup did not run."""
    from bench.reporting import across
    from bench.reporting.collect import load

    store = ResultStore(tmp_path / "bench.sqlite")
    store.record_catalog(catalog_entries())  # what a run records
    # (lr override, seed) -> undefended c_acc, asr; NONE cells: fraction -> (c_acc, asr, sel_asr, recall, precision)
    runs = {
        ("", 0): ((90.0, 99.0), {0.03: (89.0, 70.0, 71.0, 40.0, 80.0), 0.1: (79.0, 10.0, 11.0, 50.0, 80.0)}),
        ("", 1): ((91.0, 98.0), {0.03: (88.0, 50.0, 52.0, 20.0, 90.0), 0.1: (77.0, 20.0, 21.0, 30.0, 90.0)}),
        ("train.lr=0.01", 0): ((88.0, 97.0), {0.03: (87.0, 5.0, 4.0, 60.0, 95.0)}),
    }
    for (override, seed), ((acc, asr), nones) in runs.items():
        stage = expand(GridRequest("synthetic", "smoke", attacks=["badnets"], defenses=["undefended"], seeds=[seed],
                                   overrides=[override] if override else []))[0].stage
        store.stage_running(stage)
        store.stage_done(stage.id, {"metrics": {"c_acc": acc, "asr": asr, "ra": 1.0, "poison_rate": 10.0,
                                                "poisoned": 380}, "timings": {"total_s": 1.0}, "environment": ENV})
        for fraction, (c_acc, d_asr, sel_asr, recall, precision) in nones.items():
            cell = FixedCell(stage, "none", {"max_reset_fraction": fraction, "finetune_epochs": 0},
                             user_set={"defense": {"max_reset_fraction": fraction}},
                             fixed_id=f"c-{override or 'base'}-{seed}-{fraction}")
            store.cell_running(cell)
            store.cell_done(cell.id, {"metrics": {"c_acc": c_acc, "asr": d_asr, "ra": 1.0, "der": 0.5, "sel_asr": sel_asr,
                                                  "oracle_asr": 1.0, "sel_recall": recall, "det_precision": precision,
                                                  "det_recall": 97.0},
                                      "timings": {"defense_s": 1.0, "eval_s": 0.1}, "environment": ENV})
    data = load(store, "synthetic")
    assert len(data.setups) == 2
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in across.table(data, "none").splitlines()[2:]]
    header = across.HEADER
    table = {(row[header.index("configuration")], row[header.index("setup")].split(", ")[-1]): dict(zip(header, row))
             for row in rows}
    assert len(rows) == 3  # lr 0.01 ran one fraction only
    base = next(s.label for s in data.setups if "0.01" not in s.label).split(", ")[-1]  # train.lr=0.05
    low = table[("none (max_reset_fraction=0.03)", base)]
    assert low["ASR"] == f"{statistics.mean([70.0, 50.0]):.2f} ± {statistics.stdev([70.0, 50.0]):.2f}"
    assert low["selection ASR"] == f"{statistics.mean([71.0, 52.0]):.2f} ± {statistics.stdev([71.0, 52.0]):.2f}"
    assert low["undefended C-ACC"] == f"{statistics.mean([90.0, 91.0]):.2f} ± {statistics.stdev([90.0, 91.0]):.2f}"
    assert low["det. precision %"].startswith("85.00 ± ") and low["seeds"] == "0, 1"
    other = table[("none (max_reset_fraction=0.03)", "train.lr=0.01")]
    assert (other["ASR"], other["sel. recall %"], other["undefended ASR"], other["seeds"]) == ("5.00", "60.00", "97.00", "0")
    assert table[("none (max_reset_fraction=0.1)", base)]["C-ACC"].startswith("78.00 ± ")
    readme = (write_report(store, "synthetic", tmp_path / "reports", tsne_figure=False) / "README.md").read_text()
    assert readme.index("## NONE across setups") < readme.index("## Setup 1")
    assert across.table(load(ResultStore(tmp_path / "empty.sqlite"), "synthetic"), "none") is None


def test_published_outcomes_are_scored_per_setup_by_the_class_of_their_mean_asr(tmp_path):
    """Two models on one dataset against a reference of four outcomes. small-cnn: undefended 99/98
    (kept, as published 95.03), ft 2/10 (mean 6: removed, as 1.48), clp 90/95 (kept, as 77.56):
    3 of 3, nad's Blend outcome not run. resnet8-w16: undefended kept, ft 60/70 (partial, against
    removed): 1 of 2. Costs: each stage and cell of resnet8-w16 takes 2.5x small-cnn's; the ratio is
    taken over the kinds both finished (badnets' stage, undefended and ft cells: 3)."""
    from bench.reporting.collect import load
    from bench.reporting.published import Reference, outcome_table, score_table

    reference = tmp_path / "reference.json"
    reference.write_text(json.dumps({"name": "Leaderboard", "setting": "CIFAR-10", "outcomes": [
        {"attack": "badnets", "defense": "undefended", "asr": 95.03}, {"attack": "badnets", "defense": "ft", "asr": 1.48},
        {"attack": "badnets", "defense": "clp", "asr": 77.56}, {"attack": "blend", "defense": "nad", "asr": 97.69}]}))
    store = ResultStore(tmp_path / "bench.sqlite")
    store.record_catalog(catalog_entries())  # what a run records
    runs = {"small-cnn": {"undefended": (99.0, 98.0), "ft": (2.0, 10.0), "clp": (90.0, 95.0)},
            "resnet8-w16": {"undefended": (97.0, 99.0), "ft": (60.0, 70.0)}}
    seconds = {"small-cnn": 100.0, "resnet8-w16": 250.0}
    for model, defenses in runs.items():
        for seed in (0, 1):
            stage = expand(GridRequest("synthetic", "smoke", model=model, attacks=["badnets"], defenses=["undefended"],
                                       seeds=[seed]))[0].stage
            store.stage_running(stage)
            store.stage_done(stage.id, {"metrics": {"c_acc": 90.0, "asr": defenses["undefended"][seed], "ra": 1.0},
                                        "timings": {"total_s": seconds[model] / 2}, "environment": ENV})
            for defense, asrs in defenses.items():
                cell = FixedCell(stage, defense, {}, user_set={}, fixed_id=f"c-{model}-{defense}-{seed}")
                store.cell_running(cell)
                store.cell_done(cell.id, {"metrics": {"c_acc": 85.0, "asr": asrs[seed], "ra": 1.0, "der": 0.5},
                                          "timings": {"defense_s": seconds[model] / 4, "metrics_s": 0.0},
                                          "environment": ENV})
    data = load(store, "synthetic")
    published = Reference.load(reference)
    rows = {row[0]: row for row in ([c.strip() for c in line.strip("|").split("|")]
                                    for line in score_table(published, data).splitlines()[2:])}
    small, residual = rows["small-cnn, smoke profile"], rows["resnet8-w16, smoke profile"]
    assert (small[1], small[2], small[3]) == ("**3** / 3", "1", "2")
    assert (residual[1], residual[2]) == ("**1** / 2", "2")
    assert small[-1] == "1.00× (4)" and residual[-1] == "2.50× (3)"
    spread = statistics.mean([statistics.stdev([99.0, 98.0]), statistics.stdev([2.0, 10.0]), statistics.stdev([90.0, 95.0])])
    assert small[4] == f"{spread:.1f} (3)"
    outcomes = outcome_table(published, data)
    assert f"| badnets | ft | 1.48 (removed) | 6.00 ± {statistics.stdev([2.0, 10.0]):.2f} (removed) ✓, C-ACC -5.0 |" in outcomes
    assert "65.00 ± 7.07 (partial) ✗" in outcomes and "| blend | nad | 97.69 (kept) | — | — |" in outcomes
    readme = (write_report(store, "synthetic", tmp_path / "reports", tsne_figure=False, reference=reference)
              / "README.md").read_text()
    assert "## Against published results: Leaderboard" in readme
    index = write_index(store, tmp_path / "reports", reference=reference).read_text()
    assert "## synthetic: published outcomes reproduced (Leaderboard)" in index and "**3** / 3" in index


def test_a_bad_reference_file_is_one_line(tmp_path, capsys):
    from bench import cli

    store = ResultStore(tmp_path / "bench.sqlite")
    stage = stage_of("synthetic", "badnets", 0)
    store.cell_running(FixedCell(stage, "undefended", {}, fixed_id="c-one"))
    (tmp_path / "bad.json").write_text('{"name": "x", "outcomes": [{"attack": "badnets"}]}')
    for path, message in ((tmp_path / "bad.json", "is not a reference of published outcomes (KeyError: 'asr')"),
                          (tmp_path / "none.json", "no reference file at")):
        assert cli.main(["report", "--store", str(tmp_path / "bench.sqlite"), "--reference", str(path)]) == 2
        assert message in capsys.readouterr().err


def test_figures_come_from_the_lowest_seed_whose_artifacts_are_on_disk(tmp_path):
    """A store resumed from an exported copy holds seed 0's results without artifacts: its
    figures must come from seed 1, not be reported missing."""
    import pandas as pd

    from bench.reporting.collect import ItemFiles, figure_seed

    cells = pd.DataFrame({"id": ["c-s0", "c-s1", "c-s2"], "seed": [0, 1, 2]})
    files = ItemFiles(tmp_path)
    assert figure_seed(cells, files) == 0  # nothing on disk: the lowest seed, whose notes say so
    (tmp_path / "c-s2").mkdir()
    assert figure_seed(cells, files) == 2
    (tmp_path / "c-s1").mkdir()
    assert figure_seed(cells, files) == 1
