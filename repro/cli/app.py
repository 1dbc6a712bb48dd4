"""The `repro` commands: a thin Typer layer over data_prep, the runner, the run store and the report.

Every command turns a `UserError` into one line on stderr and exit code 2; the heavy imports (torch, pandas, FFCV,
submitit) happen inside the commands that need them, so that `repro --help` and `repro keys` start at once.
"""

from __future__ import annotations

import functools
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from data_prep.sources import SOURCES, source_names
from data_prep.prepare import PrepareOptions, prepare
from repro.config import describe_keys
from repro.errors import EXIT_BAD_INPUT, UserError
from repro.launch import resolve_options
from repro.rundir import RunDir, iter_links
from repro.scales import load_scales, scale_names
from repro.views import cli_console, show

app = typer.Typer(
    help="Reproduce the claims of the AlexNet paper (Krizhevsky, Sutskever, Hinton, 2012), claim by claim.\n\n"
    "Typical use: `repro prepare-data fashion-mnist`, `repro run all --scale demo`, `repro report`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = cli_console(stderr=True)
console = cli_console()


def friendly(fn):
    """Print a UserError as one line and exit 2; let Ctrl-C exit 130 without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            err.print(f"[bold red]error:[/] {e}", markup=True, highlight=False)
            raise typer.Exit(EXIT_BAD_INPUT)
        except KeyboardInterrupt:
            err.print("interrupted; run the same command again to resume.")
            raise typer.Exit(130)

    return wrapper


Source = Enum("Source", {name: name for name in source_names()}, type=str)  # data_prep.sources' registry
SOURCE_HELP = "Dataset format to read: " + "; ".join(f"{n}: {SOURCES[n].help}" for n in source_names()) + "."
ROOT_HELP = "Where the source lives." + "".join(f" Default for {n}: {SOURCES[n].default_root}."
                                                 for n in source_names() if SOURCES[n].default_root)
RES_HELP = ("Stored image size. Default: " + ", ".join(f"{SOURCES[n].default_res} for {n}" for n in source_names())
            + " (256: the paper's shorter side to 256 and centre 256x256 crop; the small sets keep their own size).")


Scale = Enum("Scale", {name: name for name in scale_names()}, type=str)  # the scales of experiments/_scales.toml
DEFAULT_SCALE = Scale["demo"] if "demo" in Scale.__members__ else next(iter(Scale))
SCALE_HELP = "; ".join(f"{s.name}: {s.summary}" for s in load_scales().values() if s.summary)


class WriteMode(str, Enum):
    auto = "auto"
    jpg = "jpg"
    raw = "raw"


class Launcher(str, Enum):
    local = "local"
    slurm = "slurm"


class Format(str, Enum):
    csv = "csv"
    parquet = "parquet"


class View(str, Enum):
    table = "table"
    plain = "plain"
    json = "json"


VIEW_HELP = "table: for reading (fits the terminal; prose columns shortened or left out when narrow); " \
            "plain: a header line, then one tab-separated line per row; json: an array of objects."


@app.command("prepare-data")
@friendly
def prepare_data(
    source: Source = typer.Argument(..., help=SOURCE_HELP),
    root: Optional[Path] = typer.Option(None, help=ROOT_HELP),
    out: Optional[Path] = typer.Option(None, help="Output folder for train.beton, val.beton, manifest.json. "
                                       "Default: data/<source>."),
    res: Optional[int] = typer.Option(None, min=8, help=RES_HELP),
    max_side: bool = typer.Option(False, "--max-side", help="Keep aspect ratio and cap the longer side at --res "
                                  "(as ffcv-imagenet's writer) instead of the paper's centre crop."),
    classes: Optional[str] = typer.Option(None, metavar="<N>", help="Keep N classes. N = 100 on imagenet keeps "
                                          "CMC's ImageNet-100 (Tian et al. 2019; the list ships with repro), and "
                                          "on imagefolder when all 100 of its WNIDs are class folders there; "
                                          "otherwise a random sample of N class ids drawn with --seed, kept in "
                                          "class-id order. synthetic: how many classes to generate."),
    class_list: Optional[Path] = typer.Option(None, metavar="<file>", help="Keep the classes listed in this file: "
                                              "one class id per line (WNIDs for imagenet, 0-9 for cifar10 and "
                                              "fashion-mnist), # comments allowed; labels follow the file's order."),
    train_per_class: Optional[int] = typer.Option(None, min=1, help="Cap training images per class."),
    val_per_class: Optional[int] = typer.Option(None, min=1, help="Cap validation images per class."),
    write_mode: WriteMode = typer.Option(WriteMode.auto, help="How images are stored: jpg (small files, decoded "
                                         "every epoch), raw (uncompressed pixels: about 5x the disk, no decoding, "
                                         "the fastest loader), auto: raw up to 64 px, jpg above."),
    jpeg_quality: int = typer.Option(90, min=1, max=100, help="JPEG quality where images are stored as jpg."),
    workers: int = typer.Option(0, min=0, help="Worker processes; 0 = all cores."),
    seed: int = typer.Option(0, help="Seed for the --classes sample, per-class caps, train order and synthetic "
                             "data."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if the output is up to date."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Convert a dataset into FFCV .beton files plus a manifest (counts, classes, mean, RGB PCA, hashes)."""
    opts = PrepareOptions(res=res, max_side=max_side, classes=classes,
                          class_list=None if class_list is None else str(class_list), train_per_class=train_per_class,
                          val_per_class=val_per_class, write_mode=write_mode.value, jpeg_quality=jpeg_quality,
                          workers=workers, seed=seed, force=force)
    summary = prepare(source.value, root, out or Path("data") / source.value, opts, progress=not quiet)
    console.print(summary, soft_wrap=True, markup=False)


@app.command("run")
@friendly
def run(
    experiment: str = typer.Argument(..., help="Experiment name (see `repro list`) or `all`."),
    scale: Scale = typer.Option(DEFAULT_SCALE, help=SCALE_HELP + " (experiments/_scales.toml)."),
    data: Optional[Path] = typer.Option(None, help="Folder made by `repro prepare-data`. Default: the scale's."),
    runs: Path = typer.Option(Path("runs"), help="Where run directories live."),
    seeds: Optional[int] = typer.Option(None, min=1, help="Number of seeds per variant. Default: the scale's."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key, e.g. --set train.lr=0.02 "
                                   "(repeatable; `repro keys` lists them)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the planned runs and their estimated cost; needs "
                                 "no data (without it, from the scale's nominal dataset sizes)."),
    view: View = typer.Option(View.table, "--format", help="How --dry-run prints its plan. " + VIEW_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    launcher: Launcher = typer.Option(Launcher.local, help="local: on this machine (see --parallel); slurm: one "
                                      "Slurm job per run, submitted with submitit.", rich_help_panel="Launching"),
    parallel: Optional[int] = typer.Option(None, min=1, help="local: runs at once, each in its own process with "
                                           "its own GPU or share of the cores. Default 1: in this process.",
                                           rich_help_panel="Launching"),
    partition: Optional[str] = typer.Option(None, help="slurm: partition.", rich_help_panel="Launching"),
    account: Optional[str] = typer.Option(None, help="slurm: account.", rich_help_panel="Launching"),
    gpus_per_run: Optional[int] = typer.Option(None, min=0, help="slurm: GPUs per run, one DDP task each "
                                               "(default 1; 0: train on CPUs, smoke and demo scale only).",
                                               rich_help_panel="Launching"),
    cpus_per_gpu: Optional[int] = typer.Option(None, min=1, help="slurm: CPU cores per GPU, for its loader "
                                               "(default 8).", rich_help_panel="Launching"),
    mem_per_gpu: Optional[str] = typer.Option(None, help="slurm: memory per GPU, e.g. 32G (the default).",
                                              rich_help_panel="Launching"),
    tasks_per_run: Optional[int] = typer.Option(None, min=1, help="slurm: DDP tasks per run (default: one per GPU, "
                                                "or 1; on CPUs they train on gloo).", rich_help_panel="Launching"),
    cpus_per_task: Optional[int] = typer.Option(None, min=1, help="slurm: CPU cores per task (CPU-only runs; "
                                                "with GPUs it replaces --cpus-per-gpu).",
                                                rich_help_panel="Launching"),
    nodes: Optional[int] = typer.Option(None, min=1, help="slurm: nodes per run.", rich_help_panel="Launching"),
    time: Optional[str] = typer.Option(None, help="slurm: time limit per job, HH:MM:SS (default 04:00:00); a run "
                                       "that needs longer checkpoints and requeues itself.", rich_help_panel="Launching"),
    slurm_: list[str] = typer.Option([], "--slurm", help="slurm: any other sbatch option as key=value, e.g. "
                                     "--slurm qos=high (repeatable).", rich_help_panel="Launching"),
    launcher_config: Optional[Path] = typer.Option(None, help="TOML file with repeated launcher settings: "
                                                   "partition, account, time, setup = [\"module load ...\"], "
                                                   "a slurm table of sbatch options.", rich_help_panel="Launching"),
    wait: bool = typer.Option(False, "--wait", help="slurm: wait for the jobs, show progress, run the analyses; "
                              "exit 1 if any failed.", rich_help_panel="Launching"),
):
    """Run one experiment (every variant and seed), reusing finished runs and resuming interrupted ones."""
    from repro.runner import run_experiments

    launch = None
    if not dry_run:
        launch = resolve_options(launcher.value, config_file=launcher_config, slurm_sets=slurm_, parallel=parallel,
                                 partition=partition, account=account, gpus_per_run=gpus_per_run,
                                 tasks_per_run=tasks_per_run, cpus_per_task=cpus_per_task, nodes=nodes, time=time,
                                 cpus_per_gpu=cpus_per_gpu, mem_per_gpu=mem_per_gpu, wait=wait)
    code = run_experiments(experiment, scale.value, data_dir=data, runs_dir=runs, seeds=seeds, sets=set_,
                           dry_run=dry_run, progress=not quiet, console=console, launch=launch, fmt=view.value)
    raise typer.Exit(code)


@app.command("cancel")
@friendly
def cancel(
    experiment: str = typer.Argument(..., help="Experiment name or `all`: cancel the Slurm jobs of its runs."),
    runs: Path = typer.Option(Path("runs"), help="Where run directories live."),
):
    """Cancel the queued and running Slurm jobs that `repro run --launcher slurm` submitted for an experiment."""
    from repro.launch.slurm import cancel as cancel_jobs

    dirs = [RunDir(p) for p in sorted({link.resolve() for exp, _, _, _, link in iter_links(runs)
                                       if experiment in ("all", exp)})]
    if not dirs:
        raise UserError(f"{runs}: no runs of {experiment!r}; `repro status --runs {runs}` lists what there is")
    cancel_jobs(dirs, console)


@app.command("list")
@friendly
def list_(
    runs: Path = typer.Option(Path("runs"), help="Where run directories live."),
    scale: Scale = typer.Option(DEFAULT_SCALE, help="Count done runs at this scale."),
    view: View = typer.Option(View.table, "--format", help=VIEW_HELP),
):
    """Table of registered experiments: section, claim, paper number, runs done."""
    from repro.cli.rows import LIST_COLUMNS, list_rows

    show(console, list_rows(runs, scale.value), LIST_COLUMNS, view.value,
         title=f"experiments (runs done at scale {scale.value})")


@app.command("status")
@friendly
def status(
    runs: Path = typer.Option(Path("runs"), help="Where run directories live."),
    view: View = typer.Option(View.table, "--format", help=VIEW_HELP),
    watch: bool = typer.Option(False, "--watch", help="A live table of the runs training now (where, epoch and "
                               "step, img/s, time left, latest errors), refreshed until Ctrl-C; reads only the run "
                               "folders, so it works alike for the local pool and Slurm, from any machine."),
    interval: float = typer.Option(5.0, min=0.5, help="--watch: seconds between refreshes."),
):
    """What ran, what is running, what failed and why."""
    if watch:
        from repro.cli.watch import watch as watch_runs

        watch_runs(runs, console, interval)
        return
    from repro.cli.rows import STATUS_COLUMNS, status_caption, status_rows

    rows = status_rows(runs)
    show(console, rows, STATUS_COLUMNS, view.value, title=f"runs under {runs}", caption=status_caption(rows))


@app.command("results")
@friendly
def results(
    runs: Path = typer.Option(Path("runs"), help="Where run directories live."),
    output: Path = typer.Option(Path("reports/results.csv"), "--out", help="Table to write."),
    format: Format = typer.Option(Format.csv, help="csv or parquet (parquet needs pyarrow)."),
):
    """Write every run's final numbers as one table (one row per run, config columns flattened)."""
    from repro.runs import write_results

    path = write_results(runs, output, format.value)
    console.print(f"wrote {path}")


@app.command("report")
@friendly
def report(
    runs: Path = typer.Option(Path("runs"), help="Where run directories live."),
    output: Path = typer.Option(Path("reports/index.html"), "--out", help="HTML page to write."),
):
    """Render one self-contained HTML page comparing every claim with the paper."""
    from repro.report import build_report

    path = build_report(runs, output)
    console.print(f"wrote {path}")


@app.command("evaluate")
@friendly
def evaluate_weights(
    weights: Path = typer.Option(..., "--weights", help="torchvision's AlexNet state dict (e.g. "
                                 "alexnet-owt-7be5be79.pth, which you download), a repro checkpoint (inside its "
                                 "run folder) or a run folder."),
    data: Optional[Path] = typer.Option(None, help="Folder made by `repro prepare-data` whose val split is scored. "
                                        "Default: the run's data folder; data/imagenet for torchvision's weights."),
    output: Optional[Path] = typer.Option(None, "--out", help="Also write the numbers as JSON to this file."),
    ten_crop: bool = typer.Option(True, "--ten-crop/--no-ten-crop", help="Also score ten crops (corners, centre "
                                  "and their mirror images, softmax averaged): ten times the forward passes."),
    batch_size: int = typer.Option(128, min=1, help="Images per batch."),
    device: str = typer.Option("auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1, ..."),
    backend: str = typer.Option("auto", help="Loader: auto, ffcv, torch or nvjpeg (as data.backend)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Score weights on a prepared val split: centre-crop and ten-crop top-1/top-5 error, through the harness's own
    evaluation path (torchvision's weights with torchvision's preprocessing; published 56.522 / 79.066 accuracy)."""
    from repro.engine.weights import COLUMNS, check_output, read_weights, result_rows, result_title, score, \
        write_result

    check_output(output)
    result = score(read_weights(weights), data, ten_crop=ten_crop, batch_size=batch_size, device=device,
                   backend=backend, progress=not quiet)
    show(console, result_rows(result), COLUMNS, "table", title=result_title(result))
    for note in result["notes"]:
        err.print(f"note: {note}", markup=False, highlight=False)
    if output is not None:
        console.print(f"wrote {write_result(output, result)}", markup=False)


@app.command("models")
@friendly
def models():
    """Registered models with parameter counts and multiply-adds at their default input."""
    from repro.models import models_table

    console.print(models_table())


@app.command("keys")
def keys():
    """Every config key that --set and experiment files accept, with its default."""
    console.print(describe_keys(), markup=False)


@app.command("bench")
@friendly
def bench(
    output: Path = typer.Option(Path("benchmarks/RESULTS.md"), "--out", help="Markdown file to write (each device "
                                "writes its own section of it)."),
    quick: bool = typer.Option(False, "--quick", help="Fewer images per measurement."),
    device: str = typer.Option("cpu", "--device", help="cpu: loaders, training and preparation against plain "
                               "baselines; cuda: the GPU rows (model-bound, end to end per backend, 90-epoch "
                               "projection)."),
):
    """Measure loader, training and preparation speed, each as a ratio against a plain baseline."""
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device {device!r}: use cpu or cuda")
    if device == "cuda":
        from repro.bench.gpu import run_gpu_bench as run
    else:
        from repro.bench.cpu import run_bench as run
    path = run(output, quick=quick, console=console)
    console.print(f"wrote {path}")


@app.command("bundle")
@friendly
def bundle(
    experiment: str = typer.Argument(..., help="Experiment name (see `repro list`) or `all`."),
    output: Path = typer.Option(..., "--out", help="The .tar.gz file to write (written whole or not at all)."),
    runs: Path = typer.Option(Path("runs"), help="Where run directories live."),
    with_weights: bool = typer.Option(False, "--with-weights", help="Also pack each run's latest checkpoint."),
):
    """Pack the finished runs of an experiment (records, curves, analyses; no code) for `repro import` elsewhere."""
    from repro.bundle import pack

    manifest = pack(runs, experiment, output, with_weights=with_weights)
    console.print(f"wrote {output}: {len(manifest['runs'])} run(s), {len(manifest['analyses'])} analysis file set(s), "
                  f"{len(manifest['files'])} files", markup=False)


@app.command("import")
@friendly
def import_(
    bundles: list[Path] = typer.Argument(..., help="Bundles written by `repro bundle`."),
    runs: Path = typer.Option(Path("runs"), help="Where run directories live."),
    max_file_size: str = typer.Option("2G", help="Refuse a bundle holding a file larger than this (bytes, or with "
                                      "K, M or G)."),
):
    """Merge bundles into the run store: every file checked first; a local result is never overwritten."""
    from repro.bundle import parse_size
    from repro.bundle_merge import import_bundles

    for line in import_bundles(bundles, runs, max_file=parse_size(max_file_size)):
        console.print(line, markup=False)
