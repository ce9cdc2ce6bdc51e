"""``head.kind: ddps``: DDPS's diffusion head (``ddps.nn.DDPSHead``), the default."""
from __future__ import annotations

from dataclasses import dataclass

from ...nn import DDPSHead
from ...nn import head as head_mod
from ...schedule import KINDS as SCHEDULES, TRANSITIONS
from ..schema import HEADS, keyed, option

# DDPSHead's arguments and the config keys that give them (the inference head's schedule: eval.*)
KEYS = {"num_timesteps": "eval.num_timesteps", "inference_steps": "eval.inference_steps",
        "collect_timesteps": "eval.collect_timesteps", "guidance_scale": "eval.guidance_scale",
        "mode": "eval.sampling", "dropout_ratio": "head.dropout_ratio", "cond_dropout": "head.cond_dropout",
        "backend": "head.backend", "noise_source": "head.noise_source", "stop_below": "eval.stop_below"}


@dataclass
class Options:
    # what training noises: first_prediction (the original) | ground_truth (the naive integration)
    noise_source: str = option("first_prediction", choices=head_mod.NOISE_SOURCES)
    # the categorical noise: uniform (the original) | absorbing | mask_and_replace
    transition: str = option("uniform", choices=TRANSITIONS)
    dim: int = option(32, minimum=1)
    dim_mults: list[int] = option([1, 2, 2], minimum=1)
    embed_dim: int = option(16, minimum=1)
    num_timesteps: int = option(100, minimum=1)   # of training; eval.num_timesteps: of sampling
    schedule: str = option("linear", choices=SCHEDULES)
    dropout_ratio: float = option(0.1, library=True)
    cond_dropout: float = option(0.0, library=True)


def head_classes(num_classes: int, ignore_index: int) -> int:
    """Classes of the DDPS head's diffusion. Where the ignore value is a class (the original's
    0 = other) the diffusion treats it like any other; otherwise ignored pixels get an extra
    class K, which no loss and no metric counts."""
    return num_classes if 0 <= ignore_index < num_classes else num_classes + 1


def arguments(cfg, num_classes: int, ignore_index: int, cond_channels: int, for_training: bool) -> dict:
    """DDPSHead's arguments from the config."""
    h, e = cfg.head, cfg.eval
    return dict(num_classes=head_classes(num_classes, ignore_index), cond_channels=cond_channels, dim=h.dim,
                out_dim=h.dim, dim_mults=tuple(h.dim_mults), embed_dim=h.embed_dim,
                num_timesteps=h.num_timesteps if for_training else e.num_timesteps,
                inference_steps=e.inference_steps, collect_timesteps=() if for_training else e.collect_timesteps,
                guidance_scale=e.guidance_scale, schedule=h.schedule, mode=e.sampling,
                dropout_ratio=h.dropout_ratio, cond_dropout=h.cond_dropout, backend=h.backend,
                noise_source=h.noise_source, transition=h.transition, stop_below=e.stop_below)


def check(cfg) -> None:
    """DDPSHead's own rules, for the head that samples (the training one has no steps to collect)."""
    args = arguments(cfg, 1, 0, 1, for_training=False)
    with keyed(KEYS):
        head_mod.check_arguments(**{k: args[k] for k in KEYS})


def build(cfg, num_classes: int, ignore_index: int, cond_channels: int, for_training: bool) -> DDPSHead:
    return DDPSHead(**arguments(cfg, num_classes, ignore_index, cond_channels, for_training))


HEADS.register("ddps", build, Options, check)
