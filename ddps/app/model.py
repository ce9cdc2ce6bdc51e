"""A model = a segmentor plus a mask head on its features, built from a run config, and the run
directory's files (``config.yaml``, ``model.safetensors``) that ``ddps eval``/``segment`` read."""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

from . import checkpoint, config as config_mod, heads, segmentors
from .schema import DATASETS


def dataset_classes(cfg) -> tuple[int, int]:
    """(K, ignore_index) of the configured dataset, without reading it."""
    return DATASETS[cfg.data.dataset].classes(cfg)


def build_segmentor(cfg) -> segmentors.Segmentor:
    return segmentors.build_segmentor(cfg, dataset_classes(cfg)[0])


def build_head(cfg, cond_channels: int, for_training: bool, level_channels: tuple[int, ...] = ()):
    """The head of the config (head.kind) on features of ``cond_channels`` (or levels of
    ``level_channels``); see ``ddps.app.heads.build_head``."""
    return heads.build_head(cfg, *dataset_classes(cfg), cond_channels, for_training, level_channels)


def save_run(directory: Path, cfg, segmentor, head_state: dict, ema_state: dict) -> None:
    tensors = {**checkpoint.prefixed(segmentor.state_dict(), "segmentor."),
               **checkpoint.prefixed(head_state, "head."), **checkpoint.prefixed(ema_state, "ema.")}
    checkpoint.save_weights(directory / "model.safetensors", tensors)
    checkpoint.atomic_write(directory / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())


# What the overrides of a trained run (ddps eval, segment) may change: how it is evaluated, and where;
# every other key either shaped its weights (head.dim) or only says how it was trained (train.lr).
TRAINED_RUN_FREE = ("eval.", "device", "seed", "head.backend", "data.root", "data.val_split", "data.workers")
TRAINED_RUN_FREE_TEXT = ", ".join(key + "*" if key.endswith(".") else key for key in TRAINED_RUN_FREE)
# Changes that leave a trained part unused instead of changing one: {key: (trained value, new value)}.
# A GSS-FT-W run decoded by nearest colour is its GSS-FF, GSS's training-free decoder of the same model.
TRAINED_RUN_DROPS = {"head.gss.decoder": ("learned", "nearest")}
TRAINED_RUN_DROPS_TEXT = "head.gss.decoder from learned to nearest (a GSS-FT-W run decoded as its GSS-FF)"


def run_config(directory: str | Path, overrides=()) -> config_mod.Config:
    """The config of a trained run directory, with ``overrides`` of what ``TRAINED_RUN_FREE`` allows."""
    directory = Path(directory)
    if not (directory / "config.yaml").is_file():
        raise FileNotFoundError(f"{directory} is not a ddps run directory (no config.yaml)")
    stored = config_mod.load(None, (), base=yaml.safe_load((directory / "config.yaml").read_text()), reads_data=False)
    cfg = config_mod.load(None, overrides, base=stored.to_dict())
    before, after = config_mod.flatten(stored.to_dict()), config_mod.flatten(cfg.to_dict())
    fixed = [text for key, text in config_mod.changes(stored, cfg).items() if not key.startswith(TRAINED_RUN_FREE)
             and TRAINED_RUN_DROPS.get(key) != (before[key], after[key])]
    if fixed:
        raise config_mod.ConfigError(*(f"{text}: {directory} was trained with the old value, which its weights "
                                       f"keep; an override of a trained run may change {TRAINED_RUN_FREE_TEXT}, "
                                       f"and {TRAINED_RUN_DROPS_TEXT}" for text in fixed))
    return cfg


def load_run(directory: str | Path, overrides=(), weights: str | None = None, cfg=None):
    """(cfg, segmentor, inference head) of a trained run directory (or of ``weights``), in eval
    mode; ``cfg``: its ``run_config``, where the caller has it."""
    directory = Path(directory)
    cfg = cfg or run_config(directory, overrides)
    source = weights or directory / "model.safetensors"
    tensors = checkpoint.load_weights(source)
    parts = sorted({key.split(".", 1)[0] for key in tensors})
    if "segmentor" not in parts or not {"head", "ema"} & set(parts):
        raise ValueError(f"{source}: holds {parts or 'no'} weights, not a run's whole model (segmentor.*, head.*, "
                         "ema.*): --weights takes a model file as ddps train writes it (RUN/model.safetensors); a "
                         "head-only file from ddps convert has no segmentor to run it with")
    segmentor = build_segmentor(cfg)
    segmentor.load_state_dict(checkpoint.unprefixed(tensors, "segmentor."))
    head = build_head(cfg, segmentor.feature_channels, False, segmentor.level_channels)
    ema = checkpoint.unprefixed(tensors, "ema.")
    head.load_trained(ema if cfg.eval.use_ema and ema else checkpoint.unprefixed(tensors, "head."))
    device = torch.device(cfg.device)
    return cfg, segmentor.to(device).eval(), head.to(device).eval()
