"""``head.kind: gss``: GSS's latent mask prior (``ddps.nn.GSSHead``): DALL-E's dVAE (released
weights converted by ``ddps convert --dalle``) or a maskige VQ autoencoder trained in the prior
stage, a conditioning network predicting its tokens, and nearest-colour or learned decoding."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ... import maskige
from ...nn import GSSHead, MaskigeVQ
from ...nn.dvae import DalleDVAE
from ...nn.vq import DOWNSAMPLING, check_codebook
from .. import checkpoint
from ..schema import DATASETS, HEADS, ConfigError, keyed, option


@dataclass
class GSSOptions:
    # the latent prior: vq (a VQ autoencoder trained on the labels in the prior stage) | dalle
    # (DALL-E's dVAE as GSS uses it, frozen: 8192 codes; needs dalle_weights)
    prior: str = option("vq", choices=("vq", "dalle"))
    dalle_weights: str | None = option(None)  # the dVAE's weights, from ddps convert --dalle
    # the VQ autoencoder's sizes, for the synthetic demo
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
    g = cfg.head.gss
    if (g.prior == "dalle") != bool(g.dalle_weights):
        raise ConfigError("head.gss.dalle_weights: the dalle prior needs its weights (a file from ddps convert --dalle)"
                          if g.prior == "dalle" else
                          f"head.gss.dalle_weights: {g.dalle_weights!r} is read only with head.gss.prior=dalle")
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
    if g.prior == "dalle":
        prior = DalleDVAE()
        if for_training:  # a trained run's weights hold the dVAE's
            prior.load_weights(checkpoint.load_weights(g.dalle_weights))
    else:
        prior = MaskigeVQ(g.codes, g.code_dim, g.channels)
    return GSSHead(num_classes, cond_channels, prior,
                   maskige.palette(num_classes, g.palette), dim=g.dim, decoder=decoder, backend=cfg.head.backend)


HEADS.register("gss", build, Options, check,
               weights=lambda cfg: {"head.gss.dalle_weights": cfg.head.gss.dalle_weights})
