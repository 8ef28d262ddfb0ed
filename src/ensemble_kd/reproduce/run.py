"""Running an entry end to end: its teachers (trained here, or loaded from weights), the sweep over
the table's rows and seeds, the teachers' own rows, then the paper's figure beside ours per cell.

RUN = run.dir/(run.name or reproduce-<entry>) holds `teachers/` (a train-teachers run), `sweep/` (a
sweep run) and `teachers-M<k>/` (the first k teachers evaluated). Run again, it continues: finished
members and sweep runs are reused, killed ones resumed, and a changed config is refused (naming its
first changed key) unless --overwrite.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

from .. import pipeline, sweep
from ..config import Config, ConfigError, load_config
from ..engine import tracking
from ..engine.run_dir import RESUME_SAFE, RunDirError, clear, contents, flat, locked, run_changes
from ..engine.runs import write_config
from ..ensemble import MANIFEST, TeacherSet
from ..report import load_results, write_results
from .entry import Cell, Entry

# Keys that change where or how a run is made, not what it computes: not a budget change.
NOT_BUDGET = ("run.*", "logging.*", "device", "data.root", "data.workers", "data.prefetch", "data.eval_batch_size",
              "eval.*", "*.log_every", "*.checkpoint_every", "teachers.source", "teachers.precision", "teachers.compile",
              "teachers.fold_bn", "cache.*", "*.precision", "*.channels_last")
# What the teachers' training does not depend on.
NOT_TEACHERS = RESUME_SAFE + ("student.*", "method.*", "sweep.*", "perturb.*", "cache.*", "teachers.source",
                              "teachers.take", "teachers.cache", "teachers.precision", "teachers.fold_bn",
                              "teachers.compile", "teachers.allow_other_data")


def budget_changes(entry: Entry, config: Config) -> list[str]:
    """Where the resolved config departs from the entry's (the paper's budget): 'key (paper -> ours)'."""
    paper = flat(load_config(entry.config_path).model_dump(mode="json"))
    ours = flat(config.model_dump(mode="json"))
    return [f"{key} ({paper.get(key)!r} -> {ours.get(key)!r})" for key in dict.fromkeys([*paper, *ours])
            if paper.get(key) != ours.get(key) and not any(fnmatch.fnmatchcase(key, p) for p in NOT_BUDGET)]


def run_dir_of(entry: Entry, config: Config) -> Path:
    return Path(config.run.dir) / (config.run.name or f"reproduce-{entry.name}")


def trains_teachers(config: Config) -> bool:
    """The entry's teachers are trained here: named by arch (or members without weights), no source given."""
    return config.teachers.source is None and not pipeline.loads_weights(config)


@dataclass
class Outcome:
    rows: list[dict]  # one per cell: row, column, paper, ours, diff
    budget: list[str]
    run_dir: Path


def reproduce(entry: Entry, config: Config, *, only: list[str] | None = None, overwrite: bool = False,
              cache: bool = False, progress=None, report=print) -> Outcome:
    """Teachers, caches (`cache`), sweep (`only`: some variants, as `sweep --only`), teachers' rows;
    one row per cell run."""
    data = pipeline.prepare_data(config)
    check(entry, config, data, only)  # every variant's method, models and teachers, before anything is written
    if cache and config.data.view_seed is None:
        raise ConfigError("reproduce --cache needs data.view_seed: a cache holds one set of training views, "
                          "and without it every student seed has its own; set data.view_seed=0 (every seed then "
                          "trains on the same views)")
    budget = budget_changes(entry, config)
    run_dir = run_dir_of(entry, config)
    with locked(run_dir):
        tracking.start(run_dir, config)  # its teachers, caches and sweep are tracked as one run (logging.*)
        if trains_teachers(config) and needs_teachers(entry, config):
            source = _teachers(config, run_dir / "teachers", data, overwrite, progress, report)
            config = config.model_copy(update={"teachers": config.teachers.model_copy(update={"source": str(source)})})
        if cache:
            config = _with_caches(config, run_dir, data, only, progress, report)
        sweep_dir = run_dir / "sweep"
        sweep.plan_runs(config, sweep_dir, only=only, overwrite=overwrite)  # a changed run: refused before training
        write_config(sweep_dir, config, "sweep")
        summary = sweep.run_sweep(config, sweep_dir, progress=progress, data=data, only=only, overwrite=overwrite)
        cells = [c for c in entry.cells if _runs(c, config, only)]
        teacher_rows = _teacher_rows(cells, config, data, run_dir)
    ours = {_variant(row): row for row in summary}
    return Outcome([_compare(cell, ours, teacher_rows) for cell in cells], budget, run_dir)


def cacheable(needs, config: Config) -> bool:
    """A run the teacher cache can serve (ensemble/cache.py): the teachers' logits alone, in eval mode,
    on unperturbed views."""
    return (needs.teacher_logits and not needs.teacher_taps and needs.teacher_bn == "eval"
            and config.perturb.kind == "none")


def _with_caches(config: Config, run_dir: Path, data, only, progress, report) -> Config:
    """Each variant that a cache can serve reads its teachers' logits from RUN/cache-M<k>, built by
    cache-teachers' machinery once per ensemble size k, over as many epochs of views as the student
    trains (so the student sees exactly the views it would online); a killed build resumes."""
    variants = {name: dict(overrides) for name, overrides in config.sweep.variants.items()}
    members = len(config.teachers.resolved_members())
    built: set[Path] = set()
    for name, _, variant in sweep.variant_configs(config):
        if (only and name not in only) or not cacheable(pipeline.method_from(variant).needs, variant):
            continue
        where = run_dir / f"cache-M{min(variant.teachers.take or members, members)}"
        epochs = variant.student.train.epochs
        if where not in built:
            exact = variant.model_copy(update={"cache": variant.cache.model_copy(update={"epochs": epochs})})
            report(f"teacher cache: {where} ({epochs} epochs of views)")
            pipeline.cache_teachers(exact, where, progress=progress, data=data, report=report)
            built.add(where)
        variants[name].update({"teachers.cache": str(where), "cache.epochs": epochs})
    return config.model_copy(update={"sweep": config.sweep.model_copy(update={"variants": variants})})


def _runs(cell: Cell, config: Config, only) -> bool:
    """A student cell whose variant runs; a teacher cell within the members there are."""
    if cell.variant is not None:
        return only is None or cell.variant.split(" [")[0] in only
    kind, k = cell.teachers
    return k < len(config.teachers.resolved_members()) if kind == "member" else k <= len(
        config.teachers.resolved_members())


def check(entry: Entry, config: Config, data, only=None) -> None:
    members = len(config.teachers.resolved_members())
    for name, _, variant in sweep.variant_configs(config):
        pipeline.method_from(variant)
        pipeline.check_models(variant, data, teachers=False)
        take = variant.teachers.take
        if config.teachers.source is None and take is not None and take > members and (not only or name in only):
            raise ConfigError(f"sweep variant '{name}' takes {take} teachers but the config makes {members}; "
                              f"raise teachers.count, or leave that row out with --only")
    if trains_teachers(config):
        pipeline.check_models(config, data, student=False)


def needs_teachers(entry: Entry, config: Config) -> bool:
    return any(c.teachers for c in entry.cells) or any(
        pipeline.method_from(v).needs.teachers for _, _, v in sweep.variant_configs(config))


def _teachers(config: Config, teachers_dir: Path, data, overwrite: bool, progress, report) -> Path:
    """Train (or finish) the teachers in teachers_dir; a run made with other teachers is refused."""
    if contents(teachers_dir):
        changes = (run_changes(teachers_dir, config, NOT_TEACHERS) if (teachers_dir / "config.yaml").is_file()
                   else ["its config.yaml, which is missing"])
        if changes and not overwrite:
            raise RunDirError(f"the teachers in '{teachers_dir}' were trained with another {changes[0]}; pass "
                              f"--overwrite to train them again, or choose another run.name")
        if changes:
            clear(teachers_dir)
    report(f"teachers: {len(config.teachers.resolved_members())} in {teachers_dir}")
    write_config(teachers_dir, config, "train-teachers")
    pipeline.train_teachers(config, teachers_dir, resume=True, progress=progress, data=data)
    return teachers_dir


def _teacher_rows(cells: list[Cell], config: Config, data, run_dir: Path) -> dict[int, list[dict]]:
    """The first M teachers evaluated (members, ensemble, vote), once per M the cells ask for."""
    rows = {}
    for M in sorted({c.teachers[1] for c in cells if c.teachers and c.teachers[0] != "member"}
                    | ({len(config.teachers.resolved_members())} if any(
                        c.teachers and c.teachers[0] == "member" for c in cells) else set())):
        out = run_dir / f"teachers-M{M}"
        if not (out / "results.json").is_file():
            capped = config.model_copy(update={"teachers": config.teachers.model_copy(update={"take": M})})
            teachers = (TeacherSet.from_run(config.teachers.source, device=data.device, take=M)
                        if config.teachers.source else pipeline.teachers_from_weights(capped, data))
            source = Path(config.teachers.source) if config.teachers.source else None
            write_results(out, pipeline.evaluate_teachers(config, teachers, data,
                                                          source if source and (source / MANIFEST).is_file() else None))
        rows[M] = load_results(out)
    return rows


def _variant(row: dict) -> str:
    name = row["name"]
    suffix = f" ({row.get('seeds')} seeds)"
    return name[: -len(suffix)] if row.get("seeds", 1) > 1 and name.endswith(suffix) else name


def _teacher_row(cell: Cell, teacher_rows: dict[int, list[dict]]) -> dict | None:
    kind, k = cell.teachers
    if kind == "member":
        rows = teacher_rows[max(teacher_rows)]
        return rows[k] if k < len(rows) else None
    prefix = "majority vote (" if kind == "vote" else "ensemble ("
    return next((r for r in teacher_rows.get(k, []) if r["name"].startswith(prefix)), None)


def _compare(cell: Cell, ours: dict[str, dict], teacher_rows) -> dict:
    row = ours.get(cell.variant) if cell.variant else _teacher_row(cell, teacher_rows)
    value = cell.ours(row) if row is not None else None
    diff = value - cell.paper if value is not None and cell.paper is not None else None
    return {"row": cell.row, "column": cell.column, "paper": cell.paper, "ours": value, "diff": diff}
