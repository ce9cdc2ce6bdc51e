"""``head.kind: gss``: GSS's latent mask prior (``ddps.nn.GSSHead``): DALL-E's dVAE (released
weights converted by ``ddps convert --dalle``) or a maskige VQ autoencoder trained in the prior
stage; GSS's conditioning network on the backbone's levels, trained end to end with the backbone,
or a small one on the frozen segmentor's features; nearest-colour decoding (GSS-FF) or GSS-FT-W's
decoder, trained after the conditioning network on its predictions."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ... import maskige
from ...nn import GSSHead, MaskigeVQ
from ...nn.dvae import DalleDVAE
from ...nn.gss import FrozenFeatureConditioning, FTWDecoder, GSSConditioning
from ...nn.vq import DOWNSAMPLING, check_codebook
from .. import checkpoint
from ..schema import DATASETS, HEADS, SEGMENTORS, ConfigError, keyed, option


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
    # the conditioning network: gss (GSS's, on the segmentor's levels, training its backbone end
    # to end) | frozen-features (three conv blocks on the frozen segmentor's features, width dim)
    conditioning: str = option("gss", choices=("gss", "frozen-features"))
    dim: int = option(64, minimum=1)        # the frozen-features network's width
    # GSS's network: per-level width, fused width, width before the token classifier, Swin blocks
    fusion_channels: list[int] = option([384, 512, 2048], minimum=1, length=3)
    swin: list[int] = option([16, 2, 7], minimum=1, length=3)  # heads, depth, window
    # gss-cityscapes | gss-ade20k (GSS's, for 19 and 150 classes) | spread | grid (computed for any
    # number of classes); see ddps.maskige.palette
    palette: str = option("spread", choices=maskige.KINDS)
    # nearest (GSS-FF) | learned (GSS-FT-W's decoder, trained in the decoder stage, after the head)
    decoder: str = option("nearest", choices=("nearest", "learned"))
    decoder_swin: list[int] = option([128, 4, 1, 7], minimum=1, length=4)  # FT-W: width, heads, depth, window


@dataclass
class Options:
    gss: GSSOptions = dataclasses.field(default_factory=GSSOptions)


def check(cfg) -> None:
    g = cfg.head.gss
    if (g.prior == "dalle") != bool(g.dalle_weights):
        raise ConfigError("head.gss.dalle_weights: the dalle prior needs its weights (a file from ddps convert --dalle)"
                          if g.prior == "dalle" else
                          f"head.gss.dalle_weights: {g.dalle_weights!r} is read only with head.gss.prior=dalle")
    if g.palette in maskige.GSS_PALETTES:
        try:
            maskige.palette(DATASETS[cfg.data.dataset].classes(cfg)[0], g.palette)
        except ValueError as e:
            raise ConfigError(f"head.gss.palette: {e} (dataset {cfg.data.dataset}); spread and grid fit any") from None
    with keyed({"codes": "head.gss.codes", "dim": "head.gss.code_dim"}):
        check_codebook(g.codes, g.code_dim)
    if any(v % DOWNSAMPLING for v in cfg.data.crop_size):
        raise ConfigError(f"data.crop_size: {cfg.data.crop_size}: the gss head's VQ autoencoder trains on "
                          f"multiples of {DOWNSAMPLING}")
    if takes_levels(cfg):
        if not getattr(SEGMENTORS[cfg.segmentor.type], "levels", False):
            raise ConfigError(f"head.gss.conditioning: gss fuses the backbone's levels, which segmentor.type "
                              f"{cfg.segmentor.type} does not give (compact does); or choose frozen-features")
        if cfg.eval.use_ema:
            raise ConfigError("eval.use_ema: head.gss.conditioning=gss trains the backbone with the head, and the "
                              "moving average covers the head alone; set eval.use_ema=false")
        if cfg.train.cache_features:
            raise ConfigError("train.cache_features: head.gss.conditioning=gss trains the backbone, whose features "
                              "change at every step")
    if g.fusion_channels[1] % g.swin[0]:
        raise ConfigError(f"head.gss.swin: {g.swin[0]} heads do not divide the fused width {g.fusion_channels[1]}")
    if g.decoder_swin[0] % g.decoder_swin[1]:
        raise ConfigError(f"head.gss.decoder_swin: {g.decoder_swin[1]} heads do not divide the width "
                          f"{g.decoder_swin[0]}")


def takes_levels(cfg) -> bool:
    return cfg.head.gss.conditioning == "gss"


def build(cfg, num_classes: int, ignore_index: int, cond_channels, for_training: bool) -> GSSHead:
    """``cond_channels``: the features' channels, or (GSS's conditioning) each level's."""
    g = cfg.head.gss
    width, heads, depth, window = g.decoder_swin
    decoder = FTWDecoder(num_classes, width, heads, depth, window) if g.decoder == "learned" else None
    if g.prior == "dalle":
        prior = DalleDVAE()
        if for_training:  # a trained run's weights hold the dVAE's
            prior.load_weights(checkpoint.load_weights(g.dalle_weights))
    else:
        prior = MaskigeVQ(g.codes, g.code_dim, g.channels)
    if takes_levels(cfg):
        channels, fused, before = g.fusion_channels
        heads, depth, window = g.swin
        conditioning = GSSConditioning(list(cond_channels), prior.codes, num_classes, channels, fused, before, heads,
                                       depth, window)
    else:
        conditioning = FrozenFeatureConditioning(cond_channels, prior.codes, num_classes, g.dim)
    return GSSHead(num_classes, prior, maskige.palette(num_classes, g.palette), conditioning, decoder=decoder,
                   backend=cfg.head.backend)


HEADS.register("gss", build, Options, check, takes_levels=takes_levels,
               weights=lambda cfg: {"head.gss.dalle_weights": cfg.head.gss.dalle_weights})
