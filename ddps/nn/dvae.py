"""DALL-E's discrete VAE (Ramesh et al., 2021), the frozen latent prior GSS uses: 8x downsampling to
a grid of codes out of 8192, and back, with pixels in the logit-Laplace parametrisation.

The architecture and its parameter names follow the released ``encoder.pkl`` and ``decoder.pkl``:
residual blocks (four convolutions on a quarter of the width, scaled by 1 / layers^2) in four
groups of ``blocks_per_group``, widths 1, 2, 4, 8 x ``hidden`` (the decoder: 8, 4, 2, 1 x), max
pooling down and nearest upsampling up. The released files are pickled modules;
``load_released`` reads them once, on request, into tensors to save as safetensors (``ddps
convert --dalle``); ``DalleDVAE.load_weights`` takes those.

Pixels map to [eps, 1 - eps] before the encoder (``map_pixels``) because the decoder's
logit-Laplace likelihood is defined on (0, 1); the decoder's first three channels, through a
sigmoid and back (``unmap_pixels``), are the image.
"""
from __future__ import annotations

import pickle
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .vq import check_codes, check_maskige

LOGIT_LAPLACE_EPS = 0.1
GROUPS = 4  # 2^(GROUPS - 1) = DOWNSAMPLING


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [eps, 1 - eps], linearly."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x: torch.Tensor) -> torch.Tensor:
    """The inverse of ``map_pixels``, clamped to [0, 1]."""
    return ((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS)).clamp(0, 1)


class _Block(nn.Module):
    """x -> id_path(x) + res_path(x) / layers^2; ``kernels``: the res path's four kernel sizes."""

    def __init__(self, cin: int, cout: int, layers: int, kernels: tuple[int, int, int, int]):
        super().__init__()
        widths = (cin, cout // 4, cout // 4, cout // 4, cout)
        self.id_path = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        path = []
        for i, k in enumerate(kernels):
            path += [(f"relu_{i + 1}", nn.ReLU()), (f"conv_{i + 1}", nn.Conv2d(widths[i], widths[i + 1], k,
                                                                                 padding=k // 2))]
        self.res_path = nn.Sequential(OrderedDict(path))
        self.post_gain = 1 / layers ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _groups(widths: list[int], first: int, per_group: int, kernels, resample) -> list:
    """[("group_1", ...), ...]: group g's blocks widen to widths[g]; ``resample`` follows every group but
    the last."""
    layers, groups, cin = GROUPS * per_group, [], first
    for g, width in enumerate(widths):
        blocks = []
        for i in range(per_group):
            blocks.append((f"block_{i + 1}", _Block(cin, width, layers, kernels)))
            cin = width
        if g < GROUPS - 1:
            blocks.append(resample())
        groups.append((f"group_{g + 1}", nn.Sequential(OrderedDict(blocks))))
    return groups


class DalleDVAE(nn.Module):
    """Maskige [B, 3, H, W] in [0, 1] (H, W multiples of 8) <-> codes [B, H/8, W/8] in [0, codes).
    ``encode``: the argmax of the encoder's logits; ``decode``: the decoder's image. The released
    model: ``DalleDVAE()`` (8192 codes, hidden 256, 2 blocks per group, 128 input channels to the
    decoder); frozen in GSS, so it has no loss here."""

    def __init__(self, codes: int = 8192, hidden: int = 256, blocks_per_group: int = 2, decoder_input: int = 128):
        super().__init__()
        self.codes = codes
        up = [8 * hidden, 4 * hidden, 2 * hidden, hidden]
        self.encoder = nn.Sequential(OrderedDict([("blocks", nn.Sequential(OrderedDict([
            ("input", nn.Conv2d(3, hidden, 7, padding=3)),
            *_groups(up[::-1], hidden, blocks_per_group, (3, 3, 3, 1), lambda: ("pool", nn.MaxPool2d(2))),
            ("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", nn.Conv2d(8 * hidden, codes, 1))]))),
        ])))]))
        self.decoder = nn.Sequential(OrderedDict([("blocks", nn.Sequential(OrderedDict([
            ("input", nn.Conv2d(codes, decoder_input, 1)),
            *_groups(up, decoder_input, blocks_per_group, (1, 3, 3, 3),
                     lambda: ("upsample", nn.Upsample(scale_factor=2, mode="nearest"))),
            ("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", nn.Conv2d(hidden, 6, 1))]))),
        ])))]))

    def logits(self, maskige: torch.Tensor) -> torch.Tensor:
        """The encoder's logits over the codes, [B, codes, H/8, W/8]."""
        check_maskige(maskige)
        return self.encoder(map_pixels(maskige.float()))

    def encode(self, maskige: torch.Tensor) -> torch.Tensor:
        """-> codes int64 [B, H/8, W/8]."""
        return self.logits(maskige).argmax(1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes int [B, h, w] -> maskige [B, 3, 8h, 8w] in [0, 1]."""
        check_codes(codes, self.codes)
        blocks = self.decoder.blocks
        # the input 1x1 convolution of a one-hot code is its weight column: a lookup, not a
        # [B, 8192, h, w] product
        weight = blocks.input.weight[:, :, 0, 0]
        x = F.embedding(codes.long(), weight.t()).movedim(-1, 1) + blocks.input.bias[:, None, None]
        for name, module in blocks.named_children():
            if name != "input":
                x = module(x)
        return unmap_pixels(torch.sigmoid(x[:, :3]))

    def load_weights(self, tensors: dict) -> None:
        """The tensors ``load_released`` gives (or this module's state_dict); a ValueError names what
        does not fit."""
        try:
            missing, unexpected = self.load_state_dict(tensors, strict=False)
        except RuntimeError as e:  # torch reports shape mismatches as RuntimeError
            raise ValueError(f"dVAE weights do not fit: {e}") from None
        if missing or unexpected:
            raise ValueError(f"dVAE weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")


class _ReleasedUnpickler(pickle.Unpickler):
    """Unpickles DALL-E's released modules without the dall_e package and without running any
    callable a pickle names beyond torch's storage rebuilds and the module containers: each
    dall_e class becomes a bare nn.Module that only holds the parameters and children it is given."""

    ALLOWED = {("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
               ("torch._utils", "_rebuild_parameter"), ("torch", "FloatStorage"), ("torch", "HalfStorage"),
               ("torch.nn.modules.container", "Sequential"), ("torch.nn.modules.activation", "ReLU"),
               ("torch.nn.modules.pooling", "MaxPool2d"), ("torch.nn.modules.upsampling", "Upsample"),
               ("torch.nn.modules.linear", "Identity"), ("torch", "device"), ("torch", "float32"), ("builtins", "set"),
               ("__builtin__", "set"), ("torch._utils", "_rebuild_parameter_with_state")}

    def find_class(self, module: str, name: str):
        if module.startswith("dall_e."):
            return type(name, (nn.Module,), {})
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"the file names {module}.{name}, which a released DALL-E dVAE does not hold")


class _ReleasedPickle:
    Unpickler = _ReleasedUnpickler
    load = pickle.load


def load_released(encoder_path, decoder_path) -> dict:
    """DALL-E's released encoder.pkl and decoder.pkl -> the state_dict of ``DalleDVAE()``
    ("encoder.blocks...weight", ...). Unpickles them under ``_ReleasedUnpickler``'s list."""
    tensors = {}
    for part, path in (("encoder", encoder_path), ("decoder", decoder_path)):
        module = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_ReleasedPickle)
        if not isinstance(module, nn.Module):
            raise ValueError(f"{path}: holds a {type(module).__name__}, not DALL-E's {part}")
        for key, value in module.state_dict().items():
            stem, leaf = key.rsplit(".", 1)
            tensors[f"{part}.{stem}.{ {'w': 'weight', 'b': 'bias'}[leaf]}"] = value.detach().float()
    return tensors
