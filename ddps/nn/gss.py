"""GSSHead: Generative Semantic Segmentation's latent mask prior (Chen et al., CVPR 2023) on a
frozen segmentor's features.

The mask is modelled in the discrete latent space of an autoencoder of maskiges: DALL-E's dVAE
(``ddps.nn.dvae.DalleDVAE``, frozen, as GSS) or a VQ autoencoder (``ddps.nn.vq.MaskigeVQ``)
trained on the labels before the head and frozen with it. A conditioning network maps
the features (1/4 of the image) to logits over the codebook for each token (1/8 of the image); it
learns from the tokens of the ground-truth maskige, whose unlabelled pixels are first filled with
the prediction of an auxiliary per-pixel classifier, and a token whose 8 x 8 block holds no
labelled pixel teaches nothing. Inference: the argmax token of each block, the VQ decoder, then the
maskige decoded to labels, by nearest colour (GSS-FF) or by a trained ``LearnedDecoder`` (GSS-FT-W).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import _backend, maskige, ops
from .dvae import DalleDVAE
from .mask_head import MaskHead
from .vq import DOWNSAMPLING, MaskigeVQ, conv_block

UNTAUGHT = -100  # the token target of a block without a labelled pixel


class GSSHead(MaskHead):
    """On the protocol of ``MaskHead``: ``loss(cond, labels, base=None, ignore_index=255)``: cond
    [B, C, h, w] features, labels [B, 4h, 4w] -> token_weight * token cross-entropy + aux_weight *
    the auxiliary pixel cross-entropy. ``sample(cond, base=None)`` -> (class scores [B, K, 4h, 4w]:
    one-hot from the nearest colour, or the learned decoder's logits; {}: no steps).
    ``trainable_parameters()``: the conditioning network and the auxiliary classifier.
    ``prior_parameters()``, ``prior_loss(labels, ignore_index)``: a VQ autoencoder (reconstruction
    and commitment; a dVAE stays as loaded) and the learned decoder (cross-entropy on the
    reconstructions), trained on the labels alone before the head, then frozen. ``vq``: the
    autoencoder, either. ``backend``: that of ``maskige_decode`` (see
    ``ddps.backends()``)."""

    size_multiple = 2  # the features' stride-2 step to the token grid
    metrics_name = "gss"

    def __init__(self, num_classes: int, cond_channels: int, vq: MaskigeVQ | DalleDVAE, colours: torch.Tensor, dim: int = 64,
                 decoder: maskige.LearnedDecoder | None = None, token_weight: float = 0.8, aux_weight: float = 0.2,
                 backend: str = "auto"):
        super().__init__()
        self.backend = _backend.check_module_backend(backend)
        maskige.check_palette(colours)
        if len(colours) != num_classes + 1:
            raise ValueError(f"the palette has {len(colours)} colours; {num_classes} classes need {num_classes + 1} "
                             "(the last one paints ignored pixels)")
        self.num_classes = num_classes
        self.token_weight, self.aux_weight = token_weight, aux_weight
        self.register_buffer("colours", colours.detach().float().clone())
        self.vq, self.decoder = vq, decoder
        self.tokens = nn.Sequential(conv_block(cond_channels, dim), conv_block(dim, dim, 2), conv_block(dim, dim),
                                    nn.Conv2d(dim, vq.codes, 1))
        self.aux = nn.Conv2d(cond_channels, num_classes, 1)

    def trainable_parameters(self) -> list:
        return [*self.tokens.parameters(), *self.aux.parameters()]

    def prior_parameters(self) -> list:
        trained = self.vq.parameters() if isinstance(self.vq, MaskigeVQ) else ()
        return [*trained, *(self.decoder.parameters() if self.decoder is not None else ())]

    def prior_loss(self, labels: torch.Tensor, ignore_index: int = maskige.IGNORE_INDEX) -> torch.Tensor:
        """A VQ autoencoder's loss on the labels' maskige (in training mode its codebook follows the
        encodings), plus the learned decoder's cross-entropy on the reconstruction."""
        painted = maskige.encode(labels, self.colours, ignore_index)
        if isinstance(self.vq, MaskigeVQ):
            reconstruction, _, loss = self.vq(painted)
        else:
            reconstruction, loss = self.vq.decode(self.vq.encode(painted)), 0.0
        if self.decoder is not None:
            logits = self.decoder(reconstruction.detach())
            loss = loss + F.cross_entropy(logits, labels, ignore_index=ignore_index)
        return loss

    def _check(self, cond: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        if cond.dim() != 4 or cond.shape[2] % self.size_multiple or cond.shape[3] % self.size_multiple:
            raise ValueError(f"cond must be [B, C, h, w] with h and w even, got shape {tuple(cond.shape)}")
        if labels is not None and (labels.dim() != 3 or labels.shape[0] != cond.shape[0]
                                   or tuple(labels.shape[1:]) != (4 * cond.shape[2], 4 * cond.shape[3])):
            raise ValueError(f"labels must be [B={cond.shape[0]}, {4 * cond.shape[2]}, {4 * cond.shape[3]}] (4x the "
                             f"features), got shape {tuple(labels.shape)}")

    @torch.no_grad()
    def reconstruct(self, labels: torch.Tensor, ignore_index: int = maskige.IGNORE_INDEX) -> torch.Tensor:
        """decode(VQ(encode(labels))): labels [B, H, W] through the prior's round trip (padded with
        ignore to a multiple of 8 and cropped back), each pixel decoded to its nearest class colour
        as ``sample`` decodes. Its mIoU against the labels is the prior's reconstruction quality."""
        h, w = labels.shape[-2:]
        padded = F.pad(labels, (0, -w % DOWNSAMPLING, 0, -h % DOWNSAMPLING), value=ignore_index)
        reconstruction = self.vq.decode(self.vq.encode(maskige.encode(padded, self.colours, ignore_index)))
        return self._nearest_class(reconstruction)[:, :h, :w]

    def _nearest_class(self, reconstruction: torch.Tensor) -> torch.Tensor:
        # the class colours only: a prediction never says "ignore"
        return ops.maskige_decode(reconstruction, self.colours[:self.num_classes],
                                  backend=_backend.preferred("maskige_decode", self.backend))

    @torch.no_grad()
    def token_targets(self, labels: torch.Tensor, filled: torch.Tensor,
                      ignore_index: int = maskige.IGNORE_INDEX) -> torch.Tensor:
        """The VQ tokens of ``filled`` (labels [B, H, W] with every pixel labelled), UNTAUGHT where
        the block of ``labels`` holds no labelled pixel."""
        codes = self.vq.encode(maskige.encode(filled, self.colours, ignore_index))
        labelled = F.max_pool2d((labels != ignore_index).float()[:, None], DOWNSAMPLING)[:, 0] > 0
        return codes.masked_fill(~labelled, UNTAUGHT)

    def loss(self, cond: torch.Tensor, labels: torch.Tensor, base: torch.Tensor | None = None,
             ignore_index: int = maskige.IGNORE_INDEX) -> torch.Tensor:
        self._check(cond, labels)
        aux = F.interpolate(self.aux(cond), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        filled = torch.where(labels == ignore_index, aux.detach().argmax(1), labels)
        targets = self.token_targets(labels, filled, ignore_index)
        # averaged over every element, the ignored ones counting as zero (mmseg's default, GSS's)
        token_loss = F.cross_entropy(self.tokens(cond).float(), targets, ignore_index=UNTAUGHT, reduction="none")
        aux_loss = F.cross_entropy(aux.float(), labels, ignore_index=ignore_index, reduction="none")
        return self.token_weight * token_loss.mean() + self.aux_weight * aux_loss.mean()

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, base: torch.Tensor | None = None):
        self._check(cond)
        reconstruction = self.vq.decode(self.tokens(cond).argmax(1))
        if self.decoder is not None:
            scores = self.decoder(reconstruction)
        else:
            scores = F.one_hot(self._nearest_class(reconstruction), self.num_classes).movedim(-1, 1).float()
        return scores, {}
