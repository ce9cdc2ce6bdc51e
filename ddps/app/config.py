"""Run configuration: YAML files with ``key=value`` command-line overrides, validated against the
dataclasses below. An unknown key or a value of the wrong type is a ``ConfigError`` naming the
key (``train.lr``), never a silent default. The sections of the plug-in kinds (data, segmentor,
head) gain each plug-in's own keys from its registry entry (``ddps.app.schema``).

Not OmegaConf's structured configs, which do the same merge of typed overrides over YAML: in
omegaconf 2.4.0 (tried on these sections) a value of another type is converted silently ('5' to
an int, 1 or 'yes' to True, 5 to the string '5') where it must be an error naming the key, and
"${...}" in any string (a path, a class prompt) is read as an interpolation.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from .._backend import MODULE_BACKENDS
from ..nn.head import MODES
from ..ops._common import DTYPES
from .data import DATASETS  # each package registers its plug-ins as it is imported
from .heads import HEADS
from .schema import ConfigError, check_constraints, option
from .segmentors import SEGMENTORS

__all__ = ["Config", "ConfigError", "changes", "eval_datasets", "find", "flatten", "load"]


@dataclass
class DataBase:
    dataset: str = option("synthetic-shapes", choices=DATASETS.names())
    root: str | None = None
    train_split: str = "training"
    val_split: str = "validation"
    scale: list[int] = option([128, 128], length=2, minimum=1)  # (long, short) side bounds of the resize
    ratio_range: list[float] = option([0.5, 2.0], length=2, above=0)
    crop_size: list[int] = option([128, 128], length=2, minimum=1)
    cat_max_ratio: float = option(0.75, above=0, maximum=1)
    flip_prob: float = option(0.5, minimum=0, maximum=1)
    photometric: bool = True
    workers: int = option(0, minimum=0)
    # rare-class sampling (DAFormer's, DIFF's recipe; ddps/app/data/rcs.py): a class drawn by its
    # rarity (softmax((1 - pixel share) / rcs_class_temp)), an image with > rcs_min_pixels of it,
    # crops redrawn until > rcs_min_pixels * rcs_min_crop_ratio of them are in it
    rcs: bool = False
    rcs_class_temp: float = option(0.01, above=0)
    rcs_min_pixels: int = option(3000, minimum=0)
    rcs_min_crop_ratio: float = option(0.5, minimum=0, maximum=1)


@dataclass
class StageConfig:
    """What a training stage reads: its length, its batch (over ``accumulate`` micro-steps),
    AdamW's settings, and its LR schedule: a linear warm-up from lr * warmup_ratio over
    warmup_iters steps (null: min(50, iters // 10)) of the policy's LR: ``step``, x lr_gamma at
    each of lr_steps; ``poly``, lr * (1 - step / iters) ** lr_power (mmcv's, min_lr 0)."""
    iters: int = option(1000, minimum=1)
    batch_size: int = option(8, minimum=1)
    accumulate: int = option(1, minimum=1)
    # what torch's AdamW accepts, the learning rate above 0
    lr: float = option(1e-3, above=0)
    betas: list[float] = option([0.9, 0.999], length=2, minimum=0, below=1)
    weight_decay: float = option(0.01, minimum=0)
    warmup_iters: int | None = option(None, minimum=0)
    warmup_ratio: float = option(0.1, minimum=0, maximum=1)
    lr_steps: list[int] = option([], minimum=1)
    lr_gamma: float = option(0.1, above=0)
    lr_policy: str = option("step", choices=("step", "poly"))
    lr_power: float = option(1.0, above=0)


@dataclass
class SegmentorBase(StageConfig):
    iters: int = option(300, minimum=0)  # 0: keep the initial / pretrained weights
    lr: float = 2e-3
    weight_decay: float = 1e-4
    head_lr_mult: float = option(1.0, above=0)  # x lr for the segmentor's decode head and classifier (DIFF: 10)
    type: str = option("compact", choices=SEGMENTORS.names())
    channels: int = option(32, minimum=1)  # the features' width (compact, segformer-mmseg, diffusion-features)
    pretrained: str | None = None  # segformer: local directory or hub id; diffusion-features: a diffusers
                                   # Stable-Diffusion folder or hub id (null: a tiny random one, for tests)
    checkpoint: str | None = None  # load these weights (safetensors) and skip segmentor training
    eval_interval: int = option(0, minimum=0)  # > 0: validation mIoU every N steps; the stage ends once it is flat
    plateau: float = option(0.5, minimum=0)    # flat: the last `patience` validation mIoUs (after the last of
                                   # lr_steps) within this many points
    patience: int = option(3, minimum=1)


@dataclass
class HeadBase:
    kind: str = option("ddps", choices=HEADS.names())
    backend: str = option("auto", choices=MODULE_BACKENDS)  # the kernels of the head's ops (ddps.backends())


@dataclass
class PriorConfig(StageConfig):
    # the stage between the segmentor and the head that trains a head's mask prior on the labels
    # alone (gss: its VQ autoencoder); heads without one skip it
    iters: int = option(800, minimum=0)
    lr: float = 2e-3


@dataclass
class DecoderConfig(StageConfig):
    # the stage after the head that trains a decoder on the head's predictions (gss with
    # head.gss.decoder=learned: GSS-FT-W's); heads without one skip it
    iters: int = option(400, minimum=0)
    lr: float = 7.5e-4  # GSS-FT-W's on Cityscapes


@dataclass
class TrainConfig(StageConfig):
    # the head stage's (the original's schedule), and the checkpoints and logs of every stage
    lr: float = 1.5e-4
    betas: list[float] = option([0.9, 0.96], length=2)
    weight_decay: float = 0.045
    warmup_iters: int | None = option(100, minimum=0)
    warmup_ratio: float = 1e-6
    ema_momentum: float = option(0.01, minimum=0, maximum=1)  # the EMA's weight of the new value
    ema_interval: int = option(25, minimum=1)
    amp: str = option("none", choices=("none", "bf16"))  # bf16: the head's forward and backward under autocast
    cache_features: bool = False   # keep the frozen segmentor's outputs per training image: the head stage's
                                   # images then go without augmentation (the segmentor stage keeps it)
    checkpoint_interval: int = option(200, minimum=1)
    keep_last: int = option(2, minimum=1)
    log_interval: int = option(20, minimum=1)
    progress: bool = True


@dataclass
class EvalConfig:
    num_timesteps: int = option(20, minimum=1)
    inference_steps: int = option(2, minimum=1)
    guidance_scale: float = option(0.4, unbounded=True)
    collect_timesteps: list[int] = option([0, 10, 19], minimum=0)
    # renoise (free re-noising, the original's) | posterior (guidance_scale 1)
    sampling: str = option("renoise", choices=MODES)
    # stop sampling an image once fewer than this fraction of its pixels changed label in a step
    # (0: never, the original's loop; benchmarks/FRONTIER.md gives what it saves and costs)
    stop_below: float = option(0.0, library=True)
    mode: str = option("single", choices=("single", "ms-flip", "slide"))
    dtype: str = option("fp32", choices=tuple(DTYPES))  # the head samples under torch.autocast at this dtype
    scales: list[float] = option([0.5, 0.75, 1.0, 1.25, 1.5, 1.75], above=0)
    crop_size: list[int] = option([128, 128], length=2, minimum=1)   # slide
    stride: list[int] = option([96, 96], length=2, minimum=1)        # slide
    boundary_dilation: float = option(0.02, minimum=0)  # boundary band width as a fraction of the image diagonal
    use_ema: bool = True
    panels: int = option(4, minimum=0)  # PNG panels written by `ddps train`'s final evaluation
    # more held-out sets to evaluate beside data's (cross-domain evaluation): each a mapping of
    # data.* keys over the run's own (a nested section, such as synthetic, merged key by key) and
    # an optional name (default: its dataset); each needs the classes and ignore value of data's
    datasets: list[dict] = option([])


DataConfig = DATASETS.section(DataBase)
SegmentorConfig = SEGMENTORS.section(SegmentorBase)
HeadConfig = HEADS.section(HeadBase)


@dataclass
class Config:
    seed: int = option(0, minimum=-2 ** 63, maximum=2 ** 64 - 1)  # what torch.manual_seed takes
    device: str = "cpu"
    data: DataConfig = field(default_factory=DataConfig)
    segmentor: SegmentorConfig = field(default_factory=SegmentorConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_type(value, hint, key: str):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        return _check_type(value, next(a for a in args if a is not type(None)), key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float) and isinstance(value, bool) or not isinstance(value, hint):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (known keys of {prefix.rstrip('.') or 'the config'}: "
                          f"{', '.join(sorted(names))})")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(value, hint, prefix + name)
    return cls(**kwargs)


def _validate(cfg: Config, reads_data: bool = True) -> None:
    """Every problem of the config at once (a ConfigError with one line each); the plug-ins' own
    rules once each value is in its range."""
    problems = check_constraints(cfg) + _root_problems(cfg.data, "data", reads_data)
    dataset = DATASETS[cfg.data.dataset]
    d = cfg.data
    if d.ratio_range[0] > d.ratio_range[-1]:
        problems.append(f"data.ratio_range: [low, high] with low <= high, got {d.ratio_range}")
    for name in ("segmentor", "prior", "train", "decoder"):
        section = getattr(cfg, name)
        if section.lr_policy == "poly" and section.lr_steps:
            problems.append(f"{name}.lr_steps: {section.lr_steps}: steps of the LR belong to {name}.lr_policy=step, "
                            "not poly (set one or the other)")
    if problems:
        raise ConfigError(*problems)
    for entry in (dataset, SEGMENTORS[cfg.segmentor.type], HEADS[cfg.head.kind]):
        if entry.check is not None:
            try:
                entry.check(cfg)
            except ConfigError as e:
                problems += e.problems
    if problems:
        raise ConfigError(*problems)
    problems += _eval_dataset_problems(cfg, reads_data)
    if problems:
        raise ConfigError(*problems)


def _root_problems(data, key: str, reads_data: bool) -> list[str]:
    """A data section (named ``key``) of a dataset read from files, without its directory."""
    if reads_data and DATASETS[data.dataset].needs_root and data.root is None:
        return [f"{key}.root: dataset {data.dataset!r} needs its directory"]
    return []


def eval_datasets(cfg: Config) -> list[tuple[str, Config]]:
    """(name, the run's config with that data section) of each of ``eval.datasets``."""
    base, out = dataclasses.asdict(cfg.data), []
    for i, entry in enumerate(cfg.eval.datasets):
        values = dict(entry)
        name = values.pop("name", values.get("dataset", cfg.data.dataset))
        if not isinstance(name, str) or not name:
            raise ConfigError(f"eval.datasets[{i}].name: expected a non-empty string, got {name!r}")
        out.append((name, dataclasses.replace(cfg, data=_build(DataConfig, _merge(base, values), f"eval.datasets[{i}]."))))
    return out


def _eval_dataset_problems(cfg: Config, reads_data: bool) -> list[str]:
    try:
        entries = eval_datasets(cfg)
    except ConfigError as e:
        return list(e.problems)
    classes = DATASETS[cfg.data.dataset].classes(cfg)
    problems, names = [], set()
    for i, (name, sub) in enumerate(entries):
        key, dataset = f"eval.datasets[{i}]", DATASETS[sub.data.dataset]
        if name in names:
            problems.append(f"{key}.name: {name!r} names another of eval.datasets too")
        names.add(name)
        own = check_constraints(sub.data, f"{key}.") + _root_problems(sub.data, key, reads_data)
        if not own and dataset.check is not None:
            try:
                dataset.check(sub)
            except ConfigError as e:
                own += [p.replace("data.", f"{key}.", 1) for p in e.problems]
        theirs = None if own else dataset.classes(sub)
        if theirs is not None and theirs != classes:
            own.append(f"{key}: {sub.data.dataset!r} has {theirs[0]} classes with ignore value {theirs[1]}, the "
                       f"run's data {classes[0]} with {classes[1]}: a model predicts the classes it was trained on")
        problems += own
    return problems


def changes(old: Config, new: Config) -> dict:
    """{key: "key: old -> new"} for every key whose value differs between two configs."""
    before, after = flatten(old.to_dict()), flatten(new.to_dict())
    return {key: f"{key}: {before[key]!r} -> {value!r}" for key, value in after.items() if value != before[key]}


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def apply_override(values: dict, override: str) -> None:
    """``a.b=value`` into the nested dict ``values``; the value is read as YAML (``lr=1e-4``,
    ``dim_mults=[1,2]``, ``root=null``)."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} is not key=value")
    node = values
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
    try:
        node[leaf] = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: the value is not valid YAML ({e})") from None


def find(name: str) -> Path:
    """A config file, or the name of a shipped one (``synthetic``, ``ade20k``, ...)."""
    path = Path(name)
    # a folder of that name (a run directory called "synthetic") is not a config
    if path.is_file() or path.suffix in (".yaml", ".yml") and path.parent != Path("."):
        return path
    shipped = resources.files("ddps.configs") / f"{name.removesuffix('.yaml')}.yaml"
    return Path(str(shipped)) if shipped.is_file() else path


def shipped() -> list[str]:
    """The names of the shipped configs."""
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("ddps.configs").iterdir()
                  if p.name.endswith(".yaml"))


def load(path: str | Path | None = None, overrides=(), base: dict | None = None, reads_data: bool = True) -> Config:
    """The config of ``path`` (YAML) over ``base`` (a saved run's), with overrides applied.
    ``reads_data=False``: for a command that reads no dataset (``ddps convert``), whose location
    need not be given."""
    values = dict(base or {})
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config {path} is not valid YAML: {e}") from None
        values = _merge(values, loaded) if isinstance(loaded, dict) else loaded
    for override in overrides:
        apply_override(values, override)
    cfg = _build(Config, values, "")
    _validate(cfg, reads_data)
    return cfg


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
