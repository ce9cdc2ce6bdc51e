"""``head.kind: gss``: GSS's latent mask prior (``ddps.nn.GSSHead``): a maskige VQ autoencoder
trained in the prior stage, a conditioning network predicting its tokens, and nearest-colour or
learned decoding."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ... import maskige
from ...nn import GSSHead, MaskigeVQ
from ...nn.vq import DOWNSAMPLING, check_codebook
from ..schema import DATASETS, HEADS, ConfigError, keyed, option


@dataclass
class GSSOptions:
    # sized for the synthetic demo (GSS's dVAE has 8192 codes and a far wider network)
    codes: int = option(256, library=True)  # the VQ autoencoder's codebook size
    code_dim: int = option(16, minimum=1)   # the width of a code
    channels: int = option(32, minimum=1)   # the VQ autoencoder's width
    dim: int = option(64, minimum=1)        # the conditioning network's width
    # gss-cityscapes | gss-ade20k (GSS's, for 19 and 150 classes) | spread | grid (computed for any
    # number of classes); see ddps.maskige.palette
    palette: str = option("spread", choices=maskige.KINDS)
    # nearest (GSS-FF) | learned (GSS-FT-W, trained in the prior stage)
    decoder: str = option("nearest", choices=("nearest", "learned"))


@dataclass
class Options:
    gss: GSSOptions = dataclasses.field(default_factory=GSSOptions)


def check(cfg) -> None:
    if cfg.head.gss.palette in maskige.GSS_PALETTES:
        try:
            maskige.palette(DATASETS[cfg.data.dataset].classes(cfg)[0], cfg.head.gss.palette)
        except ValueError as e:
            raise ConfigError(f"head.gss.palette: {e} (dataset {cfg.data.dataset}); spread and grid fit any") from None
    with keyed({"codes": "head.gss.codes", "dim": "head.gss.code_dim"}):
        check_codebook(cfg.head.gss.codes, cfg.head.gss.code_dim)
    if any(v % DOWNSAMPLING for v in cfg.data.crop_size):
        raise ConfigError(f"data.crop_size: {cfg.data.crop_size}: the gss head's VQ autoencoder trains on "
                          f"multiples of {DOWNSAMPLING}")


def build(cfg, num_classes: int, ignore_index: int, cond_channels: int, for_training: bool) -> GSSHead:
    g = cfg.head.gss
    decoder = maskige.LearnedDecoder(num_classes) if g.decoder == "learned" else None
    return GSSHead(num_classes, cond_channels, MaskigeVQ(g.codes, g.code_dim, g.channels),
                   maskige.palette(num_classes, g.palette), dim=g.dim, decoder=decoder, backend=cfg.head.backend)


HEADS.register("gss", build, Options, check)
