"""The config schema: YAML plus `key=value` overrides, validated before any work.

Configs are data. Every section refuses unknown keys, so a typo fails at once with
a message that names the key. The defaults are the demo: digits, three small CNN
teachers, a half-width student.
"""

from __future__ import annotations

import difflib
import os
import reprlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config that cannot run; the message is one sentence naming the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AugmentConfig(_Section):
    """Keys left unset (None) take the dataset's default: giving flip alone keeps its crop_padding."""

    crop_padding: int | None = Field(None, ge=0)
    flip: bool | None = None


class ViewsConfig(_Section):
    """Views of image folders and tar shards (data/crops.py) and seeded mixing (data/mixing.py, any images)."""

    train: Literal["rrc", "crop_flip", "none"] | None = None  # None: rrc when streamed, else crop_flip
    size: int = Field(224, gt=0)  # streamed images: the side of every view
    scale: tuple[float, float] = (0.08, 1.0)  # rrc: the range of the crop's area, as a fraction of the image's
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # rrc: the range of the crop's aspect ratio
    flip: bool = True  # rrc: mirror half of the views
    crop_fraction: float = Field(0.875, gt=0.0, le=1.0)  # eval: shorter side resized to size / crop_fraction
    mixup_alpha: float = Field(0.0, ge=0.0)  # Beta(a, a) of mixup's ratio; 0: no mixup
    cutmix_alpha: float = Field(0.0, ge=0.0)  # Beta(a, a) of CutMix's ratio; 0: no CutMix
    mix_prob: float = Field(1.0, ge=0.0, le=1.0)  # the chance that a training sample mixes

    @model_validator(mode="after")
    def _ranges(self) -> ViewsConfig:
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must be [lo, hi] with 0 < lo <= hi <= 1, got {list(self.scale)}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must be [lo, hi] with 0 < lo <= hi, got {list(self.ratio)}")
        return self


class DataConfig(_Section):
    name: str = "digits"
    root: str | None = None
    num_classes: int | None = Field(None, gt=0)  # youtube8m: the label vocabulary (default 3862)
    max_frames: int = Field(300, gt=0)  # youtube8m: frames kept of each video
    # video: frames drawn per video in training (seeded by seed, epoch, index); None: all; eval: all
    frames_per_video: int | None = Field(None, gt=0)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    split_seed: int = 0
    view_seed: int | None = None  # training order and views; None: the trained model's seed
    batch_size: int = Field(64, gt=0)
    eval_batch_size: int = Field(1024, gt=0)
    augment: AugmentConfig | None = None  # None: the dataset's default
    storage: Literal["auto", "memory", "stream"] = "auto"  # image folders, tar shards: see data/storage.py
    views: ViewsConfig = Field(default_factory=ViewsConfig)
    # streamed data: decoding processes per loader (0: in the main process); default 4, or the cores if fewer
    workers: int = Field(default_factory=lambda: min(4, os.cpu_count() or 1), ge=0)
    prefetch: int = Field(2, gt=0)  # streamed data: batches each worker prepares ahead
    mean: list[float] | None = None  # per channel, 0..1 scale; None: computed (in memory) or estimated (streamed)
    std: list[float] | None = None
    on_decode_error: Literal["stop", "skip"] = "stop"  # streamed: stop naming the file, or substitute and count
    decoder: Literal["pil", "torchvision"] = "pil"  # streamed: what decodes images (data/decode.py)
    draft: bool = False  # streamed, pil: JPEGs decoded at 1/2..1/8 scale where the view keeps its pixels


class OptimConfig(_Section):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0.0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0.0)
    milestones: list[float] = Field(default_factory=lambda: [0.5, 0.75])  # fractions of training
    gamma: float = Field(0.1, gt=0.0)


class TrainConfig(_Section):
    epochs: int = Field(10, gt=0)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    grad_clip: float | None = Field(None, gt=0.0)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 (fp16 + GradScaler before Ampere) on CUDA, fp32 on CPU
    channels_last: bool | None = None  # None: on CUDA
    compile: bool = False  # torch.compile the model's training forward
    checkpoint_every: int = Field(0, ge=0)  # steps; 0: at the end of each epoch only
    log_every: int = Field(20, gt=0)


class ModelConfig(_Section):
    arch: str = "small_cnn"  # ours, timm/<name>, torchvision/<name>, package.module:function or a plugin's
    kwargs: dict[str, Any] = Field(default_factory=dict)
    seed: int = 0
    weights: str | None = None  # a local .safetensors/.pt/.pth file loaded after building
    pretrained: bool = False  # the library's own weights (timm's hub cache, torchvision's weight enums)

    @model_validator(mode="after")
    def _no_class_count_in_kwargs(self) -> ModelConfig:
        for key in ("num_classes", "in_channels"):
            if key in self.kwargs:
                raise ValueError(f"'{key}' comes from the dataset; remove it from kwargs")
        if self.weights is not None and self.pretrained:
            raise ValueError("set weights (a local file) or pretrained (the library's), not both")
        return self


class InputConfig(_Section):
    """The input a teacher was trained on, when it is not the data's normalisation: `library: true`
    takes the library's config for its weights (timm's pretrained_cfg, torchvision's transforms); keys
    given here override it; `size: null` keeps the data's size."""

    library: bool | None = None  # None: true for a pretrained member (its library's weights), else false
    mean: list[float] | None = None
    std: list[float] | None = None
    size: int | list[int] | None = None


class TeacherMemberConfig(ModelConfig):
    input: InputConfig | None = None  # None: the library's for pretrained: true, else the data's


class TeachersConfig(_Section):
    """Members are listed, or made from arch + count with seeds seed, seed+1, ..."""

    members: list[TeacherMemberConfig] | None = None  # with weights (or pretrained) each and no source: loaded as they are
    arch: str = "small_cnn"
    kwargs: dict[str, Any] = Field(default_factory=dict)
    count: int = Field(3, gt=0)
    seed: int = 0
    train: TrainConfig = Field(default_factory=TrainConfig)
    source: str | None = None  # a train-teachers run directory to read members from
    take: int | None = Field(None, gt=0)  # use only the first `take` members of teachers.source (e.g. DE-4 of 5)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # inference; auto: bf16 on CUDA
    fold_bn: bool = True
    compile: bool = False  # torch.compile the frozen teachers
    cache: str | None = None  # a cache-teachers directory: distill reads teacher logits from it, loads no teacher
    allow_other_data: bool = False  # teachers trained on another dataset (name, classes, size) are refused unless set

    def resolved_members(self) -> list[TeacherMemberConfig]:
        if self.members is not None:
            return list(self.members)
        return [TeacherMemberConfig(arch=self.arch, kwargs=dict(self.kwargs), seed=self.seed + i)
                for i in range(self.count)]

    @model_validator(mode="after")
    def _members_not_empty(self) -> TeachersConfig:
        if self.members is not None and not self.members:
            raise ValueError("teachers.members is empty; list at least one member or drop it")
        return self


DEFAULT_STUDENT_KWARGS = {"width": 0.5}  # of the default student, small_cnn


class StudentConfig(ModelConfig):
    arch: str = "small_cnn"
    kwargs: dict[str, Any] = Field(default_factory=lambda: dict(DEFAULT_STUDENT_KWARGS))
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="before")
    @classmethod
    def _default_kwargs_go_with_the_default_arch(cls, data: Any) -> Any:
        """`student: {arch: timm/resnet18}` builds resnet18 with no kwargs, not with small_cnn's width; the
        default arch's kwargs given in part (`student.kwargs.dropout=0.1`) keep its default width."""
        if not isinstance(data, dict):
            return data
        if data.get("arch", "small_cnn") != "small_cnn":
            return data if "kwargs" in data else {**data, "kwargs": {}}
        if isinstance(data.get("kwargs"), dict):
            return {**data, "kwargs": {**DEFAULT_STUDENT_KWARGS, **data["kwargs"]}}
        return data


class MethodConfig(_Section):
    name: str = "ce"
    options: dict[str, Any] = Field(default_factory=dict)  # the options of `name`
    per_method: dict[str, dict[str, Any]] = Field(default_factory=dict)  # {method: options}, for any method

    def options_for(self, method: str) -> dict[str, Any]:
        """A method's options: `options` when it is `name`, then its own `per_method` entry on top."""
        return {**(self.options if method == self.name else {}), **self.per_method.get(method, {})}


class PerturbConfig(_Section):
    """Input perturbations for distillation (perturbations/): they need online teachers."""

    kind: Literal["none", "gaussian", "ods", "confods", "tdiv_sdiv"] = "none"
    step: float = Field(1.0, gt=0.0)  # in units of 1/255
    fraction: float = Field(1.0, gt=0.0, le=1.0)  # of each batch, replaced by perturbed copies
    temperature: float | None = Field(None, gt=0.0)  # ODS's softmax temperature; None: the method's (else 1)


class CacheConfig(_Section):
    """What `cache-teachers` stores: logits of `epochs` epochs of training views (later epochs wrap)."""

    epochs: int = Field(1, gt=0)
    dtype: Literal["float16", "float32"] = "float16"
    top_k: int | None = Field(None, gt=0)  # keep the k largest logits per teacher; lossy, see ensemble/cache.py
    dir: str | None = None  # where to write it; default runs/<run.name or cache-<time>>
    shard_size: int = Field(65536, gt=0)  # samples per shard file; a killed build redoes at most one shard per rank


class EvalConfig(_Section):
    cost: bool = True
    latency: bool = False  # batch-1 timing: minutes on a busy CPU, and noisy there; measure on a quiet machine
    throughput_batch: int = Field(256, gt=0)
    corruptions: bool = False  # accuracy/NLL/ECE under 8 corruptions x 5 severities (evaluation/robustness.py)
    ood: str | None = None  # a second dataset's test split as out-of-distribution inputs (AUROC)
    ood_root: str | None = None
    corruption_samples: int = Field(2000, gt=0)  # test images used by both
    eval_batch_size: int = Field(500, gt=0)


class SweepConfig(_Section):
    """Variants (name -> overrides) x student seeds, summarised as mean and spread."""

    seeds: list[int] = Field(default_factory=lambda: [0])
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _seeds_not_empty(self) -> SweepConfig:
        if not self.seeds:
            raise ValueError("sweep.seeds is empty; list at least one seed")
        return self


def folder_name_problem(name: str) -> str | None:
    """Why `name` is not one safe folder name (None: it is): it must stay inside the folder it is made in."""
    if name in ("", ".", ".."):
        return f"{name!r} names no folder of its own"
    if any(c in name for c in ("/", "\\", "\0")):
        return f"{name!r} is a path, not one folder name (no '/', '\\' or NUL)"
    return None


class RunConfig(_Section):
    dir: str = "runs"  # where runs go
    name: str | None = None  # the run's folder in run.dir: one folder name, never a path

    @field_validator("name")
    @classmethod
    def _one_folder(cls, name: str | None) -> str | None:
        problem = None if name is None else folder_name_problem(name)
        if problem:
            raise ValueError(f"{problem}; give the run's folder name here and where it goes in run.dir")
        return name


class MlflowConfig(_Section):
    uri: str | None = None  # None: MLflow's default (MLFLOW_TRACKING_URI, else its local store)
    experiment: str = "ensemble-kd"


class LoggingConfig(_Section):
    """Runs mirrored to experiment trackers (engine/tracking.py), rank 0 only; off by default."""

    tensorboard: bool = False  # event files in the run directory's tensorboard/
    mlflow: MlflowConfig | None = None  # {uri, experiment}: one MLflow run per run directory

    @model_validator(mode="after")
    def _installed(self):
        import importlib.util

        for wanted, module, extra in ((self.tensorboard, "tensorboard", "tensorboard"),
                                      (self.mlflow is not None, "mlflow", "mlflow")):
            if wanted and importlib.util.find_spec(module) is None:
                raise ValueError(f"logging.{extra} needs the '{module}' package; install it with "
                                 f"pip install 'ensemble-kd[{extra}]', or turn logging.{extra} off")
        return self


class Config(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    teachers: TeachersConfig = Field(default_factory=TeachersConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    perturb: PerturbConfig = Field(default_factory=PerturbConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    device: str = "auto"


# --------------------------------------------------------------------------- loading

def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b.0.c=value' -> (['a', 'b', '0', 'c'], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        return key.split("."), yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:  # `lr=[`, a `!!python/object` tag: as the same mistake in a file
        raise ConfigError(f"override '{_shown(text)}' has a value that is not valid YAML: "
                          f"{_yaml_problem(err)}") from None


def apply_override(tree: dict, path: list[str], value: Any) -> None:
    node: Any = tree
    for i, part in enumerate(path[:-1]):
        where = ".".join(path[: i + 1])
        if isinstance(node, list):
            node = node[_list_index(node, part, where)]
            continue
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"config key '{where}' is a value, not a section")
    last = path[-1]
    if isinstance(node, list):
        node[_list_index(node, last, ".".join(path))] = value
    else:
        node[last] = value


def _list_index(node: list, part: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"config key '{where}' needs an index below {len(node)}")
    return int(part)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or the defaults), apply overrides, validate."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file '{path}' is not valid YAML: {_yaml_problem(err)}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections")
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(tree, keys, value)
    return validate_config(tree)


def validate_config(tree: dict) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_one_sentence(err)) from None


def _one_sentence(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    if first["type"] == "extra_forbidden":
        section, _, key = where.rpartition(".")
        known = _known_keys(section)
        hint = difflib.get_close_matches(key, known, n=1)
        also = f"; did you mean '{hint[0]}'?" if hint else f"; known keys: {', '.join(known)}"
        return f"config key '{where}' is not a known option{also}"
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (got {_shown(_REPR.repr(value))})"
    message = first["msg"].removeprefix("Value error, ").rstrip(".")
    return f"config key '{where}': {message}{shown}"


SHOWN_CHARS = 80  # of a value echoed in a message: a YAML alias bomb expands to megabytes


_REPR = reprlib.Repr()  # a nested value shown to a few levels and items, never expanded whole
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring = 3, 4, 4, SHOWN_CHARS


def _shown(text: str) -> str:
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}..."


def _yaml_problem(err: yaml.YAMLError) -> str:
    """The parser's complaint on one line: its problem and where, without the echoed source lines."""
    problem = getattr(err, "problem", None)
    mark = getattr(err, "problem_mark", None)
    if problem is None:
        return " ".join(str(err).split())
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"{problem}{where}"


def _known_keys(section: str) -> list[str]:
    model: type[BaseModel] = Config
    for part in [p for p in section.split(".") if p and not p.isdigit()]:
        field = model.model_fields.get(part)
        inner = _section_type(field.annotation) if field else None
        if inner is None:
            return []
        model = inner
    return sorted(model.model_fields)


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _section_type(arg)
        if found is not None:
            return found
    return None


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
