"""Run configuration: YAML files with ``key=value`` command-line overrides, validated against the
dataclasses below. An unknown key or a value of the wrong type is a ``ConfigError`` naming the
key (``train.lr``), never a silent default."""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    pass


@dataclass
class SyntheticConfig:
    num_train: int = 512
    num_val: int = 64
    size: int = 128           # image height and width
    max_shapes: int = 4       # shapes per image: 1..max_shapes
    noise: float = 0.35       # amplitude of the background and shape texture noise
    seed: int | None = None   # the images' seed (null: the run's seed), fixed to compare runs of other seeds


@dataclass
class DataConfig:
    # synthetic-shapes | ade20k (151 classes, 0 = other, the original's) | ade20k-150 (reduce
    # zero label: 150 classes, 0 -> ignore) | cityscapes (labelTrainIds + 1, 255 -> 0) | folder
    dataset: str = "synthetic-shapes"
    root: str | None = None
    train_split: str = "training"
    val_split: str = "validation"
    num_classes: int | None = None     # folder only: the others know theirs
    ignore_index: int | None = None    # folder only (e.g. 255)
    scale: list[int] = field(default_factory=lambda: [128, 128])  # (long, short) side bounds of the resize
    ratio_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    crop_size: list[int] = field(default_factory=lambda: [128, 128])
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    workers: int = 0
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class DiffConfig:
    # segmentor.type=diffusion-features (DIFF); the defaults are DIFF's for Stable Diffusion 2.1
    timesteps: list[int] = field(default_factory=lambda: [
        160, 139, 121, 105, 91, 80, 69, 60, 52, 45, 40, 34, 30, 26, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13, 12, 11,
        10, 9, 8, 7, 6, 5, 4, 3, 2, 1])
    save_steps: list[int] = field(default_factory=lambda: [33, 29, 25, 22, 18, 14, 11, 7, 3])  # inversion steps kept
    resnets: list[list[int]] | None = None     # [up block, index] pairs (null: all but the first block's)
    attentions: list[list[int]] | None = None  # [up block, index] pairs of transformer blocks (null: likewise)
    # widths per captured stride, fine to coarse
    projection: list[int] = field(default_factory=lambda: [512, 1024, 2048, 2048])
    projection_x4: int = 256       # the 1/4 level of the fused pyramid
    eta: float = 0.0               # DDIM inversion noise (DIFF's config: 1.0), for eta_range[0] < t < eta_range[1]
    eta_range: list[float] = field(default_factory=lambda: [10.0, 250.0])
    dtype: str = "auto"            # the frozen model's: auto (float16 on cuda, else float32) | float32 |
                                   # float16 | bfloat16
    ipkl: bool = False             # train with IPKL's class-prompted branch too
    ipkl_weight: float = 1.0       # IPKL: weight of the MSE between the two branches' logits
    guidance_scale: float = 5.0    # IPKL: the class prompts' classifier-free guidance
    class_prompts: list[str] = field(default_factory=list)  # IPKL: one per class ("": none)


@dataclass
class SegmentorConfig:
    type: str = "compact"          # compact | segformer | segformer-mmseg (the original's, from ddps convert) |
                                   # diffusion-features (DIFF)
    channels: int = 32             # compact: feature channels; segformer-mmseg, diffusion-features: the head's
    pretrained: str | None = None  # segformer: local directory or hub id; diffusion-features: a diffusers
                                   # Stable-Diffusion folder or hub id (null: a tiny random one, for tests)
    variant: str = "b2"            # segformer-mmseg: the MiT backbone, b0..b5
    classifier_classes: int | None = None  # segformer-mmseg: the classes of its own classifier (null: none)
    checkpoint: str | None = None  # load these weights (safetensors) and skip segmentor training
    iters: int = 300               # segmentor training steps (0: keep the initial / pretrained weights)
    eval_interval: int = 0         # > 0: validation mIoU every N steps; the stage ends once it is flat
    plateau: float = 0.5           # flat: the last `patience` validation mIoUs (after the last of
                                   # lr_steps) within this many points
    patience: int = 3
    batch_size: int = 8
    lr: float = 2e-3
    lr_steps: list[int] = field(default_factory=list)  # steps at which the LR is multiplied by 0.1
    weight_decay: float = 1e-4
    diff: DiffConfig = field(default_factory=DiffConfig)


@dataclass
class GSSConfig:
    # sized for the synthetic demo (GSS's dVAE has 8192 codes and a far wider network)
    codes: int = 256               # the VQ autoencoder's codebook size
    code_dim: int = 16             # the width of a code
    channels: int = 32             # the VQ autoencoder's width
    dim: int = 64                  # the conditioning network's width
    palette: str = "spread"        # spread | grid (GSS's); see ddps.maskige.palette
    decoder: str = "nearest"       # nearest (GSS-FF) | learned (GSS-FT-W, trained in the prior stage)


@dataclass
class HeadConfig:
    kind: str = "ddps"             # ddps | refine (the control: same network, no diffusion) | gss
    noise_source: str = "first_prediction"  # first_prediction (the original) | ground_truth
    transition: str = "uniform"    # uniform (the original) | absorbing | mask_and_replace
    dim: int = 32
    dim_mults: list[int] = field(default_factory=lambda: [1, 2, 2])
    embed_dim: int = 16
    num_timesteps: int = 100
    schedule: str = "linear"
    dropout_ratio: float = 0.1
    cond_dropout: float = 0.0
    backend: str = "auto"
    gss: GSSConfig = field(default_factory=GSSConfig)   # head.kind=gss


@dataclass
class PriorConfig:
    # the stage between the segmentor and the head that trains a head's mask prior on the labels
    # alone (gss: its VQ autoencoder, and the learned decoder); heads without one skip it
    iters: int = 800
    batch_size: int = 8
    lr: float = 2e-3


@dataclass
class TrainConfig:
    iters: int = 1000
    batch_size: int = 8
    accumulate: int = 1            # gradient accumulation: batch_size samples per micro-step
    lr: float = 1.5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.96])
    weight_decay: float = 0.045
    warmup_iters: int = 100
    warmup_ratio: float = 1e-6
    lr_steps: list[int] = field(default_factory=list)  # steps at which the LR is multiplied by lr_gamma
    lr_gamma: float = 0.1
    ema_momentum: float = 0.01
    ema_interval: int = 25
    amp: str = "none"              # none | bf16: the head stage's forward and backward under autocast
    cache_features: bool = False   # head stage: keep the frozen segmentor's outputs per training image (needs
                                   # images that repeat: no augmentation)
    checkpoint_interval: int = 200
    keep_last: int = 2
    log_interval: int = 20
    progress: bool = True


@dataclass
class EvalConfig:
    num_timesteps: int = 20
    inference_steps: int = 2
    guidance_scale: float = 0.4
    collect_timesteps: list[int] = field(default_factory=lambda: [0, 10, 19])
    sampling: str = "renoise"      # renoise (free re-noising, the original's) | posterior (guidance_scale 1)
    mode: str = "single"           # single | ms-flip | slide
    dtype: str = "fp32"            # fp32 | bf16 | fp16: the head samples under torch.autocast at this dtype
    scales: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5, 1.75])
    crop_size: list[int] = field(default_factory=lambda: [128, 128])   # slide
    stride: list[int] = field(default_factory=lambda: [96, 96])        # slide
    boundary_dilation: float = 0.02  # boundary band width as a fraction of the image diagonal
    use_ema: bool = True
    panels: int = 4                # PNG panels written by `ddps train`'s final evaluation


@dataclass
class Config:
    seed: int = 0
    device: str = "cpu"
    data: DataConfig = field(default_factory=DataConfig)
    segmentor: SegmentorConfig = field(default_factory=SegmentorConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "data.dataset": ("synthetic-shapes", "ade20k", "ade20k-150", "cityscapes", "folder"),
    "segmentor.type": ("compact", "segformer", "segformer-mmseg", "diffusion-features"),
    "segmentor.diff.dtype": ("auto", "float32", "float16", "bfloat16"),
    "segmentor.variant": ("b0", "b1", "b2", "b3", "b4", "b5"),
    "head.kind": ("ddps", "refine", "gss"),
    "head.gss.palette": ("spread", "grid"),
    "head.gss.decoder": ("nearest", "learned"),
    "head.noise_source": ("first_prediction", "ground_truth"),
    "head.transition": ("uniform", "absorbing", "mask_and_replace"),
    "head.schedule": ("linear", "cos"),
    "eval.sampling": ("renoise", "posterior"),
    "head.backend": ("reference", "auto", "cpu", "cuda", "triton"),
    "train.amp": ("none", "bf16"),
    "eval.mode": ("single", "ms-flip", "slide"),
    "eval.dtype": ("fp32", "bf16", "fp16"),
}
POSITIVE = {"data.synthetic.num_train", "data.synthetic.num_val", "data.synthetic.size", "data.synthetic.max_shapes",
            "segmentor.channels", "segmentor.batch_size", "segmentor.patience", "head.dim", "head.embed_dim", "head.num_timesteps",
            "train.iters", "train.batch_size", "train.accumulate", "train.ema_interval", "train.checkpoint_interval",
            "train.keep_last", "train.log_interval", "eval.num_timesteps", "eval.inference_steps", "head.gss.code_dim",
            "head.gss.channels", "head.gss.dim", "prior.batch_size"}


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
    flat = flatten(cfg.to_dict())
    for key, choices in CHOICES.items():
        if flat[key] not in choices:
            raise ConfigError(f"{key}: {flat[key]!r} is not one of {choices}")
    for key in POSITIVE:
        if flat[key] < 1:
            raise ConfigError(f"{key}: must be >= 1, got {flat[key]}")
    for key in ("data.scale", "data.crop_size", "data.ratio_range", "eval.crop_size", "eval.stride", "train.betas"):
        if len(flat[key]) != 2:
            raise ConfigError(f"{key}: expected two values, got {flat[key]}")
    if reads_data and cfg.data.dataset != "synthetic-shapes" and cfg.data.root is None:
        raise ConfigError(f"data.root: dataset {cfg.data.dataset!r} needs its directory")
    s = cfg.segmentor
    if s.type == "segformer-mmseg" and s.classifier_classes is None and s.iters > 0 and not s.checkpoint:
        raise ConfigError("segmentor.iters: a segformer-mmseg segmentor without a classifier "
                          "(segmentor.classifier_classes: null) cannot be trained; set segmentor.checkpoint to a "
                          "converted run's model.safetensors, or segmentor.iters=0")
    if s.type == "diffusion-features":
        _validate_diff(cfg)
    d = cfg.data
    if cfg.train.cache_features and (d.ratio_range != [1.0, 1.0] or d.flip_prob > 0 or d.photometric):
        raise ConfigError("train.cache_features: the cache keeps one output per training image, so the images must "
                          "repeat: set data.ratio_range=[1.0,1.0], data.flip_prob=0 and data.photometric=false (got "
                          f"{d.ratio_range}, {d.flip_prob}, {d.photometric})")
    if cfg.head.kind == "gss":
        if cfg.head.gss.codes < 2:
            raise ConfigError(f"head.gss.codes: a codebook needs at least 2 codes, got {cfg.head.gss.codes}")
        if cfg.prior.iters < 0:
            raise ConfigError(f"prior.iters: must be >= 0, got {cfg.prior.iters}")
        if any(v % 8 for v in cfg.data.crop_size):
            raise ConfigError(f"data.crop_size: {cfg.data.crop_size}: the gss head's VQ autoencoder trains on "
                              "multiples of 8")
    if cfg.data.dataset == "folder" and cfg.data.num_classes is None:
        raise ConfigError("data.num_classes: the folder dataset needs its number of classes")
    e = cfg.eval
    if e.sampling == "posterior" and e.guidance_scale != 1:
        raise ConfigError(f"eval.guidance_scale: {e.guidance_scale} with eval.sampling=posterior, which the original "
                          "runs without guidance; set eval.guidance_scale=1.0")
    bad = [c for c in e.collect_timesteps if not 0 <= c < e.num_timesteps]
    if bad:
        raise ConfigError(f"eval.collect_timesteps: {bad} outside [0, eval.num_timesteps={e.num_timesteps})")
    from .nn.head import inference_timesteps, unvisited
    never = unvisited(e.collect_timesteps, e.num_timesteps, e.inference_steps)
    if never:
        raise ConfigError(f"eval.collect_timesteps: {never} never run with eval.num_timesteps={e.num_timesteps} and "
                          f"eval.inference_steps={e.inference_steps}; the steps that run are "
                          f"{inference_timesteps(e.num_timesteps, e.inference_steps)}")


def _validate_diff(cfg: Config) -> None:
    # the timesteps and layers are checked against the model itself when it is built
    d = cfg.segmentor.diff
    for key in ("resnets", "attentions"):
        pairs = getattr(d, key)
        if pairs is not None and any(len(p) != 2 for p in pairs):
            raise ConfigError(f"segmentor.diff.{key}: {pairs}: expected [up block, index] pairs")
    if d.eta < 0 or len(d.eta_range) != 2:
        raise ConfigError(f"segmentor.diff.eta: {d.eta} with eta_range {d.eta_range}: expected eta >= 0 and two bounds")
    if any(p < 1 for p in d.projection) or d.projection_x4 < 1:
        raise ConfigError(f"segmentor.diff.projection: {d.projection}, projection_x4 {d.projection_x4}: "
                          "widths must be >= 1")
    if d.ipkl:
        from .model import dataset_classes
        k, _ = dataset_classes(cfg)
        if len(d.class_prompts) != k or not any(d.class_prompts):
            raise ConfigError(f"segmentor.diff.class_prompts: IPKL needs one prompt per class ({k}, \"\" for none, "
                              f"at least one given), got {len(d.class_prompts)}")


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
