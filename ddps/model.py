"""A DDPS model = a segmentor plus a DDPS head on its features, built from a run config, and the
run directory's files (``config.yaml``, ``model.safetensors``) that ``ddps eval``/``segment`` read."""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

from . import checkpoint, config as config_mod, maskige
from .data import head_classes
from .nn import DDPSHead, RefinementHead
from .nn.gss import GSSHead
from .nn.vq import MaskigeVQ
from .nn.head import SCHEDULE_BUFFERS
from .segmentors import build_segmentor


def dataset_classes(cfg) -> tuple[int, int]:
    """(K, ignore_index) of the configured dataset, without reading it."""
    fixed = {"synthetic-shapes": (6, 255), "ade20k": (151, 0), "ade20k-150": (150, 255), "cityscapes": (20, 0)}
    if cfg.data.dataset in fixed:
        return fixed[cfg.data.dataset]
    return cfg.data.num_classes, 255 if cfg.data.ignore_index is None else cfg.data.ignore_index


def build_head(cfg, cond_channels: int, for_training: bool):
    """The head of the config (head.kind). DDPS heads: the training schedule (head.num_timesteps) or the inference one
    (eval.*; the original trains with T = 100 and samples with T = 20)."""
    h, e = cfg.head, cfg.eval
    k, ignore = dataset_classes(cfg)
    if h.kind == "gss":
        g = h.gss
        decoder = maskige.LearnedDecoder(k) if g.decoder == "learned" else None
        return GSSHead(k, cond_channels, MaskigeVQ(g.codes, g.code_dim, g.channels), maskige.palette(k, g.palette),
                       dim=g.dim, decoder=decoder)
    kind = RefinementHead if h.kind == "refine" else DDPSHead
    return kind(num_classes=head_classes(k, ignore), cond_channels=cond_channels, dim=h.dim, out_dim=h.dim,
                dim_mults=tuple(h.dim_mults), embed_dim=h.embed_dim,
                num_timesteps=h.num_timesteps if for_training else e.num_timesteps,
                inference_steps=e.inference_steps, collect_timesteps=() if for_training else e.collect_timesteps,
                guidance_scale=e.guidance_scale, schedule=h.schedule, mode=e.sampling, dropout_ratio=h.dropout_ratio,
                cond_dropout=h.cond_dropout, backend=h.backend, noise_source=h.noise_source, transition=h.transition)


def load_head_weights(head: DDPSHead, state: dict) -> None:
    """Trained weights into a head whose schedule may have another T: the schedule buffers are a
    function of (T, K, kind) and are the head's own, everything else must match."""
    weights = {k: v for k, v in state.items() if k not in SCHEDULE_BUFFERS}
    try:
        missing, unexpected = head.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # torch reports shape mismatches as RuntimeError
        raise ValueError(f"head weights do not fit the config: {e}") from None
    missing = [k for k in missing if k not in SCHEDULE_BUFFERS]
    if missing or unexpected:
        raise ValueError(f"head weights do not fit the config: missing {missing[:3]}, unexpected {unexpected[:3]}")


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
    k, _ = dataset_classes(cfg)
    segmentor = build_segmentor(cfg, k)
    segmentor.load_state_dict(checkpoint.unprefixed(tensors, "segmentor."))
    head = build_head(cfg, segmentor.feature_channels, for_training=False)
    ema = checkpoint.unprefixed(tensors, "ema.")
    load_head_weights(head, ema if cfg.eval.use_ema and ema else checkpoint.unprefixed(tensors, "head."))
    device = torch.device(cfg.device)
    return cfg, segmentor.to(device).eval(), head.to(device).eval()
