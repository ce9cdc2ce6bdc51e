"""A VQ autoencoder for maskiges (GSS's latent mask prior): 8x downsampling to a grid of codes from
a learnt codebook, and back.

GSS uses the frozen DALL-E dVAE (8192 codes, 8x downsampling); no pretrained weights reach this
machine, so ddps trains its own on the dataset's masks (the ``prior`` stage of ``ddps train``). The
codebook learns by exponential moving averages of the encodings assigned to each code (no gradient),
and a code that goes unused is restarted at a random encoding of the batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import _checks

DOWNSAMPLING = 8


def check_codebook(codes: int, dim: int) -> None:
    """A codebook's size and width, checked (an ``ArgumentError`` naming the one that is wrong)."""
    if codes < 2:
        raise _checks.ArgumentError("codes", f"a codebook needs at least 2 codes, got {codes}")
    if dim < 1:
        raise _checks.ArgumentError("dim", f"a code needs a width of at least 1, got {dim}")


class VectorQuantizer(nn.Module):
    """Nearest-code quantisation with an EMA codebook. ``forward(z [B, dim, h, w])`` -> (quantised z
    with a straight-through gradient, codes int64 [B, h, w], commitment loss). In training mode it
    also updates the codebook (under torch.distributed, from every rank's encodings)."""

    def __init__(self, codes: int, dim: int, decay: float = 0.99, eps: float = 1e-5, dead_below: float = 0.03):
        super().__init__()
        check_codebook(codes, dim)
        self.decay, self.eps, self.dead_below = decay, eps, dead_below
        self.register_buffer("codebook", torch.randn(codes, dim) * 0.1)
        self.register_buffer("usage", torch.ones(codes))  # EMA of the encodings per code
        self.register_buffer("sums", self.codebook.clone())  # EMA of their sum

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        flat = z.movedim(1, -1).reshape(-1, z.shape[1]).float()
        distance = flat.square().sum(1, keepdim=True) - 2 * flat @ self.codebook.t() + self.codebook.square().sum(1)
        return distance.argmin(1).view(z.shape[0], *z.shape[2:])

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes int [B, h, w] -> [B, dim, h, w]."""
        return F.embedding(codes, self.codebook).movedim(-1, 1)

    def forward(self, z: torch.Tensor):
        codes = self.codes(z)
        if self.training:
            self._update(z.detach(), codes)
        quantised = self.lookup(codes)
        commitment = F.mse_loss(z.float(), quantised.detach())
        return z + (quantised - z).detach(), codes, commitment

    @torch.no_grad()
    def _update(self, z: torch.Tensor, codes: torch.Tensor) -> None:
        flat = z.movedim(1, -1).reshape(-1, z.shape[1]).float()
        onehot = F.one_hot(codes.reshape(-1), len(self.codebook)).float()
        counts, sums = onehot.sum(0), onehot.t() @ flat
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.usage.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.sums.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.usage.sum()
        smoothed = (self.usage + self.eps) / (n + len(self.usage) * self.eps) * n  # no code divides by zero
        self.codebook.copy_(self.sums / smoothed[:, None])
        dead = self.usage < self.dead_below
        if bool(dead.any()):
            # restart unused codes at encodings of this batch (rank 0's, so every rank agrees)
            pick = flat[torch.randint(0, len(flat), (int(dead.sum()),), device=flat.device)]
            if distributed:
                dist.broadcast(pick, 0)
            self.codebook[dead] = pick
            self.sums[dead] = pick
            self.usage[dead] = 1.0


def check_maskige(maskige: torch.Tensor) -> None:
    """What an autoencoder of maskiges takes: [B, 3, H, W], H and W multiples of 8."""
    if maskige.dim() != 4 or maskige.shape[1] != 3:
        raise ValueError(f"maskige must be [B, 3, H, W], got shape {tuple(maskige.shape)}")
    if maskige.shape[2] % DOWNSAMPLING or maskige.shape[3] % DOWNSAMPLING:
        raise ValueError(f"maskige height and width must be multiples of {DOWNSAMPLING}, got "
                         f"{tuple(maskige.shape[2:])}")


def check_codes(codes: torch.Tensor, count: int) -> None:
    """What a decoder of codes takes: integer [B, h, w] in [0, count)."""
    if codes.dim() != 3 or codes.dtype.is_floating_point:
        raise ValueError(f"codes must be integer [B, h, w], got {codes.dtype} {tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= count):
        raise ValueError(f"codes must lie in [0, {count})")


def conv_block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """3x3 convolution, GroupNorm, SiLU: the VQ autoencoder's block, and GSS's conditioning network's."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())


class MaskigeVQ(nn.Module):
    """Maskige [B, 3, H, W] (H, W multiples of 8) <-> codes [B, H/8, W/8]. ``forward`` returns
    (reconstruction, codes, loss = reconstruction MSE + commitment * its weight)."""

    def __init__(self, codes: int = 512, dim: int = 32, channels: int = 64, commitment: float = 0.25):
        super().__init__()
        self.codes, self.commitment = codes, commitment
        down, up = [conv_block(3, channels)], [nn.Conv2d(dim, channels, 1)]
        for _ in range(3):  # 2^3 = DOWNSAMPLING
            down += [nn.Conv2d(channels, channels, 4, stride=2, padding=1), conv_block(channels, channels)]
            up += [conv_block(channels, channels), nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1)]
        self.encoder = nn.Sequential(*down, nn.Conv2d(channels, dim, 1))
        self.decoder = nn.Sequential(*up, conv_block(channels, channels), nn.Conv2d(channels, 3, 3, padding=1))
        self.quantizer = VectorQuantizer(codes, dim)

    def encode(self, maskige: torch.Tensor) -> torch.Tensor:
        """-> codes int64 [B, H/8, W/8]."""
        check_maskige(maskige)
        return self.quantizer.codes(self.encoder(maskige.float()))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes int64 [B, h, w] -> maskige [B, 3, 8h, 8w]."""
        check_codes(codes, self.codes)
        return self.decoder(self.quantizer.lookup(codes.long()))

    def forward(self, maskige: torch.Tensor):
        check_maskige(maskige)
        quantised, codes, commitment = self.quantizer(self.encoder(maskige.float()))
        reconstruction = self.decoder(quantised)
        return reconstruction, codes, F.mse_loss(reconstruction, maskige.float()) + self.commitment * commitment
