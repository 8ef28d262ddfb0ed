"""What `ensemble-kd reproduce` prints: the listing of entries, a dry run's plan with the models'
sizes beside the paper's, and the final table in the paper's layout (paper, ours, difference)."""

from __future__ import annotations

from ..config import Config, ConfigError
from .. import pipeline, sweep
from .entry import Entry
from .run import needs_teachers
from .sizes import Built, student_size, teacher_sizes

BUDGET_MARK = "*"


def _m(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def _ops(built: Built, entry: Entry) -> str:
    if built.macs is None:
        return "cost depends on the input's frames"
    if entry.flops_are_macs:
        return f"{built.macs / 1e9:.3g}G MACs"
    return f"{2 * built.macs / 1e9:.3g}G FLOPs (2 x MACs)"


def _params(built: Built, entry: Entry) -> str:
    return f"{_m(built.folded)} (BN folded)" if entry.folded_params else _m(built.params)


def plan(entry: Entry, config: Config, num_classes: int, input_shape: tuple) -> tuple[list[Built], list[Built]]:
    """Every model the entry builds: teachers once each, one student per sweep variant."""
    seen, students, taught = set(), [], False
    for name, _, variant in sweep.variant_configs(config):
        if name in seen:
            continue
        seen.add(name)
        method = pipeline.method_from(variant)
        taught = taught or method.needs.teachers
        students.append(student_size(name, variant, method, num_classes, input_shape))
    taught = taught or any(c.teachers for c in entry.cells)
    return (teacher_sizes(config, num_classes, input_shape) if taught else []), students


def training_macs(entry: Entry, config: Config) -> int | None:
    """Multiply-accumulates of the whole entry, counted as 3 x forward (forward and backward) per
    training image and epoch for every teacher and every (variant, seed) run, plus one forward of
    the teachers a run distils from online. None where a model's cost depends on its input. No
    GPU-hours: they depend on a throughput we have not measured."""
    if entry.train_images is None:
        return None
    teachers = teacher_sizes(config, entry.num_classes, entry.input_shape) if needs_teachers(entry, config) else []
    if any(t.macs is None for t in teachers):
        return None
    total = 0
    if not pipeline.loads_weights(config):  # teachers trained here
        total += sum(3 * t.macs for t in teachers) * entry.train_images * config.teachers.train.epochs
    for name, _, variant in sweep.variant_configs(config):
        method = pipeline.method_from(variant)
        student = student_size(name, variant, method, entry.num_classes, entry.input_shape)
        if student.macs is None:
            return None
        taught = sum(t.macs for t in teachers[: variant.teachers.take]) if method.needs.teachers else 0
        if variant.method.name == "meal":  # one teacher drawn per iteration
            taught //= len(teachers[: variant.teachers.take])
        total += (3 * student.macs + taught) * entry.train_images * variant.student.train.epochs
    return total


def cost_summary(entry: Entry) -> str:
    """The base student's and the teachers' sizes, in the paper's convention (for the listing)."""
    from ..config import load_config
    try:
        config = load_config(entry.config_path)
        method = pipeline.method_from(config)
        student = student_size(config.method.name, config, method, entry.num_classes, entry.input_shape)
        text = f"student {_params(student, entry)}, {_ops(student, entry)}"
        if method.needs.teachers:
            teachers = teacher_sizes(config, entry.num_classes, entry.input_shape)
            names = sorted({t.arch for t in teachers})
            total = sum(t.params for t in teachers)
            plural = "s" if len(teachers) > 1 else ""
            text += f"; {len(teachers)} teacher{plural} ({', '.join(names)}) {_m(total)} in all"
        macs = training_macs(entry, config)
        if macs is not None:
            text += f"; training {macs:.2g} MACs in all (3 x forward per image and epoch)"
        return text
    except ConfigError as err:
        return f"not buildable yet: {err}"


def listing(entries: list[Entry]) -> list[str]:
    lines = []
    for e in entries:
        lines += [f"{e.name}",
                  f"  paper:   {e.paper}, {e.table}",
                  f"  rows:    {e.rows} ({len(e.cells)} cells)",
                  f"  config:  {e.config}",
                  f"  figures: {e.figures_summary()}",
                  f"  cost:    {cost_summary(e)}"]
        lines += [f"  paper sizes: {s.model}: {s.params:g}M params, {s.flops:g}B FLOPs" for s in e.sizes]
        lines += [f"  note:    {n}" for n in e.notes]
    return lines


def dry_run(entry: Entry, config: Config, num_classes: int, input_shape: tuple, run_dir,
            paper_data: bool = True) -> list[str]:
    """The plan, each model's size; beside the paper's sizes when the data is the paper's."""
    teachers, students = plan(entry, config, num_classes, input_shape)
    seeds = config.sweep.seeds
    lines = [f"reproduce {entry.name} (dry run: nothing trained or written): {entry.paper}, {entry.table}",
             f"  config {entry.config}; run directory {run_dir}"]
    if teachers:
        how = ("loaded from weights" if pipeline.loads_weights(config) else
               f"from {config.teachers.source}" if config.teachers.source else
               f"trained {config.teachers.train.epochs} epochs each")
        lines.append(f"  teachers ({len(teachers)}, {how}):")
        groups: dict[tuple, list[int]] = {}
        for i, t in enumerate(teachers):
            groups.setdefault((t.arch, t.params, t.folded, t.macs), []).append(i)
        for (arch, *_), members in groups.items():
            t = teachers[members[0]]
            lines.append(f"    {len(members)} x {arch} {_params(t, entry)}, {_ops(t, entry)}")
    lines.append(f"  students ({len(students)} variants x {len(seeds)} seeds = {len(students) * len(seeds)} runs, "
                 f"{config.student.train.epochs} epochs unless the variant says otherwise):")
    lines += [f"    {s.role[len('student '):]}: {s.arch} {_params(s, entry)}, {_ops(s, entry)}" for s in students]
    by_model = {s.role[len("student "):]: s for s in students}
    for size in entry.sizes if paper_data else ():
        ours = by_model.get(size.model)
        if ours is not None:
            lines.append(f"  paper's size of {size.model}: {size.params:g}M params, {size.flops:g}B FLOPs; ours "
                         f"{_params(ours, entry)}, {_ops(ours, entry)}")
    return lines


def paper_table(entry: Entry, rows: list[dict], budget: list[str]) -> list[str]:
    """Markdown, the paper's rows and columns; each cell 'paper / ours (ours - paper)'."""
    columns = list(dict.fromkeys(r["column"] for r in rows))
    mark = BUDGET_MARK if budget else ""
    lines = [f"{entry.paper}, {entry.table}: paper / ours{mark} (difference)", "",
             "| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name in dict.fromkeys(r["row"] for r in rows):
        cells = {r["column"]: r for r in rows if r["row"] == name}
        lines.append(f"| {name} | " + " | ".join(_cell(cells.get(c)) for c in columns) + " |")
    lines.append("")
    if budget:
        lines.append(f"{BUDGET_MARK} budget differs from the paper's: {'; '.join(budget)}")
    if any(r["paper"] is None for r in rows):
        lines.append("— the paper's figure did not survive in its text (see `ensemble-kd reproduce`)")
    return lines


def _number(value) -> str:
    return "—" if value is None else f"{value:.2f}" if abs(value) >= 1 else f"{value:.3f}"


def _cell(r) -> str:
    if r is None:
        return ""
    diff = "" if r["diff"] is None else f" ({r['diff']:+.2f})" if abs(r["diff"]) >= 0.01 or r["diff"] == 0 \
        else f" ({r['diff']:+.3f})"
    return f"{_number(r['paper'])} / {_number(r['ours'])}{diff}"
