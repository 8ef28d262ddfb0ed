"""What the commands do, as plain functions: data in, teachers and students trained, rows out.

The command line (cli.py) only parses arguments, prints and exits; everything here
is usable from Python too.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import (Config, ConfigError, DataConfig, InputConfig, MethodConfig, ModelConfig, TeacherMemberConfig,
                     TrainConfig, load_config)
from .data import AugmentSpec, DatasetSplits, DeviceLoader, dataset_record
from .data.crops import ViewSpec
from .data.mixing import MixSpec
from .data.record import describe, identity_difference
from .data.storage import is_streamed, load_splits
from .data.stream import StreamLoader
from .data.video import VIDEO_DATASETS, VideoSplits, load_video_splits, video_loader
from . import distributed
from .engine import Trainer, resolve_device, save_model, seed_everything
from .engine.checkpoint import model_data, read_json
from .evaluation import evaluate_model, evaluate_teacher_set
from .perturbations import Perturbation
from .ensemble import MANIFEST, TeacherSet, write_manifest
from .ensemble.cache import CachedTeachers, build_cache, open_cache
from .methods import create_method, method_class
from .models import create, unwrap
from .models.inputs import InputAdapter, adapt_input
from .models.weights import check_weights, load_weights

TEACHERS_DIR = "teachers"
STUDENT_DIR = "student"
SHIPPED_FILE = "collapsed.pt"  # a distill run's network to ship when its method makes one (LatentBE's collapse)


@dataclass
class Data:
    splits: DatasetSplits | VideoSplits
    val: DeviceLoader | None
    test: DeviceLoader
    config: Config
    device: torch.device

    def calibration_split(self) -> str | None:
        """Where cNLL's and cECE's temperature is fitted: the dataset's own validation split, or
        data.val_fraction of train (for pretrained teachers, images they may have learnt)."""
        if self.val is None:
            return None
        cfg = self.config.data
        return getattr(self.splits, "val_source", None) or \
            f"{cfg.val_fraction:g} of train (data.val_fraction, data.split_seed={cfg.split_seed})"

    def train_loader(self, cfg: DataConfig, seed: int, rank: int = 0, world_size: int = 1) -> DeviceLoader:
        """Training views and order seeded by data.view_seed, or by the trained model's seed.

        `cfg` is the data section of the run at hand (batch size, augmentation may differ
        between the runs of a sweep that share the loaded splits).
        """
        seed = cfg.view_seed if cfg.view_seed is not None else seed
        if isinstance(self.splits, VideoSplits):
            return video_loader(self.splits.train, batch_size=cfg.batch_size, train=True, seed=seed,
                                device=self.device, rank=rank, world_size=world_size,
                                workers=getattr(cfg, "workers", 0), frames_per_video=cfg.frames_per_video)
        spec = self.splits.augment  # the dataset's, with the keys data.augment gives on top
        if cfg.augment is not None:
            spec = dataclasses.replace(spec, **{k: v for k, v in cfg.augment.model_dump().items() if v is not None})
        v = cfg.views
        mix = MixSpec(mixup_alpha=v.mixup_alpha, cutmix_alpha=v.cutmix_alpha, mix_prob=v.mix_prob)
        if is_streamed(self.splits):
            return StreamLoader(self.splits.train, batch_size=cfg.batch_size, mean=self.splits.mean,
                                std=self.splits.std, spec=view_spec(cfg), augment=spec, mix=mix, train=True,
                                seed=seed, device=self.device, rank=rank, world_size=world_size,
                                **stream_options(cfg))
        if v.train == "none":
            spec = AugmentSpec()
        return DeviceLoader(self.splits.train, batch_size=cfg.batch_size, mean=self.splits.mean,
                            std=self.splits.std, spec=spec, mix=mix, train=True, seed=seed, device=self.device,
                            rank=rank, world_size=world_size)


def view_spec(cfg: DataConfig) -> ViewSpec:
    """The views of streamed images (data.views); rrc unless views.train says otherwise."""
    v = cfg.views
    return ViewSpec(train=v.train or "rrc", size=v.size, scale=tuple(v.scale), ratio=tuple(v.ratio), flip=v.flip,
                    crop_fraction=v.crop_fraction, decoder=cfg.decoder, draft=cfg.draft)


def stream_options(cfg: DataConfig) -> dict:
    return {"workers": cfg.workers, "prefetch": cfg.prefetch, "on_decode_error": cfg.on_decode_error}


def prepare_data(config: Config, device: torch.device | None = None) -> Data:
    """Load the dataset named by the config and put its eval splits on the device."""
    device = device or distributed.device_for(distributed.world(), resolve_device(config.device))
    cfg = config.data
    if cfg.frames_per_video is not None and cfg.name not in VIDEO_DATASETS:
        raise ConfigError(f"config key 'data.frames_per_video' draws frames of videos; data.name {cfg.name!r} is "
                          f"not video ({', '.join(VIDEO_DATASETS)}): remove it")
    with distributed.main_rank_first():  # the ranks after it read the indices it built
        if cfg.name in VIDEO_DATASETS:
            splits = load_video_splits(cfg.name, root=cfg.root, val_fraction=cfg.val_fraction,
                                       split_seed=cfg.split_seed, num_classes=cfg.num_classes,
                                       max_frames=cfg.max_frames)
        else:
            splits = load_splits(cfg.name, cfg.root, storage=cfg.storage, views=view_spec(cfg),
                                 train_view=cfg.views.train, val_fraction=cfg.val_fraction, split_seed=cfg.split_seed,
                                 mean=cfg.mean, std=cfg.std, workers=cfg.workers, on_decode_error=cfg.on_decode_error)

    def eval_loader(dataset):
        if isinstance(splits, VideoSplits):
            return video_loader(dataset, batch_size=cfg.eval_batch_size, train=False, device=device,
                                workers=getattr(cfg, "workers", 0))
        if is_streamed(splits):
            return StreamLoader(dataset, batch_size=cfg.eval_batch_size, mean=splits.mean, std=splits.std,
                                spec=view_spec(cfg), train=False, device=device, **stream_options(cfg))
        return DeviceLoader(dataset, batch_size=cfg.eval_batch_size, mean=splits.mean, std=splits.std,
                            train=False, device=device)

    val = eval_loader(splits.val) if splits.val is not None else None
    return Data(splits, val, eval_loader(splits.test), config, device)


def build_model(member: ModelConfig, data: Data) -> torch.nn.Module:
    seed_everything(member.seed)  # the initialisation depends on the member's seed alone
    try:
        model = create(member.arch, num_classes=data.splits.num_classes,
                       in_channels=data.splits.in_channels, pretrained=member.pretrained, **member.kwargs)
    except TypeError as err:
        raise ConfigError(f"architecture '{member.arch}' got a bad keyword in kwargs: {err}") from None
    if member.weights is not None:
        load_weights(model, member.weights)
    return model.to(data.device)


def member_name(index: int, member: ModelConfig) -> str:
    arch = member.arch.replace("/", "-").replace(":", "-")  # timm/resnet18, pkg.mod:fn: one directory name
    return f"{index:02d}-{arch}-s{member.seed}"


def train_one(model, method, data: Data, config: Config, train: TrainConfig, out_dir: Path, *, seed: int,
              resume: bool, progress=None, description="train", teachers=None, perturbation=None) -> dict:
    """Train, then save model.pt (plain state_dict) with its sidecar; returns timing info
    (train_time_s: the seconds in training over every process of a resumed run)."""
    world = distributed.world()  # under torchrun each rank trains on its shard; data.batch_size is per rank
    loader = data.train_loader(config.data, seed, world.rank, world.size)
    record = dataset_record(data.splits)  # in last.pt, model.json and the manifest
    trainer = Trainer(model, method.to(data.device), loader, train, out_dir,
                      device=data.device, seed=seed, teachers=teachers, val_loader=data.val,
                      progress=progress, description=description, perturbation=perturbation, dataset=record)
    trainer.fit(resume=resume)
    info = {"train_time_s": trainer.train_time_s, "steps": trainer.pos.step, "data": record}
    if world.is_main:
        save_model(model, out_dir / "model.pt", info)
    distributed.barrier()  # the other ranks may read model.pt next
    return info


def train_teachers(config: Config, run_dir: Path, *, resume=False, progress=None, data: Data | None = None):
    """Train every member in turn; the manifest grows as members finish, so resume skips them, and
    says the run is complete only once every planned member is in it."""
    data = data or prepare_data(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    done = _read_manifest(run_dir) if resume else {}
    entries = []
    planned = [member_name(i, m) for i, m in enumerate(config.teachers.resolved_members())]
    for i, member in enumerate(config.teachers.resolved_members()):
        name = member_name(i, member)
        out = run_dir / "members" / name
        if name in done and (run_dir / done[name]["checkpoint"]).is_file():
            entries.append(done[name])
            continue
        model = build_model(member, data)
        info = train_one(model, create_method("ce"), data, config, config.teachers.train, out, seed=member.seed,
                         resume=resume, progress=progress, description=f"teacher {name}")
        entries.append({"name": name, "spec": model.spec, "seed": member.seed,
                        "checkpoint": str((out / "model.pt").relative_to(run_dir)), **info})
        if distributed.world().is_main:
            write_manifest(run_dir, entries, planned)
    if distributed.world().is_main:
        write_manifest(run_dir, entries, planned)
    distributed.barrier()
    return TeacherSet.from_run(run_dir, device=data.device)


def _read_manifest(run_dir: Path) -> dict:
    path = run_dir / MANIFEST
    if not path.is_file():
        return {}
    manifest = read_json(path, f"delete it to train every member again with --resume {run_dir}", keys=("members",))
    return {m["name"]: m for m in manifest["members"]}


def load_teachers(config: Config, data: Data, needs=None) -> TeacherSet:
    if config.teachers.source is not None:
        teachers = TeacherSet.from_run(config.teachers.source, device=data.device, take=config.teachers.take)
    elif loads_weights(config):
        teachers = teachers_from_weights(config, data)
    else:
        raise ConfigError("teachers.source is not set; point it at a train-teachers run directory, or give "
                          "every one of teachers.members its weights (or pretrained: true)")
    check_class_counts(teachers, data)
    check_teacher_data(config, teachers, data)
    renormalise_teachers(teachers, data)
    return fast_teachers(config, teachers, needs)


def loads_weights(config: Config) -> bool:
    """teachers.members name weights (files or the library's) and no run: the set is loaded as given."""
    members = config.teachers.members or []
    return config.teachers.source is None and any(m.weights is not None or m.pretrained for m in members)


def teachers_from_weights(config: Config, data: Data) -> TeacherSet:
    """The members of teachers.members built and loaded from their weights, no training; each one's
    input adapted to what it was trained on (teacher_input)."""
    members = config.teachers.members[: config.teachers.take]
    models = []
    for i, member in enumerate(members):
        if member.weights is None and not member.pretrained:
            raise ConfigError(f"config key 'teachers.members.{i}' has neither weights nor pretrained: true; give "
                              f"every member its weights, or train them with train-teachers and set teachers.source")
        model = build_model(member, data)
        adapter = teacher_input(i, member, model, data)
        models.append(adapt_input(model, adapter) if adapter is not None else model)
    records = [model_data(m.weights) if m.weights is not None else None for m in members]  # ours carry one
    return TeacherSet(models, [member_name(i, m) for i, m in enumerate(members)], records)


def teacher_input(index: int, member: TeacherMemberConfig, model, data: Data) -> InputAdapter | None:
    """The adapter from the data's normalisation to the member's own (None: they agree). The member's
    is `input:` when given, on top of the library's config with `input.library` or pretrained: true."""
    where = f"config key 'teachers.members.{index}.input'"
    spec = member.input if member.input is not None else (InputConfig(library=True) if member.pretrained else None)
    if spec is None:
        return None
    if not hasattr(data.splits, "mean"):
        raise ConfigError(f"{where}: input adapters apply to images, not to {data.splits.name}")
    wanted = {"mean": list(data.splits.mean), "std": list(data.splits.std), "size": None}
    if spec.library if spec.library is not None else member.pretrained:
        own = getattr(model, "input_config", None)
        if own is None:
            raise ConfigError(f"{where}: '{member.arch}' has no library input config; give mean, std and size")
        wanted.update(own)
    wanted.update({k: getattr(spec, k) for k in ("mean", "std", "size") if k in spec.model_fields_set})
    size = wanted["size"]
    size = [size, size] if isinstance(size, int) else size
    if size is not None and list(size) == list(getattr(data.splits, "image_size", ()) or ()):
        size = None  # the data's size already
    try:
        adapter = InputAdapter(data.splits.mean, data.splits.std, wanted["mean"], wanted["std"], size)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None
    identity = (adapter.size is None and torch.allclose(adapter.scale, torch.ones_like(adapter.scale))
                and torch.allclose(adapter.shift, torch.zeros_like(adapter.shift)))
    return None if identity else adapter


def untrained_teachers(config: Config, data: Data) -> TeacherSet:
    """The members train-teachers would train, as initialised: what a check binds a method to before they exist."""
    members = config.teachers.resolved_members()
    return TeacherSet([build_model(m, data) for m in members], [member_name(i, m) for i, m in enumerate(members)])


def student_config(config: Config, method: str) -> Config:
    """The config of one of several students (the demo's): method `method` with its own options."""
    return config.model_copy(update={"method": MethodConfig(name=method, options=config.method.options_for(method))})


def fast_teachers(config: Config, teachers: TeacherSet, needs=None) -> TeacherSet:
    """Inference copies of the members (BN folded, bf16 and channels_last on GPUs, compiled if asked).
    BatchNorm stays unfolded for a method that runs the teachers on batch statistics."""
    cfg = config.teachers
    fast = TeacherSet(list(teachers.members), teachers.names)
    fold = cfg.fold_bn and (needs is None or needs.teacher_bn == "eval")
    return fast.prepare_for_inference(precision=cfg.precision, fold_bn=fold, compile=cfg.compile)


def open_teacher_cache(config: Config, data: Data, needs=None) -> CachedTeachers:
    """The cache named by teachers.cache, checked against this run's training views (student.seed)
    and, when teachers.source or teachers.members' weights name them, against the teachers' weights
    and inputs (loaded, never run).
    """
    source = config.teachers.source
    teachers = (TeacherSet.from_run(source, take=config.teachers.take) if source is not None and Path(source).is_dir()
                else teachers_from_weights(config, data) if loads_weights(config) else None)
    if teachers is not None:
        check_teacher_data(config, teachers, data)
        renormalise_teachers(teachers, data)  # as when the cache was built: the fingerprint names it
    cached = open_cache(config.teachers.cache, teachers, data.train_loader(config.data, config.student.seed), data.device,
                        dataset=config.data.name, needs=needs)
    check_class_counts(cached, data)
    return cached


def teachers_for(config: Config, data: Data, needs) -> TeacherSet | CachedTeachers:
    """What a distill run reads teacher outputs from: the cache when teachers.cache is set, else the teachers."""
    if config.teachers.cache is not None:
        return open_teacher_cache(config, data, needs)
    return load_teachers(config, data, needs)


def cache_teachers(config: Config, out_dir: Path, progress=None, data: Data | None = None,
                   teachers: TeacherSet | None = None, report=None) -> Path:
    """Store the teachers' logits for cache.epochs epochs of training views, for `distill teachers.cache=DIR`.

    The views are those of the student's loader (seed student.seed): the student trains on
    them, and the cache is checked against that seed when it is opened. Run again on the same
    out_dir after a kill, it resumes; `report(line)` hears the size on disk before any work.
    """
    data = data or prepare_data(config)
    teachers = teachers or load_teachers(config, data)
    cfg = config.cache
    world = distributed.world()  # each rank computes and writes its own shard
    return build_cache(teachers, data.train_loader(config.data, config.student.seed), out_dir, epochs=cfg.epochs,
                       dtype=cfg.dtype, top_k=cfg.top_k, batch_size=config.data.eval_batch_size,
                       shard_size=cfg.shard_size, progress=progress, dataset=config.data.name, rank=world.rank,
                       world_size=world.size, report=report)


def check_class_counts(teachers: TeacherSet, data: Data) -> None:
    k = teachers.num_classes
    if k is not None and k != data.splits.num_classes:
        raise ConfigError(f"the teachers predict {k} classes but dataset '{data.splits.name}' has "
                          f"{data.splits.num_classes}; use teachers trained on this dataset")


def check_teacher_data(config: Config, teachers: TeacherSet, data: Data) -> None:
    """Teachers trained on other data (name, classes, image size, channels, as their checkpoints record)
    are refused unless teachers.allow_other_data; a differing normalisation alone is not refused."""
    for name, record in zip(teachers.names, teachers.data_records):
        check_trained_data(config, f"teacher {name}", record, data)


def check_trained_data(config: Config, what: str, record: dict | None, data: Data) -> None:
    """A model trained on other data (its recorded dataset_record) is refused for this data: every
    entry point that runs a saved model on data asks here (teachers.allow_other_data lets it through)."""
    if config.teachers.allow_other_data:
        return
    current = dataset_record(data.splits)
    differ = identity_difference(record, current)
    if differ:
        raise ConfigError(f"{what} was trained on {describe(record)} but this run's data is {describe(current)} "
                          f"(they differ in {', '.join(differ)}); use a model trained on this data, or set "
                          f"teachers.allow_other_data=true if that is intended")


def renormalise_teachers(teachers: TeacherSet, data: Data) -> None:
    """A member whose recorded train statistics differ from this run's (another validation split, or
    allowed other data) sees its inputs in its own normalisation, as it was trained."""
    if not hasattr(data.splits, "mean"):
        return
    here = torch.tensor([*data.splits.mean, *data.splits.std], dtype=torch.float64)
    for member, record in zip(teachers.members, teachers.data_records):
        if not record or record.get("mean") is None or len(record["mean"]) + len(record["std"]) != len(here):
            continue  # unrecorded, or other channels (allowed other data): nothing to map between
        if not torch.allclose(torch.tensor([*record["mean"], *record["std"]], dtype=torch.float64), here):
            adapt_input(member, InputAdapter(data.splits.mean, data.splits.std, record["mean"], record["std"]))


def prepare_distill(config: Config, data: Data, teachers=None):
    """The method and what it reads teacher outputs from, checked before any work is written."""
    method = method_from(config)
    needs = method.needs
    if config.perturb.kind != "none":
        if not needs.teachers:
            raise ConfigError(f"config key 'perturb.kind': perturbations move inputs where teachers disagree; "
                              f"method '{config.method.name}' has no teachers")
        needs = dataclasses.replace(needs, perturbs_inputs=True)
    if needs.teachers and teachers is None:
        teachers = teachers_for(config, data, needs)  # a cache is checked against the needs here
    elif method.needs.teacher_bn != "eval" and getattr(teachers, "folded", False):
        # teachers shared between runs (the demo) were folded; this method needs their BatchNorm
        unfolded = TeacherSet([copy.deepcopy(m).to(data.device) for m in teachers.source_members], teachers.names)
        teachers = fast_teachers(config, unfolded, method.needs)
    arch, kwargs = method.student_spec(config.student.arch, config.student.kwargs,
                                       len(teachers) if teachers is not None else None)
    if arch != config.student.arch or config.student.weights is not None:
        # the network the method builds (LatentBE's, EnsembleNet's), from its options: shapes only
        try:
            with torch.device("meta"):
                student = create(arch, num_classes=data.splits.num_classes, in_channels=data.splits.in_channels,
                                 **kwargs)
        except ValueError as err:
            raise ConfigError(f"config key 'method.options' ({config.method.name}'s student): {err}") from None
        if config.student.weights is not None:
            _check_weights_file("student", config.student.weights, student)
    check_binding(config, data, teachers)
    return method, teachers


def check_binding(config: Config, data: Data, teachers=None) -> None:
    """What the method's options ask of the models (taps, teacher indices, C against 1/M, members per
    teacher, a fork, a perturbation's student) checked as training would, before anything is written:
    a fresh copy of the method bound to the student it trains and the teachers, on the smallest batch
    of training views, which the perturbation (if any) then moves once."""
    method = method_from(config)
    count = len(teachers) if teachers is not None else None
    arch, kwargs = method.student_spec(config.student.arch, config.student.kwargs, count)
    try:
        student = create(arch, num_classes=data.splits.num_classes, in_channels=data.splits.in_channels,
                         **kwargs).to(data.device)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config key '{options_key(config)}': method '{config.method.name}' builds the student "
                          f"as {arch}, which fails: {err}") from None
    loader = data.train_loader(config.data, config.student.seed)
    batch = next(iter(loader.batches_at([torch.arange(min(2, loader.size))], 0)))
    try:
        method.bind(student, teachers, batch.x)
    except ValueError as err:
        raise ConfigError(f"config key '{options_key(config)}': {err}") from None
    perturbation = perturbation_of(config, data, method)
    if perturbation is not None:
        try:
            perturbation(batch, teachers, student, step=0, seed=config.student.seed)
        except ValueError as err:
            raise ConfigError(f"config key 'perturb.kind': {err}") from None


def distill(config: Config, run_dir: Path, *, resume=False, progress=None, data: Data | None = None,
            teachers: TeacherSet | None = None, method=None):
    """Train the student with the configured method (`ce`: the student alone)."""
    data = data or prepare_data(config)
    if method is None:
        method, teachers = prepare_distill(config, data, teachers)
    arch, kwargs = method.student_spec(config.student.arch, config.student.kwargs,
                                       len(teachers) if teachers is not None else None)
    model = build_model(config.student.model_copy(update={"arch": arch, "kwargs": kwargs}), data)
    info = train_one(model, method, data, config, config.student.train, run_dir, seed=config.student.seed,
                     resume=resume, progress=progress, teachers=teachers, perturbation=perturbation_of(config, data, method),
                     description=f"student ({config.method.name})")
    shipped = method.deployable(model, training_inputs(config, data))  # LatentBE: the collapsed network
    if shipped is not None and distributed.world().is_main:
        save_model(shipped, run_dir / SHIPPED_FILE, info)
    return model, info


def training_inputs(config: Config, data: Data):
    """The student's first epoch of training views, in order, made only when read (a method takes
    what it needs: LatentBE's BatchNorm recalibration a few batches); the same on every call and rank."""
    for batch in data.train_loader(config.data, config.student.seed).batches(0):
        yield batch.x


def perturbation_of(config: Config, data: Data, method=None) -> Perturbation | None:
    """The configured perturbation; its unset temperature is the method's distillation temperature
    (ODS follows the KD temperature in the reference code), 1 for a method without one."""
    cfg = config.perturb
    if cfg.kind == "none":
        return None
    if not hasattr(data.splits, "mean"):
        raise ConfigError(f"config key 'perturb.kind': perturbations apply to images, not to {data.splits.name}")
    temperature = cfg.temperature if cfg.temperature is not None else getattr(method, "temperature", 1.0)
    return Perturbation(cfg.kind, step=cfg.step, fraction=cfg.fraction, temperature=temperature,
                        mean=data.splits.mean, std=data.splits.std)


def check_method(name: str, key: str = "method.name") -> None:
    try:
        method_class(name)
    except ValueError as err:  # unknown, or a plugin that failed to load: the sentence says which
        raise ConfigError(f"config key '{key}': {err}") from None


def method_from(config: Config, name: str | None = None, several: bool = False):
    """The method `name` (default method.name) built with its options, or one sentence naming the key;
    `several`: the run trains several methods (the demo), so `method.options` may have been meant for another."""
    name = name or config.method.name
    check_method(name)
    for other in config.method.per_method:
        check_method(other, key=f"method.per_method.{other}")
    key = options_key(config, name)
    try:
        return create_method(name, **config.method.options_for(name))
    except ValueError as err:
        hint = ("; the demo trains several methods: give each its options in method.per_method.<method>"
                if several and key == "method.options" else "")
        raise ConfigError(f"config key '{key}': {err}{hint}") from None


def options_key(config: Config, name: str | None = None) -> str:
    """The config key holding method `name`'s options (default method.name's)."""
    name = name or config.method.name
    return f"method.per_method.{name}" if name in config.method.per_method else "method.options"


def check_models(config: Config, data: Data, teachers: bool = True, student: bool = True) -> None:
    """Build each architecture once without memory (meta device): a bad arch or kwarg fails before any work."""
    listed = config.teachers.members is not None
    models = [(f"teachers.members.{i}" if listed else "teachers", m)
              for i, m in enumerate(config.teachers.resolved_members())] if teachers else []
    models += [("student", config.student)] if student else []
    seen = set()
    for key, m in models:
        if (m.arch, repr(m.kwargs), m.weights) in seen:
            continue
        seen.add((m.arch, repr(m.kwargs), m.weights))
        try:
            with torch.device("meta"):
                model = create(m.arch, num_classes=data.splits.num_classes, in_channels=data.splits.in_channels,
                               **m.kwargs)
        except ValueError as err:
            raise ConfigError(f"config key '{key}': {err}") from None
        except TypeError as err:  # the library's constructor refused a keyword
            raise ConfigError(f"config key '{key}': {err}; {key}.kwargs is {m.kwargs}: give the arguments of "
                              f"{m.arch} there ({{}} for none)") from None
        if m.weights is not None:
            # A student whose method rebuilds it (LatentBE's BE, EnsembleNet's heads) may hold a file of
            # that network, not of its base: prepare_distill checks it against it, the teachers known.
            rebuilt = key == "student" and method_from(config).student_spec(m.arch, m.kwargs, 1)[0] != m.arch
            _check_weights_file(key, m.weights, model, misfit_ok=rebuilt)


def _check_weights_file(key: str, path: str, model, misfit_ok: bool = False) -> None:
    """The file exists and fits the network it will be loaded into, its shapes read only."""
    try:
        check_weights(model, path)
    except FileNotFoundError as err:
        raise ConfigError(f"config key '{key}.weights': {err}") from None
    except ValueError as err:
        if not misfit_ok:
            raise ConfigError(f"config key '{key}.weights': {err}") from None


def student_row_name(config: Config) -> str:
    method = config.method.name
    label = "student alone" if method == "ce" else f"student {method}"
    return f"{label} ({config.student.arch})"


def evaluate_student(config: Config, model, data: Data, info: dict | None = None) -> list[dict]:
    """The student's row; when its method ships another network (LatentBE collapses its
    BatchEnsemble), that network's row first ("part": "collapsed"), then the trained one's."""
    name = student_row_name(config)
    timing = {"train_time_s": info["train_time_s"]} if info else {}

    def row(label, net, **extra):
        return {**evaluate_model(label, net, data.test, data.val, config.eval, data.device), **timing, **extra}
    shipped = method_from(config).deployable(model, training_inputs(config, data))
    if shipped is None:
        return _calibrated_on(data, [row(name, model)])
    members = getattr(unwrap(model), "members", "")
    return _calibrated_on(data, [row(f"{name} collapsed", shipped, part="collapsed"),
                                 row(f"{name} BE (M={members})", model, part="BE")])


def evaluate_model_row(path: Path, model, config: Config, data: Data) -> dict:
    name = model.spec["name"] if path.name == "model.pt" else path.stem
    label = f"{path.parent.name}: {name}" if path.parent.name else name
    return _calibrated_on(data, [evaluate_model(label, model, data.test, data.val, config.eval, data.device)])[0]


def _calibrated_on(data: Data, rows: list[dict]) -> list[dict]:
    """Rows with calibrated figures name the split their temperature was fitted on."""
    split = data.calibration_split()
    return [{**r, "calibration_split": split} if split and "cnll" in r else r for r in rows]


def evaluate_teachers(config: Config, teachers: TeacherSet, data: Data, run_dir: Path | None = None) -> list[dict]:
    rows = _calibrated_on(data, evaluate_teacher_set(teachers, data.test, data.val, config.eval, data.device))
    if run_dir is not None and (run_dir / MANIFEST).is_file():
        times = {m["name"]: m.get("train_time_s") for m in json.loads((run_dir / MANIFEST).read_text())["members"]}
        for row in rows:
            if times.get(row["name"]) is not None:
                row["train_time_s"] = times[row["name"]]
    return rows
