"""The command line: `ensemble-kd <command> [CONFIG] [key=value ...]`.

Parses, validates, calls pipeline.py, prints. Every failure a user can fix ends
in one line on stderr that says what to fix, and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib.metadata
import json
import os
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from . import pipeline, sweep
from .config import Config, ConfigError, load_config
from . import distributed
from .engine import CheckpointError, NonFiniteLossError, load_model, tracking
from .engine.checkpoint import os_error, trained_data
from .engine.run_dir import (ACCEPT_LISTING, RESUME_SAFE, RunDirError, check_command, check_listing, check_resumable,
                             claim_run_dir, data_listing, recorded_command, saved_config)
from .engine.runs import MetricsLog, write_config
from .ensemble import MANIFEST, TeacherSet
from .ensemble.cache import describe_kept, open_cache
from .export import FORMATS, TOLERANCE, export_run
from .progress import ImagesPerSecond, LineProgress
from .report import (MARK, TEMPERATURE_NOTE, accuracy_vs_cost, load_results, print_table, reliability_diagram,
                     teacher_weights_over_training, write_results)

DEMO_METHODS = "ce,aver,aekd,meal,ensemblenet,latentbe"
DEMO_COLUMNS = ["name", "acc", "nll", "ece", "cnll", "cece", "params", "macs", "train_time_s"]
EVAL_COLUMNS = ["name", "acc", "gap", "map", "hit1", "top5", "nll", "ece", "cnll", "cece", "brier", "corr_acc",
                "corr_nll", "corr_ece", "ood_auroc_maxprob", "ood_auroc_entropy", "params", "macs",
                "latency_ms", "throughput"]
# EnsembleNet's tables count parameters with batch norm folded and FLOPs as 2·MACs (tensorflow.profiler)
ENSEMBLENET_COLUMNS = [c for col in EVAL_COLUMNS for c in
                       {"params": ("params", "params_bn_folded"), "macs": ("macs", "flops")}.get(col, (col,))]

# Wide enough for the results table when the output is a file or a CI log.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 120)


def progress_bar() -> Progress | LineProgress:
    if not err.is_terminal:
        return LineProgress(err)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), ImagesPerSecond(), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=err, transient=False)


# ---------------------------------------------------------------------- commands

def cmd_demo(args) -> None:
    config = _config(args)  # --resume reads the run's config.yaml
    started = time.perf_counter()
    methods = _demo_methods(args)
    data = pipeline.prepare_data(config)
    listing = _listing(args, data)
    _demo_threads(data.device)
    for method in methods:  # a bad name or option fails before any training
        pipeline.method_from(config, method, several=True)
    pipeline.check_models(config, data)
    shapes = pipeline.untrained_teachers(config, data)  # what the options ask of the models, checked on these
    for method in methods:
        pipeline.prepare_distill(pipeline.student_config(config, method), data, shapes)
    with _claim(config, "demo", args) as run_dir:
        _demo(config, data, methods, run_dir, args, started, listing)


def _demo(config, data, methods, run_dir: Path, args, started: float, listing) -> None:
    err.print(f"demo: {config.data.name}, {len(config.teachers.resolved_members())} teachers, students: "
              f"{', '.join(methods)}; run directory {run_dir}", highlight=False)
    teacher_dir = run_dir / pipeline.TEACHERS_DIR
    write_config(run_dir, config, f"demo --methods {','.join(methods)}", listing)  # what --resume reads back
    write_config(teacher_dir, config, "train-teachers", listing)
    students = []
    with progress_bar() as progress:
        teachers = pipeline.train_teachers(config, teacher_dir, resume=args.resume is not None,
                                           progress=progress, data=data)
        fast = pipeline.fast_teachers(config, teachers)
        cached = _demo_cache(config, data, fast, run_dir / "cache", progress)
        for method in methods:  # every student learns from the same teachers: cached logits where they do
            student_config = pipeline.student_config(config, method)  # each student its own method's options
            out_dir = run_dir / (pipeline.STUDENT_DIR if method == "ce" else f"student-{method}")
            write_config(out_dir, student_config, "distill", listing)
            needs = pipeline.method_from(student_config).needs
            source = cached if _servable(cached, needs) and config.perturb.kind == "none" else fast
            student, info = pipeline.distill(student_config, out_dir, resume=args.resume is not None,
                                             progress=progress, data=data, teachers=source)
            students.append((student_config, student, info))
    if not distributed.world().is_main:
        return  # rank 0 evaluates and reports
    rows = pipeline.evaluate_teachers(config, teachers, data, teacher_dir)
    rows += [row for c, student, info in students for row in pipeline.evaluate_student(c, student, data, info)]
    _finish(run_dir, rows, f"ensemble-kd demo on {config.data.name} ({time.perf_counter() - started:.0f} s)",
            DEMO_COLUMNS)


def _demo_methods(args) -> list[str]:
    """--methods, part of the run: a resumed demo trains the students it was started with."""
    given = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods is not None else None
    made = recorded_command(args.resume) if args.resume is not None else []
    if "--methods" not in made[:-1]:  # a new demo (or one that recorded none)
        return given if given is not None else DEMO_METHODS.split(",")
    recorded = made[made.index("--methods") + 1].split(",")
    if given is not None and given != recorded:
        raise RunDirError(f"cannot resume '{args.resume}' with --methods {','.join(given)}: it was started with "
                          f"--methods {','.join(recorded)}; resume it without --methods, or start a new demo")
    return recorded


def _demo_threads(device) -> None:
    """One PyTorch thread for the demo on the CPU unless OMP_NUM_THREADS says otherwise: its 8x8 images
    are too small to share between cores. Two threads took 1.6x the CPU time for a 10% shorter run on a
    quiet 2-core machine, and over 4x the wall time on a busy one (each waits for the other to be
    scheduled). One thread also gives the same table on any number of cores. main() restores the count."""
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


def _demo_cache(config, data, teachers, cache_dir: Path, progress):
    """The teachers' logits on the students' training views, computed once for every student that
    needs nothing else (kd, aver, aekd logits, latentbe): the engine's teacher cache at work."""
    if not (cache_dir / "cache.json").is_file():
        epochs = config.cache.model_copy(update={"epochs": config.student.train.epochs})
        pipeline.cache_teachers(config.model_copy(update={"cache": epochs}), cache_dir, progress=progress,
                                data=data, teachers=teachers)
    return open_cache(cache_dir, teachers, data.train_loader(config.data, config.student.seed), data.device,
                      dataset=config.data.name)


def _servable(cached, needs) -> bool:
    try:
        cached.check(needs)
    except ValueError:
        return False
    return True


def cmd_train_teachers(args) -> None:
    config = _config(args)
    data = pipeline.prepare_data(config)
    listing = _listing(args, data)
    pipeline.check_models(config, data, student=False)
    with _claim(config, "teachers", args) as run_dir:
        write_config(run_dir, config, "train-teachers", listing)
        with progress_bar() as progress:
            teachers = pipeline.train_teachers(config, run_dir, resume=args.resume is not None,
                                               progress=progress, data=data)
        if not distributed.world().is_main:
            return
        rows = pipeline.evaluate_teachers(config, teachers, data, run_dir)
        _finish(run_dir, rows, f"teachers on {config.data.name}", EVAL_COLUMNS)


def cmd_distill(args) -> None:
    config = _config(args)
    data = pipeline.prepare_data(config)
    listing = _listing(args, data)
    pipeline.check_models(config, data, teachers=False)
    method, teachers = pipeline.prepare_distill(config, data)  # bad options or teachers fail before any work
    with _claim(config, f"distill-{config.method.name}", args) as run_dir:
        write_config(run_dir, config, "distill", listing)
        with progress_bar() as progress:
            student, info = pipeline.distill(config, run_dir, resume=args.resume is not None, progress=progress,
                                             data=data, teachers=teachers, method=method)
        if not distributed.world().is_main:
            return
        _finish(run_dir, pipeline.evaluate_student(config, student, data, info),
                f"{pipeline.student_row_name(config)} on {config.data.name}", _eval_columns(config))


def cmd_cache_teachers(args) -> None:
    config = _config(args)  # --resume DIR: DIR's config.yaml, and DIR itself as cache.dir
    where = args.resume or config.cache.dir
    made = [] if where is None else recorded_command(where)[:1] or (
        ["train-teachers"] if (Path(where) / MANIFEST).is_file() else [])  # a teacher set written by hand too
    if made and made != ["cache-teachers"]:  # a cache resumes in place: never inside another command's run
        raise ConfigError(f"cache.dir '{where}' holds a {made[0]} run; choose another cache.dir for the cache")
    data = pipeline.prepare_data(config)
    listing = _listing(args, data)
    teachers = pipeline.load_teachers(config, data)  # checked before anything is written
    if where is not None and args.resume is None:  # the cache's directory is cache.dir, not run.dir/run.name
        where = Path(where)
        config = config.model_copy(update={"run": config.run.model_copy(update={"dir": str(where.parent),
                                                                                "name": where.name})})
    # a cache resumes or rebuilds itself in place (its manifest says for what): locked, not refused
    with _claim(config, "cache", args, reentrant=True, key="cache.dir") as out_dir:
        write_config(out_dir, config, "cache-teachers", listing)
        with progress_bar() as progress:
            report = (lambda line: err.print(line, highlight=False)) if distributed.world().is_main else None
            path = pipeline.cache_teachers(config, out_dir, progress=progress, data=data, teachers=teachers,
                                           report=report)
    if not distributed.world().is_main:
        return
    out.print(f"teacher cache: {path}", highlight=False, soft_wrap=True)
    err.print(f"use it with: ensemble-kd distill CONFIG teachers.cache={escape(str(path))}", highlight=False)


def cmd_sweep(args) -> None:
    config = _config(args, allowed=RESUME_SAFE + ("sweep.*",))  # each of its runs is checked on its own
    data = pipeline.prepare_data(config)
    listing = _listing(args, data)
    only = [v.strip() for v in args.only.split(",")] if args.only else None
    checked = set()
    for name, _, variant in sweep.variant_configs(config):  # every variant validated before any training
        pipeline.method_from(variant)
        pipeline.check_models(variant, data, teachers=False)
        if name not in checked:  # its options against the models, once: the seeds differ in student.seed alone
            checked.add(name)
            try:
                pipeline.prepare_distill(variant, data)
            except ConfigError as err:
                raise ConfigError(f"sweep variant '{name}': {err}") from None
    named = args.resume or (Path(config.run.dir) / config.run.name if config.run.name else None)
    if named is not None:  # a changed run is refused before anything is written
        sweep.plan_runs(config, Path(named), only=only, overwrite=args.overwrite, listing=listing,
                        accept=args.accept_changed_data)
    with _claim(config, "sweep", args, shared=True) as run_dir:
        write_config(run_dir, config, "sweep", listing)
        with progress_bar() as progress:
            rows = sweep.run_sweep(config, run_dir, progress=progress, data=data, only=only,
                                   overwrite=args.overwrite, listing=listing, accept=args.accept_changed_data)
    if not distributed.world().is_main:
        return
    if config.teachers.source:  # the teachers beside their students
        rows = [r for r in _teacher_rows(config, data, run_dir) if not r["name"].startswith("majority")] + rows
    columns = _eval_columns(*(variant for _, _, variant in sweep.variant_configs(config)))
    _finish(run_dir, rows, f"sweep on {config.data.name}", columns + ["train_time_s"])


def _teacher_rows(config, data, run_dir: Path) -> list[dict]:
    """The source run's own rows when they answer this sweep's questions; else the teachers it uses
    (teachers.take of them) evaluated with this sweep's eval section, once (kept in run_dir/teachers)."""
    source = Path(config.teachers.source)
    plain = config.teachers.take is None and not config.eval.corruptions and not config.eval.ood
    if plain and (source / "results.json").is_file():
        return load_results(source)
    kept = run_dir / pipeline.TEACHERS_DIR
    if not (kept / "results.json").is_file():
        teachers = TeacherSet.from_run(source, device=data.device, take=config.teachers.take)
        write_results(kept, pipeline.evaluate_teachers(config, teachers, data, source))
    return load_results(kept)


def cmd_evaluate(args) -> None:
    target = Path(args.target)
    if not target.exists():
        raise FileNotFoundError(f"'{target}' does not exist; pass a run directory or a checkpoint file")
    # A checkpoint's results go beside it under its own name, never over its run's results.
    out_dir = Path(args.out) if args.out else (target if target.is_dir() else target.parent / f"{target.stem}-eval")
    if out_dir.resolve() != target.resolve():
        _check_out(out_dir)
    run_dir = target if target.is_dir() else target.parent
    if args.config is not None:
        config = load_config(args.config, args.overrides)
    elif (run_dir / "config.yaml").is_file():
        config = saved_config(run_dir, args.overrides)
    else:
        config = load_config(None, args.overrides)  # a bare checkpoint: the config names the data
    data = pipeline.prepare_data(config)
    if target.is_dir() and (target / MANIFEST).is_file():
        teachers = TeacherSet.from_run(target, device=data.device)
        pipeline.check_class_counts(teachers, data)
        pipeline.check_teacher_data(config, teachers, data)
        rows = pipeline.evaluate_teachers(config, teachers, data, target)
    else:
        path = target / "model.pt" if target.is_dir() else target
        if not path.is_file():
            raise FileNotFoundError(f"'{target}' holds neither {MANIFEST} nor model.pt: nothing to evaluate")
        pipeline.check_trained_data(config, f"'{path}'", trained_data(path), data)
        model = load_model(path, map_location=data.device)
        if model.spec["num_classes"] != data.splits.num_classes:
            raise ConfigError(f"'{path}' predicts {model.spec['num_classes']} classes but dataset "
                              f"'{data.splits.name}' has {data.splits.num_classes}; set data.name to its dataset")
        if target.is_dir() and (target / "config.yaml").is_file():  # a student run: its rows (collapsed too)
            rows = pipeline.evaluate_student(config, model, data)
        else:
            rows = [pipeline.evaluate_model_row(path, model, config, data)]
    _finish(out_dir, rows, f"evaluate {target}", EVAL_COLUMNS)


def cmd_export(args) -> None:
    """The deployable student of a distill run as one file, checked against PyTorch before it is written."""
    done = export_run(Path(args.run), args.format, args.out, tolerance=args.tolerance, latency=args.latency)
    check, student = done.check, done.student
    out.print(f"exported {student.file} ({student.config.method.name}: {student.model.spec['name']}) to {done.out}",
              highlight=False, soft_wrap=True)
    out.print(f"check on {check.inputs}: max |{args.format} - PyTorch| = {check.max_abs_diff:.3g}, tolerance "
              f"{check.tolerance:.3g}: pass", highlight=False, soft_wrap=True)
    if done.latency:
        out.print("batch-1 latency: " + ", ".join(f"{name} {ms:.3g} ms (IQR {iqr:.2g})"
                                                  for name, (ms, iqr) in done.latency.items()), highlight=False)


def cmd_models(args) -> None:
    """What `arch:` can name, one section per source; a library that is not installed says so."""
    from .models import models_by_source
    from .models.external import INSTALL

    for source, names in models_by_source(args.pattern).items():
        if not names and source != "ensemble-kd" and not _installed(source):
            out.print(f"{source}: not installed ({INSTALL})", highlight=False)
            continue
        out.print(f"{source} ({len(names)}):", highlight=False)
        for name in names:
            out.print(f"  {name}", highlight=False)


def cmd_reproduce(args) -> None:
    """No NAME: the papers' experiments listed. NAME: run it (or --dry-run: build and show it)."""
    from . import reproduce
    from .reproduce import run as reproduce_run, show

    if args.name is None:
        for line in show.listing(list(reproduce.ENTRIES.values())):
            out.print(line, highlight=False, markup=False, soft_wrap=True)
        return
    if "=" in args.name:
        raise ConfigError(f"'{args.name}' is an override: give the reproduction's NAME first "
                          f"(`ensemble-kd reproduce` lists them)")
    entry = reproduce.find(args.name)
    config = load_config(entry.config_path, args.overrides)
    if args.dry_run:
        num_classes, shape = entry.num_classes, entry.input_shape
        paper_data = config.data.name == load_config(entry.config_path).data.name
        if not paper_data:  # another dataset: its own sizes
            data = pipeline.prepare_data(config)
            num_classes, shape = data.splits.num_classes, _input_shape(data.splits)
        for line in show.dry_run(entry, config, num_classes, shape, reproduce_run.run_dir_of(entry, config),
                                 paper_data):
            out.print(line, highlight=False, markup=False, soft_wrap=True)
        return
    distributed.init_from_env(config.device)
    _RUNNING["again"] = (f"interrupted: the last checkpoint is saved; the same command continues it in "
                         f"{reproduce_run.run_dir_of(entry, config)}")
    with progress_bar() as progress:
        only = [v.strip() for v in args.only.split(",")] if args.only else None
        outcome = reproduce_run.reproduce(entry, config, only=only, overwrite=args.overwrite, cache=args.cache,
                                          progress=progress,
                                          report=lambda line: err.print(line, highlight=False))
    if not distributed.world().is_main:
        return
    lines = show.paper_table(entry, outcome.rows, outcome.budget)
    for line in lines:
        out.print(line, highlight=False, markup=False, soft_wrap=True)
    (outcome.run_dir / "reproduce.md").write_text("\n".join(lines) + "\n")
    (outcome.run_dir / "reproduce.json").write_text(json.dumps({"entry": entry.name, "cells": outcome.rows,
                                                                "budget_differs": outcome.budget}, indent=2))
    if (tracker := tracking.active()) is not None:  # logging.tensorboard / logging.mlflow
        tracker.log_table(outcome.run_dir, outcome.rows, "\n".join(lines) + "\n")
    err.print(f"results: {outcome.run_dir / 'reproduce.md'}", highlight=False)


def _input_shape(splits) -> tuple[int, ...]:
    size = getattr(splits, "image_size", None)
    if size is None:  # video: frames x features
        return (splits.max_frames if hasattr(splits, "max_frames") else 30, splits.in_channels)
    return (splits.in_channels, *size)


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _check_out(out_dir: Path) -> None:
    """--out never names a run directory: its results.md and results.json are the run's own."""
    made = recorded_command(out_dir)[:1]
    if made:
        raise ConfigError(f"--out '{out_dir}' holds a {made[0]} run, whose results.md and results.json are its "
                          f"own; choose another --out directory")


def cmd_compare(args) -> None:
    rows = []
    for run in args.runs:
        run = Path(run)
        for row in load_results(run):
            rows.append({**row, "name": f"{run.name}: {row['name']}" if len(args.runs) > 1 else row["name"]})
    out_dir = Path(args.out) if args.out else Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    _check_out(out_dir)
    _finish(out_dir, rows, "compare", EVAL_COLUMNS + ["train_time_s"])
    weights = _weight_logs([Path(r) for r in args.runs])
    if weights:  # AE-KD's teacher weights over training, one panel per run
        teacher_weights_over_training(weights, out_dir / "teacher_weights.png")


def _weight_logs(runs: list[Path]) -> dict[str, list[dict]]:
    logs = {}
    for run in runs:
        for path in sorted([run / "metrics.jsonl", *run.glob("*/metrics.jsonl"), *run.glob("*/*/metrics.jsonl")]):
            records = MetricsLog(path).read() if path.is_file() else []
            if any(k.startswith("alpha_") for r in records for k in r):
                logs[str(path.parent.relative_to(run.parent))] = records
    return logs


# ---------------------------------------------------------------------- helpers

def _config(args, resume: bool = True, allowed: tuple[str, ...] = RESUME_SAFE) -> Config:
    """The run's config; under torchrun, joining the process group on the config's device.

    With --resume: the run's config.yaml plus the overrides, or CONFIG plus the overrides when one
    is given; either way it may differ from the run's only in keys that cannot change the result.
    """
    if resume and args.resume is not None:
        run = Path(args.resume)
        if not run.is_dir():
            raise FileNotFoundError(f"cannot resume '{run}': no such run directory")
        check_command(run, args.command)  # before its config is read: another command's may not even load
        config = load_config(args.config, args.overrides) if args.config else saved_config(run, args.overrides)
        check_resumable(run, config, allowed)
    else:
        config = load_config(args.config, args.overrides)  # no CONFIG: the defaults (the demo's setup)
    distributed.init_from_env(config.device)
    return config


def _listing(args, data) -> dict | None:
    """The streamed training listing, as the run records it; a resumed run's must be the one it recorded."""
    listing = data_listing(data.splits.train)
    if getattr(args, "resume", None) is not None:
        check_listing(Path(args.resume), listing, args.accept_changed_data)
    return listing


_RUNNING: dict = {}  # the run directory in use, for the message after Ctrl-C


@contextlib.contextmanager
def _claim(config: Config, command: str, args, shared: bool = False, reentrant: bool = False,
           key: str = "run.name"):
    with claim_run_dir(config, command, resume=args.resume, overwrite=args.overwrite, shared=shared,
                       reentrant=reentrant, key=key) as run_dir:
        _RUNNING["dir"] = run_dir
        yield run_dir


def _eval_columns(*configs) -> list[str]:
    """The printed columns of runs: with an EnsembleNet among them, its paper's cost conventions too."""
    return ENSEMBLENET_COLUMNS if any(c.method.name == "ensemblenet" for c in configs) else EVAL_COLUMNS


def _finish(run_dir: Path, rows: list[dict], title: str, columns: list[str]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    shown = [c for c in columns if any(c in r for r in rows)]
    print_table(rows, shown, title, console=out)
    busy = [r["name"] for r in rows if r.get("latency_ms_iqr", 0) > 0.5 * r.get("latency_ms", float("inf"))]
    if busy:  # a busy machine: one forward pass waits for a descheduled thread now and then
        err.print(f"latency varies widely between repeats (interquartile range over half the median) for "
                  f"{', '.join(busy)}: the machine is busy; measure latency on a quiet one", highlight=False)
    bounded = [r["name"] for r in rows if r.get("temperature_at_bound") is True]
    if bounded:  # the table marks their cells; said here too, where a log reader sees it
        err.print(f"{', '.join(bounded)}: {TEMPERATURE_NOTE} (marked {MARK} in the table)", highlight=False,
                  markup=False, soft_wrap=True)
    write_results(run_dir, rows)
    bins = {r["name"]: r["reliability"] for r in rows if r.get("reliability")}
    if bins:
        reliability_diagram(bins, run_dir / "reliability.png")
    if any("macs" in r and "acc" in r for r in rows):
        accuracy_vs_cost(rows, run_dir / "accuracy_vs_cost.png", cost="macs")
    err.print(f"results: {run_dir / 'results.md'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ensemble-kd", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"ensemble-kd {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, fn, help, config=True, resume=True):
        p = sub.add_parser(name, help=help)
        if config:
            p.add_argument("config", nargs="?", help="YAML config (see configs/)")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. teachers.count=5")
        if resume:
            p.add_argument("--resume", metavar="RUN_DIR", help="continue a killed run in RUN_DIR")
            p.add_argument(ACCEPT_LISTING, action="store_true",
                           help="resume although the streamed training files changed since the run began")
        p.add_argument("--overwrite", action="store_true",
                       help="replace a run already in the run directory (sweep: re-run the runs whose config changed)")
        p.set_defaults(fn=fn)
        return p

    command("demo", cmd_demo, "train teachers and a student on digits, print one table", config=False)
    sub.choices["demo"].add_argument("--config", help="a YAML config instead of the built-in demo")
    sub.choices["demo"].add_argument("--methods", help=f"students to train, by method (default {DEMO_METHODS}; "
                                                       f"with --resume, the run's)")
    command("train-teachers", cmd_train_teachers, "train an ensemble of M members")
    command("distill", cmd_distill, "train a student with a method (ce: the student alone)")
    command("cache-teachers", cmd_cache_teachers,
            "store teacher logits of seeded training views for distill teachers.cache=DIR")
    sw = command("sweep", cmd_sweep, "distil under several variants and seeds: one table, mean and spread")
    sw.add_argument("--only", metavar="NAMES", help="comma-separated variants to run (split a sweep over processes)")
    ev = sub.add_parser("evaluate", help="evaluate a run, a teacher set or a checkpoint")
    ev.add_argument("target", metavar="RUN_OR_CHECKPOINT")
    ev.add_argument("overrides", nargs="*", help="key=value overrides of the run's config")
    ev.set_defaults(fn=cmd_evaluate)
    ev.add_argument("--config", help="the config naming the data (default: the run's config.yaml)")
    ev.add_argument("--out", help="where to write results (default: beside the target)")
    mdl = sub.add_parser("models", help="list the model names arch: takes (ours, timm's, torchvision's)")
    mdl.add_argument("pattern", nargs="?", help="a shell pattern, e.g. 'resnet1*' or 'timm/*'")
    mdl.set_defaults(fn=cmd_models)
    rep = sub.add_parser("reproduce", help="list the papers' experiments, or run one: the paper's figures beside ours")
    rep.add_argument("name", nargs="?", metavar="NAME", help="an experiment (no NAME: list them)")
    rep.add_argument("overrides", nargs="*", help="key=value overrides (a reduced budget is marked in the table)")
    rep.add_argument("--dry-run", action="store_true", help="build every model on the meta device and show the plan")
    rep.add_argument("--overwrite", action="store_true", help="train again what was made with another config")
    rep.add_argument("--cache", action="store_true",
                     help="read the teachers' logits from caches where the method can (needs data.view_seed)")
    rep.add_argument("--only", metavar="VARIANTS",
                     help="comma-separated sweep variants to run (the table shows their cells)")
    rep.set_defaults(fn=cmd_reproduce)
    exp = sub.add_parser("export", help="write a distill run's deployable student as ONNX, TorchScript or a "
                                        "torch.export program, checked against PyTorch")
    exp.add_argument("run", metavar="RUN")
    exp.add_argument("--format", required=True, choices=list(FORMATS))
    exp.add_argument("--out", metavar="FILE", help="default RUN/student" + "|".join(FORMATS.values()) + " by format")
    exp.add_argument("--tolerance", type=float, metavar="REL", default=TOLERANCE,
                     help=f"the check's bound on max |exported - PyTorch|, times max(1, max |logit|) "
                          f"(default {TOLERANCE:g})")
    exp.add_argument("--latency", action="store_true", help="also time batch-1 inference, PyTorch and the file")
    exp.set_defaults(fn=cmd_export)
    cmp = sub.add_parser("compare", help="put runs side by side: table, reliability diagrams, accuracy vs cost")
    cmp.add_argument("runs", nargs="+", metavar="RUN_DIR")
    cmp.add_argument("--out", help="output directory (default runs/compare-<time>)")
    cmp.set_defaults(fn=cmd_compare)
    return parser


def _version() -> str:
    try:
        return importlib.metadata.version("ensemble-kd")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return sys.modules[__package__].__version__


def _kept(run: Path) -> str:
    """What an interrupted command leaves for --resume: a cache build's committed shards, or the checkpoint."""
    cached = describe_kept(run)
    if cached is not None:
        return cached
    if any(run.rglob("last.pt")) or any(run.rglob("model.pt")):
        return "the last checkpoint is saved"
    return "nothing was checkpointed yet (a resume starts over)"


def _remedy(e: OSError) -> str:
    run = _RUNNING.get("dir")
    if e.errno == errno.ENOSPC:
        return "the disk is full: free some space, then " + (
            f"continue with --resume {run}" if run is not None else "run it again")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "this process may not write there: choose a run.dir you can write (or fix its permissions)"
    return "check that path and the disk, then run the command again"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may follow options (`evaluate RUN --out DIR key=value`): collect the strays.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    config = getattr(args, "config", None)
    if config and "=" in config and not Path(config).exists():  # `train-teachers key=value` with no CONFIG
        args.config, args.overrides = None, [config, *args.overrides]
    threads = torch.get_num_threads()  # the demo may lower it; a caller in this process gets it back
    _RUNNING.clear()
    try:
        args.fn(args)
        tracking.close("FINISHED")
    except ConfigError as e:
        err.print(f"[red]config error:[/red] {escape(str(e))}", highlight=False)
        return 2
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
        return 2
    except NonFiniteLossError as e:
        err.print(f"[red]stopped:[/red] {escape(str(e))}", highlight=False)
        return 1
    except (OSError, RuntimeError) as e:  # a read-only run.dir, a full disk: the file and the reason, in one line
        cause = os_error(e)  # torch re-raises a failed write as a RuntimeError
        if cause is None:
            raise
        where = f" '{cause.filename}'" if cause.filename else ""
        err.print(f"[red]error:[/red] {escape(cause.strerror or str(cause))}{escape(where)}; {escape(_remedy(cause))}",
                  highlight=False)
        return 2
    except KeyboardInterrupt:
        run = _RUNNING.get("dir")
        said = (_RUNNING["again"] if "again" in _RUNNING else
                f"interrupted: {_kept(run)}; continue with --resume {run}" if run is not None
                else "interrupted before anything was written; run the command again")
        err.print(escape(said), highlight=False)
        return 130
    finally:
        tracking.close("KILLED")  # stopped or failed (a no-op after a finished run)
        torch.set_num_threads(threads)
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
