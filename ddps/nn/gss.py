"""GSSHead: Generative Semantic Segmentation's latent mask prior (Chen et al., CVPR 2023).

The mask is modelled in the discrete latent space of an autoencoder of maskiges: DALL-E's dVAE
(``ddps.nn.dvae.DalleDVAE``, frozen, as GSS) or a VQ autoencoder (``ddps.nn.vq.MaskigeVQ``)
trained on the labels before the head and frozen with it. A conditioning network maps the image's
features to logits over the codebook for each token, and an auxiliary branch to per-pixel class
logits:

- ``GSSConditioning``, GSS's own (``GenerativeSegHeadFF``): the backbone's levels, each through a
  1x1 convolution, resized to the 1/4 level and fused, two Swin blocks, a 1x1 convolution to 2048
  channels and one to the codebook; tokens at 1/4 of the image, so the maskige is the labels
  upsampled 2x (the autoencoder's 8x takes it to 1/4). GSS trains the backbone with it.
- ``FrozenFeatureConditioning``: three 3x3 blocks on a frozen segmentor's 1/4 features; tokens at
  1/8 of the image, the maskige at the labels' size.

Training: the tokens of the ground-truth maskige, whose unlabelled pixels are first filled with
the auxiliary prediction, and a token whose 8 x 8 block holds no labelled pixel teaches nothing;
0.8 token cross-entropy + 0.2 auxiliary cross-entropy, each averaged over all of its elements
(mmseg's default). Inference: the argmax token of each block, the autoencoder's decoder, then the
maskige decoded to labels, by nearest class colour (GSS-FF) or by ``FTWDecoder`` (GSS-FT-W),
trained after the conditioning network on the maskiges it predicts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import _backend, maskige, ops
from .dvae import DalleDVAE
from .mask_head import MaskHead
from .swin import SwinStack
from .vq import DOWNSAMPLING, MaskigeVQ, conv_block

UNTAUGHT = -100  # the token target of a block without a labelled pixel


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    """mmcv's ConvModule as GSS configures it: 1x1 convolution (no bias under a norm), BatchNorm, ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class GSSConditioning(nn.Module):
    """GSS's conditioning network. ``forward(levels)``: the backbone's feature maps, the first at
    1/4 of the image -> (token logits [B, codes, h, w], pixel logits [B, K, h, w]) at the first
    level's size. Sizes: GSS's (channels 384, fused 512, 2048 before the token classifier, Swin
    blocks of 16 heads and window 7, dropout 0.1 before the classifier)."""

    takes_levels = True
    maskige_scale = 2  # tokens at 1/4 of the image: the labels' maskige upsampled 2x
    size_multiple = 1

    def __init__(self, in_channels: list[int], codes: int, num_classes: int, channels: int = 384,
                 seg_channels: int = 512, cls_channels: int = 2048, heads: int = 16, depth: int = 2, window: int = 7,
                 dropout: float = 0.1):
        super().__init__()
        self.convs = nn.ModuleList(conv_bn_relu(c, channels) for c in in_channels)
        self.fusion = conv_bn_relu(channels * len(in_channels), seg_channels)
        self.swin = SwinStack(seg_channels, heads, window, depth, mlp=2 * seg_channels)
        self.before_classifier = conv_bn_relu(seg_channels, cls_channels)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(cls_channels, codes, 1)
        self.pixel_convs = nn.ModuleList(conv_bn_relu(c, channels) for c in in_channels)
        self.pixel_fusion = conv_bn_relu(channels * len(in_channels), channels)
        self.pixel_classifier = nn.Conv2d(channels, num_classes, 1)

    @staticmethod
    def _fuse(levels, convs, fusion):
        size = levels[0].shape[-2:]
        return fusion(torch.cat([F.interpolate(conv(x), size=size, mode="bilinear", align_corners=False)
                                 for conv, x in zip(convs, levels)], 1))

    def token_logits(self, levels: list[torch.Tensor]) -> torch.Tensor:
        x = self.before_classifier(self.swin(self._fuse(levels, self.convs, self.fusion)))
        return self.classifier(self.dropout(x))

    def pixel_logits(self, levels: list[torch.Tensor]) -> torch.Tensor:
        return self.pixel_classifier(self._fuse(levels, self.pixel_convs, self.pixel_fusion))

    def forward(self, levels: list[torch.Tensor]):
        return self.token_logits(levels), self.pixel_logits(levels)


class FrozenFeatureConditioning(nn.Module):
    """A small conditioning network on a frozen segmentor's features [B, C, h, w] (h, w even):
    (token logits [B, codes, h/2, w/2], pixel logits [B, K, h, w])."""

    takes_levels = False
    maskige_scale = 1
    size_multiple = 2  # the stride-2 step to the token grid

    def __init__(self, cond_channels: int, codes: int, num_classes: int, dim: int = 64):
        super().__init__()
        self.tokens = nn.Sequential(conv_block(cond_channels, dim), conv_block(dim, dim, 2), conv_block(dim, dim),
                                    nn.Conv2d(dim, codes, 1))
        self.aux = nn.Conv2d(cond_channels, num_classes, 1)

    def token_logits(self, cond: torch.Tensor) -> torch.Tensor:
        return self.tokens(cond)

    def pixel_logits(self, cond: torch.Tensor) -> torch.Tensor:
        return self.aux(cond)

    def forward(self, cond: torch.Tensor):
        return self.token_logits(cond), self.pixel_logits(cond)


class FTWDecoder(nn.Module):
    """GSS-FT-W's learnt inverse of a maskige: 1x1 convolution, BatchNorm and ReLU to ``dim``,
    ``depth`` Swin blocks (window 7, relative position bias), LayerNorm, 1x1 convolution to class
    logits. maskige [B, 3, H, W] -> logits [B, K, H, W]."""

    def __init__(self, num_classes: int, dim: int = 128, heads: int = 4, depth: int = 1, window: int = 7):
        super().__init__()
        self.projection = conv_bn_relu(3, dim)
        self.swin = SwinStack(dim, heads, window, depth, mlp=2 * dim)
        self.classifier = nn.Conv2d(dim, num_classes, 1)

    def forward(self, maskige: torch.Tensor) -> torch.Tensor:
        if maskige.dim() != 4 or maskige.shape[1] != 3:
            raise ValueError(f"maskige must be [B, 3, H, W], got shape {tuple(maskige.shape)}")
        return self.classifier(self.swin(self.projection(maskige.float())))


class GSSHead(MaskHead):
    """On the protocol of ``MaskHead``: ``loss(cond, labels, base=None, ignore_index=255)``: cond
    (the conditioning network's input: features, or the backbone's levels), labels [B, H, W] ->
    0.8 token + 0.2 auxiliary cross-entropy. ``sample(cond, base=None)`` -> (class scores at the
    maskige's size: one-hot from the nearest colour, or the decoder's logits; {}: no steps).
    ``trainable_parameters()``: the conditioning network. ``prior_parameters()``,
    ``prior_loss(labels, ignore_index)``: a VQ autoencoder (reconstruction and commitment),
    trained on the labels alone before the head, then frozen (a dVAE stays as loaded).
    ``decoder_parameters()``, ``decoder_loss(cond, labels, base, ignore_index)``: the FT-W decoder,
    trained after the head on its predicted maskiges. ``vq``: the autoencoder, either kind.
    ``backend``: that of ``maskige_decode`` (see ``ddps.backends()``)."""

    metrics_name = "gss"

    def __init__(self, num_classes: int, vq: MaskigeVQ | DalleDVAE, colours: torch.Tensor, conditioning: nn.Module,
                 decoder: FTWDecoder | None = None, token_weight: float = 0.8, aux_weight: float = 0.2,
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
        self.vq, self.conditioning, self.decoder = vq, conditioning, decoder
        self.takes_levels, self.size_multiple = conditioning.takes_levels, conditioning.size_multiple
        self.scale = conditioning.maskige_scale

    def trainable_parameters(self) -> list:
        return list(self.conditioning.parameters())

    def prior_parameters(self) -> list:
        return list(self.vq.parameters()) if isinstance(self.vq, MaskigeVQ) else []

    def prior_loss(self, labels: torch.Tensor, ignore_index: int = maskige.IGNORE_INDEX) -> torch.Tensor:
        """The VQ autoencoder's loss on the labels' maskige (in training mode its codebook follows
        the encodings)."""
        return self.vq(self._maskige(labels, ignore_index))[2]

    def decoder_parameters(self) -> list:
        return [] if self.decoder is None else list(self.decoder.parameters())

    def load_trained(self, state: dict) -> None:
        """As ``MaskHead.load_trained``; without a decoder, a GSS-FT-W model's decoder weights are
        left out: the model decoded by nearest colour is its GSS-FF (GSS's two decoders of one
        model; FT-W's stage trains the decoder alone)."""
        if self.decoder is None:
            state = {k: v for k, v in state.items() if not k.startswith("decoder.")}
        super().load_trained(state)

    def decoder_loss(self, cond, labels: torch.Tensor, base: torch.Tensor | None = None,
                     ignore_index: int = maskige.IGNORE_INDEX) -> torch.Tensor:
        """GSS-FT-W's loss: the decoder's logits on the maskige the frozen conditioning network
        predicts, resized to the labels (bilinear), cross-entropy averaged over all pixels."""
        self._check(cond, labels)
        training = self.conditioning.training
        self.conditioning.eval()  # its predictions as sampled
        with torch.no_grad():
            predicted = self._predicted_maskige(cond)
        self.conditioning.train(training)
        logits = F.interpolate(self.decoder(predicted), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none").mean()

    def _predicted_maskige(self, cond) -> torch.Tensor:
        return self.vq.decode(self.conditioning.token_logits(cond).argmax(1))  # the argmax token of each block

    def _first(self, cond) -> torch.Tensor:
        return cond[0] if self.takes_levels else cond

    def _check(self, cond, labels: torch.Tensor | None = None) -> None:
        if self.takes_levels != isinstance(cond, (list, tuple)):
            raise ValueError("cond must be " + ("the backbone's levels, a list of [B, C, h, w] (the first at 1/4 of "
                                                "the image)" if self.takes_levels else "one [B, C, h, w] tensor"))
        first, m = self._first(cond), self.size_multiple
        if first.dim() != 4 or first.shape[2] % m or first.shape[3] % m:
            raise ValueError(f"cond must be [B, C, h, w] with h and w multiples of {m}, got shape {tuple(first.shape)}")
        if labels is not None and (labels.dim() != 3 or labels.shape[0] != first.shape[0]
                                   or tuple(labels.shape[1:]) != (4 * first.shape[2], 4 * first.shape[3])):
            raise ValueError(f"labels must be [B={first.shape[0]}, {4 * first.shape[2]}, {4 * first.shape[3]}] (4x the "
                             f"features), got shape {tuple(labels.shape)}")

    def _upsampled(self, labels: torch.Tensor) -> torch.Tensor:
        # GSS resizes the one-hot labels bilinearly and takes the argmax: for a 2x upsampling the
        # nearest source pixel always carries 9/16 of the weight, so that is the nearest neighbour
        s = self.scale
        return labels if s == 1 else labels.repeat_interleave(s, -2).repeat_interleave(s, -1)

    def _maskige(self, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
        return maskige.encode(self._upsampled(labels), self.colours, ignore_index)

    @torch.no_grad()
    def reconstruct(self, labels: torch.Tensor, ignore_index: int = maskige.IGNORE_INDEX) -> torch.Tensor:
        """decode(autoencoder(encode(labels))): labels [B, H, W] through the prior's round trip at the
        head's maskige scale (padded with ignore to the token grid and cropped back), each pixel
        decoded to its nearest class colour and the maskige averaged back to the labels' size as
        the evaluation resizes scores. Its mIoU against the labels is the prior's reconstruction
        quality."""
        h, w = labels.shape[-2:]
        step = DOWNSAMPLING // self.scale
        padded = F.pad(labels, (0, -w % step, 0, -h % step), value=ignore_index)
        reconstruction = self.vq.decode(self.vq.encode(self._maskige(padded, ignore_index)))
        scores = self._one_hot(self._nearest_class(reconstruction))
        return F.avg_pool2d(scores, self.scale).argmax(1)[:, :h, :w]

    @torch.no_grad()
    def parts(self, cond) -> dict:
        """{"pixel branch": the auxiliary class logits at the first level's (or the features')
        size}: what the conditioning network predicts per pixel without the prior, so that an
        evaluation tells the prior's gain from the network's."""
        self._check(cond)
        return {"pixel branch": self.conditioning.pixel_logits(cond)}

    def _nearest_class(self, reconstruction: torch.Tensor) -> torch.Tensor:
        # the class colours only: a prediction never says "ignore"
        return ops.maskige_decode(reconstruction, self.colours[:self.num_classes],
                                  backend=_backend.preferred("maskige_decode", self.backend))

    def _one_hot(self, classes: torch.Tensor) -> torch.Tensor:
        return F.one_hot(classes, self.num_classes).movedim(-1, 1).float()

    @torch.no_grad()
    def token_targets(self, labels: torch.Tensor, filled: torch.Tensor,
                      ignore_index: int = maskige.IGNORE_INDEX) -> torch.Tensor:
        """The autoencoder's tokens of ``filled`` (labels [B, H, W] at the maskige's size with every
        pixel labelled), UNTAUGHT where the block of ``labels`` holds no labelled pixel."""
        codes = self.vq.encode(maskige.encode(filled, self.colours, ignore_index))
        labelled = F.max_pool2d((labels != ignore_index).float()[:, None], DOWNSAMPLING)[:, 0] > 0
        return codes.masked_fill(~labelled, UNTAUGHT)

    def loss(self, cond, labels: torch.Tensor, base: torch.Tensor | None = None,
             ignore_index: int = maskige.IGNORE_INDEX) -> torch.Tensor:
        self._check(cond, labels)
        tokens, pixels = self.conditioning(cond)
        labels = self._upsampled(labels)
        aux = F.interpolate(pixels, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        filled = torch.where(labels == ignore_index, aux.detach().argmax(1), labels)
        targets = self.token_targets(labels, filled, ignore_index)
        # averaged over every element, the ignored ones counting as zero (mmseg's default, GSS's)
        token_loss = F.cross_entropy(tokens.float(), targets, ignore_index=UNTAUGHT, reduction="none")
        aux_loss = F.cross_entropy(aux.float(), labels, ignore_index=ignore_index, reduction="none")
        return self.token_weight * token_loss.mean() + self.aux_weight * aux_loss.mean()

    @torch.no_grad()
    def sample(self, cond, base: torch.Tensor | None = None):
        self._check(cond)
        reconstruction = self._predicted_maskige(cond)
        if self.decoder is not None:
            return self.decoder(reconstruction), {}
        return self._one_hot(self._nearest_class(reconstruction)), {}
