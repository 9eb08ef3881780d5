"""``python -m bench``: run the grid, list plugins, print results, render reports."""
from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from bench.errors import BenchError
from bench.registry import (
    ATTACKS,
    DATASETS,
    DEFENSES,
    METRICS,
    MODELS,
    PROFILES,
    load_builtin_plugins,
    load_plugin_file,
)

DEFAULT_STORE = Path("runs/bench.sqlite")

RUN_EPILOG = """\
examples:
  python -m bench run                                   # Fashion-MNIST, quick profile, every attack x defense
  python -m bench run --dataset synthetic --profile smoke --attacks badnets --defenses undefended,none
  python -m bench run --attacks badnets -o defense.none.max_reset_fraction=0.03,0.1   # a sweep: one cell per value
  python -m bench run -o train.epochs=20 -o attack.badnets.poison_rate=0.05
  python -m bench run --seeds 0,1,2 -o metric.selection.samples=0   # three seeds, no selection oracle
  python -m bench run --plugin docs/examples/spectral.py --defenses undefended,spectral   # runs the file's code
  python -m bench run --dataset synthetic --dry-run     # what would run, and what is already done

overrides (-o KEY=VALUE, repeatable; a comma list sweeps):
  attack.<attack>.<field>    fields of that attack's Config   (python -m bench list --verbose)
  defense.<defense>.<field>  fields of that defense's Config
  train.<field>              the attack stage's training recipe (epochs, lr, batch_size, optimizer, ...)
  finetune.<field>           the fine-tuning recipe defenses start from
  metric.<metric>.<field>    settings of that metric's Config (selection.samples, reasr.rows, ...);
                             one value, no sweep. Metrics are not part of a cell's identity: a new
                             setting re-measures the finished cells, never re-runs a defense

Finished cells are skipped, so the same command resumes an interrupted grid. Runners that
share a store split the grid: start the same command in a second shell (or on a second machine
with the store on a shared filesystem) and no cell is computed twice.

exit status: 0 every cell of the grid is done; 1 some cell failed (listed at the end);
2 bad input (nothing was run); 130 interrupted (finished cells are kept).
"""

REPORT_EPILOG = """\
examples:
  python -m bench report                                # every dataset in runs/bench.sqlite -> runs/reports/
  python -m bench report --dataset synthetic --focus fp --no-tsne
  python -m bench report --store runs/bench.sqlite --reports reports   # what make bench writes
  python -m bench report --reference docs/reference/backdoorbench-cifar10.json   # published outcomes reproduced?

Reports read only the store and the artifact directories beside it: tables, figures and a
Reproduce command per setup. NOTES.md beside a report's README.md is included verbatim.
"""

EXPORT_EPILOG = """\
examples:
  python -m bench export --to reports/fashion-mnist/bench.sqlite   # runs/bench.sqlite, without the models
  cp reports/fashion-mnist/bench.sqlite runs/bench.sqlite && make bench SEEDS=0,1,2   # resumes: seed 0 stays done

The copy holds every row of the store (stages, cells, catalog) and the small files a report draws
(training curves, a defense's figures, reversed triggers), but no model and no t-SNE features: it
is a few hundred KB to a few MB where the artifacts are hundreds of MB. Where the copy is resumed,
its finished cells stay done; a report drawn from it has every table and those figures, but no
t-SNE panel (draw that from the store beside the artifacts).
"""

RESULTS_EPILOG = """\
examples:
  python -m bench results                               # a table of every cell
  python -m bench results --metrics accuracy,selection  # with the selection metrics beside
  python -m bench results --dataset synthetic --format json
"""


def _split(text: str | None, option: str, valid: list[str]) -> list[str] | None:
    """A comma list; None (everything registered) when the option is absent or 'all'."""
    if text is None or text.strip() == "all":
        return None
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise BenchError(f"bad {option} {text!r}: name at least one, e.g. {option} {valid[0]} "
                         f"(omit it for all: {', '.join(valid)})")
    return names


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise BenchError(f"bad --seeds {text!r}: expected integers separated by commas, e.g. 0,1,2") from None
    if not seeds:
        raise BenchError(f"bad --seeds {text!r}: expected integers separated by commas, e.g. 0,1,2")
    return seeds


class OneLineErrors(argparse.ArgumentParser):
    """Usage mistakes as one line, like every other bad input (exit 2)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="python -m bench", description="Benchmark backdoor defenses: every attack x defense, "
                                     "the same splits and metrics, results in one SQLite store.")
    plugin_help = ("import a plugin file (attack, defense, metric, dataset or model); repeatable. "
                   "It runs the file's code, as any Python import does")
    parser.add_argument("--plugin", dest="plugins_before", action="append", default=[], metavar="FILE.py", help=plugin_help)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineErrors)

    run = commands.add_parser("run", help="run (or resume) the attack x defense grid on one dataset",
                              description="Run the attack x defense grid on one dataset, skipping finished cells.",
                              epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--dataset", default="fashion-mnist", help="registered dataset (default: fashion-mnist)")
    run.add_argument("--profile", default="quick", help="smoke | quick | standard | ... (default: quick)")
    run.add_argument("--model", default=None, help="registered model or timm:<name> (default: the profile's)")
    run.add_argument("--attacks", default=None, help="comma list (default: all registered)")
    run.add_argument("--defenses", default=None, help="comma list (default: all registered)")
    run.add_argument("--seeds", default="0", help="comma list of seeds (default: 0)")
    run.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE", help="see below")
    run.add_argument("--store", type=Path, default=DEFAULT_STORE, help=f"results store (default: {DEFAULT_STORE}); "
                     "artifacts go beside it")
    run.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    run.add_argument("--executor", default="local", choices=("local", "ray"),
                     help="local: one cell at a time here (default); ray: cells as Ray tasks")
    run.add_argument("--address", default=None, help="ray: cluster address (auto, HOST:PORT); default starts a local Ray")
    run.add_argument("--gpus-per-cell", type=float, default=None,
                     help="ray: GPUs per cell, fractions allowed (default: 1 when the cluster has GPUs, else 0)")
    run.add_argument("--artifacts", type=Path, default=None,
                     help="artifact directory (default: beside the store); on a cluster, a path every node can reach")
    run.add_argument("--scan", default=None, choices=("benign", "all", "off"),
                     help="rows whose models get the REASR trigger-inversion scan (default: benign); "
                          "the same as -o metric.reasr.rows=...")
    run.add_argument("--retry-failed", action="store_true", help="also re-run cells recorded as failed")
    run.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    run.add_argument("--dry-run", action="store_true",
                     help="expand and check the grid, print how many stages and cells it has and how many are done, "
                          "and stop (nothing is trained or written)")
    run.add_argument("--reports", type=Path, default=None,
                     help="report directory (default: reports/ beside the store, so a scratch store never "
                          "overwrites another run's report)")
    run.add_argument("--no-tsne", action="store_true", help="skip the report's t-SNE figure")
    run.add_argument("--focus", default=None, metavar="DEFENSE",
                     help="the report's focus defense: headline ASR reduction factor and t-SNE panel (default: the "
                          "defense the benchmark centres on, NONE)")

    lister = commands.add_parser("list", help="list datasets, models, attacks, defenses and profiles")
    lister.add_argument("--verbose", "-v", action="store_true", help="also show each plugin's configurable fields")
    lister.add_argument("--markdown", action="store_true", help="print the lists as markdown (README's generated section)")

    results = commands.add_parser("results", help="print every cell in the store", epilog=RESULTS_EPILOG,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    results.add_argument("--store", type=Path, default=DEFAULT_STORE)
    results.add_argument("--format", choices=("table", "csv", "json"), default="table")
    results.add_argument("--dataset", default=None)
    results.add_argument("--metrics", default="accuracy", metavar="NAMES",
                         help="the table's metrics, a comma list or 'all' (default: accuracy); csv and json hold all")

    export = commands.add_parser("export", help="copy the store's results without its artifacts, to commit or share",
                                 description="Copy the store's results without its artifacts, to commit or share; "
                                             "a run resumed from the copy keeps its finished cells. The files a "
                                             "report draws (training curves, a defense's figures, reversed "
                                             "triggers) go along, so the copy's report has them; the models and "
                                             "the t-SNE features stay behind.",
                                 epilog=EXPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_argument("--store", type=Path, default=DEFAULT_STORE, help=f"the store to copy (default: {DEFAULT_STORE})")
    export.add_argument("--to", type=Path, required=True, metavar="FILE", help="the copy (replaced when it exists)")

    report = commands.add_parser("report", help="write reports/<dataset>/ and reports/README.md from the store",
                                 epilog=REPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_argument("--store", type=Path, default=DEFAULT_STORE)
    report.add_argument("--dataset", default=None, help="one dataset (default: every dataset in the store)")
    report.add_argument("--out", "--reports", dest="out", type=Path, default=None,
                        help="report directory (default: reports/ beside the store)")
    report.add_argument("--no-tsne", action="store_true", help="skip the t-SNE figure")
    report.add_argument("--reference", type=Path, default=None, metavar="FILE.json",
                        help="score every setup against published outcomes (docs/reference/backdoorbench-cifar10.json)")
    report.add_argument("--focus", default=None, metavar="DEFENSE",
                        help="the focus defense: headline ASR reduction factor and t-SNE panel (default: the defense "
                             "the store records as the benchmark's focus, NONE)")
    for command in (run, lister, results, export, report):  # --plugin also after the command's name
        command.add_argument("--plugin", dest="plugins_after", action="append", default=[], metavar="FILE.py",
                             help=plugin_help)
    return parser


def describe(obj) -> str:
    """The description, else the docstring's first paragraph, on one line."""
    text = getattr(obj, "description", "") or (obj.__doc__ or "")
    paragraph = text.strip().split("\n\n")[0]
    return " ".join(line.strip() for line in paragraph.splitlines())


def describe_metric(metric) -> str:
    """The docstring's first paragraph (a metric's ``description`` heads its report section) and its columns."""
    paragraph = " ".join((metric.__doc__ or metric.title).strip().split("\n\n")[0].split())
    return f"{paragraph} [{', '.join(column.name for column in metric.columns) or 'no column'}]"


def plugin_sections():
    return [("datasets", DATASETS, lambda o: f"{describe(o)} [{o.info.num_classes} classes, {'x'.join(map(str, o.info.shape))}]"),
            ("models", MODELS, describe), ("attacks", ATTACKS, describe),
            ("defenses", DEFENSES, lambda o: f"({o.kind}) {describe(o)}"),
            ("metrics", METRICS, describe_metric),
            ("profiles", PROFILES, lambda o: o.description)]


def plugins_markdown() -> str:
    """The registries as markdown; README's plugin lists are this text, regenerated by `make readme`."""
    lines = []
    for title, registry, text in plugin_sections():
        lines += [f"**{title}**", ""]
        lines += [f"- `{name}`: {text(obj)}" for name, obj in registry.items()]
        if title == "models":
            lines.append("- `timm:<name>`: any timm model, untrained, with the dataset's input channels and classes")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def command_list(args) -> None:
    import dataclasses

    if args.markdown:
        print(plugins_markdown(), end="")
        return

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    for title, registry, text in plugin_sections():
        table = Table(title=title, title_justify="left", show_header=False, box=None, pad_edge=False)
        table.add_column(style="bold cyan", no_wrap=True)
        table.add_column()
        for name, obj in registry.items():
            line = escape(text(obj))  # plugin text is not rich markup: "[min–max]" must print as written
            if args.verbose and hasattr(obj, "Config") and dataclasses.is_dataclass(obj.Config):
                fields = ", ".join(f"{f.name}={_default(f)}" for f in dataclasses.fields(obj.Config))
                line += f"\n  [dim]{fields or '(no options)'}[/dim]"
            table.add_row(name, line)
        if title == "models":
            table.add_row("timm:<name>", "any timm model, untrained, with the dataset's input channels and classes")
        console.print(table)
        console.print()


def _default(field) -> str:
    import dataclasses

    if field.default is not dataclasses.MISSING:
        return repr(field.default)
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(field.default_factory())  # type: ignore[misc]
    return "?"


def command_run(args) -> None:
    from bench import progress
    from bench.grid import GridRequest
    from bench.runner import RunOptions, run_grid, summary_rows
    from bench.store import ResultStore

    request = GridRequest(dataset=args.dataset, profile=args.profile, model=args.model,
                          attacks=_split(args.attacks, "--attacks", ATTACKS.names()),
                          defenses=_split(args.defenses, "--defenses", DEFENSES.names()), seeds=_seeds(args.seeds),
                          overrides=args.override + ([f"metric.reasr.rows={args.scan}"] if args.scan else []))
    if args.focus is not None:
        DEFENSES.get(args.focus)  # a typo in --focus fails now, not after the grid
    options = RunOptions(store=args.store, device=args.device, executor=args.executor, retry_failed=args.retry_failed,
                         artifacts=args.artifacts, address=args.address, gpus_per_cell=args.gpus_per_cell,
                         plugins=list(args.plugin))
    if args.dry_run:
        from bench.runner import dry_run

        print(dry_run(request, options))
        return 0
    cells = run_grid(request, options)
    store = ResultStore(args.store)
    rows = summary_rows(cells, store)
    print_summary(rows, store.catalog())
    if not args.no_report:
        from bench.reporting import write_index, write_report

        reports = args.reports or args.store.parent / "reports"
        path = write_report(store, args.dataset, reports, tsne_figure=not args.no_tsne, focus=args.focus)
        progress.log(f"report: {path / 'README.md'}  (index: {write_index(store, reports, args.focus)})")
    progress.log(f"results: {args.store} (python -m bench results --store {args.store})")
    return closing_summary(rows, len(cells))


def closing_summary(rows: list[dict], total: int) -> int:
    """Exit status of a run: 1, with the failed cells listed, when any cell of the grid failed."""
    from bench import progress

    failed = [row for row in rows if row["status"] == "failed"]
    elsewhere = [row for row in rows if row["status"] == "running"]
    if elsewhere:
        progress.log(f"{len(elsewhere)} of {total} cells are still being computed by another runner on this store")
    if not failed:
        return 0
    progress.log(f"[red]{len(failed)} of {total} cells failed:[/red]")
    for row in failed:
        label = f"{row['dataset']}/{row['model']}/{row['attack']}/seed{row['seed']} x {_defense_label(row)}"
        progress.log(f"  {label}: {(row.get('error') or '').splitlines()[0] if row.get('error') else '?'}")
    progress.log("fix the cause, then run the same command with --retry-failed to run them again")
    return 1


def fmt(value) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def print_summary(rows: list[dict], catalog: dict, metrics: list[str] | None = None) -> None:
    """One line per cell with the columns of ``metrics`` (default: accuracy's C-ACC, ASR, RA, DER),
    named as the store's catalog records them."""
    from rich.console import Console
    from rich.table import Table

    recorded = catalog.get("metric", {})
    columns = [column for name in (metrics or ["accuracy"]) for column in recorded.get(name, {}).get("columns", [])]
    table = Table(title=" / ".join(column["display"] for column in columns), title_justify="left")
    for header in ("attack", "defense", "seed", "status", *(column["display"] for column in columns)):
        table.add_column(header)
    for row in rows:
        values = row.get("metrics") or {}
        status = row["status"] if row["status"] != "failed" else f"failed: {(row.get('error') or '').splitlines()[0][:60]}"
        table.add_row(row["attack"], _defense_label(row), str(row["seed"]), status,
                      *(fmt(values.get(column["name"])) for column in columns))
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # logs and pipes get whole lines
    console.print(table)


def _defense_label(row: dict) -> str:
    """The defense name, plus the settings its user set (-o)."""
    import dataclasses

    stored = row.get("config") or {}
    if isinstance(stored.get("user_set"), dict):  # the fields the user set, as the cell recorded them
        changed = stored["user_set"].get("defense") or {}
    else:  # a store from before they were recorded: what differs from the plugin's defaults
        config = stored.get("defense_config") or {}
        try:
            defaults = dataclasses.asdict(DEFENSES.get(row["defense"]).Config())
        except BenchError:
            defaults = {}
        changed = {k: v for k, v in config.items() if defaults.get(k, v) != v}
    return row["defense"] + ("" if not changed else " " + ",".join(f"{k}={v}" for k, v in changed.items()))


def command_results(args) -> None:
    import csv

    from bench.store import ResultStore

    store = ResultStore(args.store, create=False)
    rows = store.cells(dataset=args.dataset)
    if args.format == "json":
        json.dump(rows, sys.stdout, indent=1, default=str)
        print()
    elif args.format == "csv":
        metric_names = sorted({k for row in rows for k in (row.get("metrics") or {})})
        writer = csv.writer(sys.stdout)
        writer.writerow(["id", "dataset", "model", "attack", "defense", "seed", "profile", "status", "error", *metric_names, "config"])
        for row in rows:
            metrics = row.get("metrics") or {}
            writer.writerow([row["id"], row["dataset"], row["model"], row["attack"], row["defense"], row["seed"], row["profile"],
                             row["status"], (row.get("error") or "").splitlines()[0] if row.get("error") else "",
                             *[metrics.get(name, "") for name in metric_names], json.dumps(row["config"], sort_keys=True)])
    else:
        catalog = store.catalog()
        recorded = sorted(catalog.get("metric", {}))
        metrics = recorded if args.metrics.strip() == "all" else [m.strip() for m in args.metrics.split(",") if m.strip()]
        unknown = [name for name in metrics if name not in recorded]
        if unknown:
            raise BenchError(f"unknown metric {unknown[0]!r} in --metrics; the store records: {', '.join(recorded) or '(none)'}")
        print_summary(rows, catalog, metrics)


def command_export(args) -> None:
    from bench.store import ResultStore

    done = ResultStore(args.store, create=False).export(args.to)
    print(f"exported {done} finished cells from {args.store} to {args.to} (results and report files; models stay beside {args.store})")


def command_report(args) -> None:
    from bench import progress
    from bench.reporting import write_index, write_report
    from bench.store import ResultStore

    store = ResultStore(args.store, create=False)
    out = args.out or args.store.parent / "reports"
    datasets = [args.dataset] if args.dataset else store.datasets()
    if not datasets:
        raise BenchError(f"the store {args.store} holds no cells yet")
    known = set(DEFENSES.names()) | {cell["defense"] for cell in store.cells()}
    if args.focus is not None and args.focus not in known:
        raise BenchError(f"unknown focus defense {args.focus!r}; valid: {', '.join(sorted(known))}")
    if args.reference is not None:
        from bench.reporting.published import Reference

        Reference.load(args.reference)  # a bad file fails now, in one line, not mid-report
    for dataset in datasets:
        progress.log(f"report: {write_report(store, dataset, out, tsne_figure=not args.no_tsne, focus=args.focus, reference=args.reference)}")
    progress.log(f"index: {write_index(store, out, args.focus, args.reference)}")


def _interrupt_on_sigterm():
    """SIGTERM (a scheduler's stop, `kill`) ends a run as Ctrl-C does: the cell being computed
    is dropped with its temporary files, finished cells stay, the claims are released.
    Returns the previous handler (None when it could not be set)."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. called from a test harness thread)
        return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.plugin = list(args.plugins_before) + list(getattr(args, "plugins_after", []))
    previous = _interrupt_on_sigterm()
    try:
        return _dispatch(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _dispatch(args) -> int:
    try:
        load_builtin_plugins()
        for plugin in args.plugin:
            load_plugin_file(plugin)
        command = {"run": command_run, "list": command_list, "results": command_results,
                   "export": command_export, "report": command_report}[args.command]
        return command(args) or 0
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished cells are saved; run the same command again to resume", file=sys.stderr)
        return 130
