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


def build_head(cfg, cond_channels: int, for_training: bool):
    """The head of the config (head.kind) on features of ``cond_channels``; see
    ``ddps.app.heads.build_head``."""
    return heads.build_head(cfg, *dataset_classes(cfg), cond_channels, for_training)


def save_run(directory: Path, cfg, segmentor, head_state: dict, ema_state: dict) -> None:
    tensors = {**checkpoint.prefixed(segmentor.state_dict(), "segmentor."),
               **checkpoint.prefixed(head_state, "head."), **checkpoint.prefixed(ema_state, "ema.")}
    checkpoint.save_weights(directory / "model.safetensors", tensors)
    checkpoint.atomic_write(directory / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())


def load_run(directory: str | Path, overrides=(), weights: str | None = None):
    """(cfg, segmentor, inference head) of a trained run directory (or of ``weights``), in eval mode."""
    directory = Path(directory)
    if not (directory / "config.yaml").exists():
        raise FileNotFoundError(f"{directory} is not a ddps run directory (no config.yaml)")
    base = yaml.safe_load((directory / "config.yaml").read_text())
    cfg = config_mod.load(None, overrides, base=base)
    source = weights or directory / "model.safetensors"
    tensors = checkpoint.load_weights(source)
    parts = sorted({key.split(".", 1)[0] for key in tensors})
    if "segmentor" not in parts or not {"head", "ema"} & set(parts):
        raise ValueError(f"{source}: holds {parts or 'no'} weights, not a run's whole model (segmentor.*, head.*, "
                         "ema.*): --weights takes a model file as ddps train writes it (RUN/model.safetensors); a "
                         "head-only file from ddps convert has no segmentor to run it with")
    segmentor = build_segmentor(cfg)
    segmentor.load_state_dict(checkpoint.unprefixed(tensors, "segmentor."))
    head = build_head(cfg, segmentor.feature_channels, for_training=False)
    ema = checkpoint.unprefixed(tensors, "ema.")
    head.load_trained(ema if cfg.eval.use_ema and ema else checkpoint.unprefixed(tensors, "head."))
    device = torch.device(cfg.device)
    return cfg, segmentor.to(device).eval(), head.to(device).eval()
