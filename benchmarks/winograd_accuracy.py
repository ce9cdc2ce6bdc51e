"""Why conv3x3 stays at Winograd F(2x2, 3x3): the float32 error of F(m x m, 3x3) (m = 2, 3, 4) for
several transform points, against a float64 convolution, as a multiple of F.conv2d's own error.

Each variant is emulated as csrc/conv3x3 computes: the input and weight transforms in float32, the
products summed over input channels one at a time in float32 (the kernel's register
accumulators; optionally in blocks of 32 channels added up afterwards), then the output
transform. For F(2x2) the emulation's error is the kernel's (printed beside it). The transforms
come from the points by Toom-Cook (the last point is infinity).

    python benchmarks/winograd_accuracy.py [--channels 256] [--size 32] [--seeds 2]
"""
from __future__ import annotations

import argparse
from fractions import Fraction

import torch
import torch.nn.functional as F

# (name, output tile m, finite points)
VARIANTS = [("F(2x2) {0, 1, -1}", 2, (0, 1, -1)),
            ("F(3x3) {0, 1, -1, 2}", 3, (0, 1, -1, 2)),
            ("F(3x3) {0, 1, -1, 1/2}", 3, (0, 1, -1, Fraction(1, 2))),
            ("F(4x4) {0, 1, -1, 2, -2}", 4, (0, 1, -1, 2, -2)),
            ("F(4x4) {0, 1, -1, 1/2, -1/2}", 4, (0, 1, -1, Fraction(1, 2), Fraction(-1, 2))),
            ("F(4x4) {0, 1, -1, 1/2, -2}", 4, (0, 1, -1, Fraction(1, 2), -2))]


def _poly(roots):
    """Coefficients (lowest first) of the product of (x - r) over ``roots``."""
    coefficients = [Fraction(1)]
    for r in roots:
        shifted = [Fraction(0)] + coefficients
        coefficients = [a - r * b for a, b in zip(shifted, coefficients + [Fraction(0)])]
    return coefficients


def transforms(m: int, points) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A^T [m, n], G [n, 3], B^T [n, n] of F(m, 3) on ``points`` and infinity (n = m + 2), float64."""
    points = [Fraction(p) for p in points]
    n = m + 2
    a_t = [[p ** i for p in points] + [Fraction(int(i == m - 1))] for i in range(m)]
    g, b_t = [], []
    for j, p in enumerate(points):
        others = points[:j] + points[j + 1:]
        norm = Fraction(1)
        for q in others:
            norm *= p - q
        g.append([p ** k / norm for k in range(3)])
        b_t.append(_poly(others) + [Fraction(0)])
    g.append([Fraction(0), Fraction(0), Fraction(1)])
    b_t.append(_poly(points))
    return tuple(torch.tensor([[float(v) for v in row] for row in rows], dtype=torch.float64)
                 for rows in (a_t, g, [row[:n] for row in b_t]))


def emulate(x: torch.Tensor, w: torch.Tensor, m: int, points, block: int | None = None) -> torch.Tensor:
    """F(m x m, 3x3) of x [C, H, W] by w [K, C, 3, 3] in float32."""
    a_t, g, b_t = (t.float() for t in transforms(m, points))
    n = m + 2
    c, h, width = x.shape
    # Zeros past the bottom and right edges up to whole tiles are the convolution's own padding
    # for the outputs kept.
    th, tw = -(-h // m), -(-width // m)
    tiles = F.pad(x, (1, 1 + tw * m - width, 1, 1 + th * m - h)).unfold(1, n, m).unfold(2, n, m)  # [C, th, tw, n, n]
    v = b_t @ tiles @ b_t.T
    u = g @ w @ g.T  # [K, C, n, n]
    total = torch.zeros(u.shape[0], *v.shape[1:])
    part = torch.zeros_like(total)
    for ci in range(c):
        part = torch.addcmul(part, v[ci][None], u[:, ci, None, None])
        if block and (ci + 1) % block == 0:
            total, part = total + part, torch.zeros_like(part)
    y = a_t @ (total + part) @ a_t.T  # [K, th, tw, m, m]
    return y.permute(0, 1, 3, 2, 4).reshape(u.shape[0], th * m, tw * m)[:, :h, :width]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=_positive, default=256)
    parser.add_argument("--size", type=_positive, default=32, help="image side")
    parser.add_argument("--seeds", type=_positive, default=2)
    args = parser.parse_args(argv)
    print(f"max |error| against float64 / F.conv2d's own (float32), {args.channels} -> {args.channels} channels, "
          f"{args.size} x {args.size}, weights N(0, 1 / (9 Cin)), seeds 0..{args.seeds - 1}")
    rows = {}
    for seed in range(args.seeds):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(args.channels, args.size, args.size, generator=gen)
        w = torch.randn(args.channels, args.channels, 3, 3, generator=gen) / (9 * args.channels) ** 0.5
        exact = F.conv2d(x[None].double(), w.double(), padding=1)[0]
        direct = (F.conv2d(x[None], w, padding=1)[0].double() - exact).abs().max()
        try:
            from ddps.ops import conv3x3
            kernel = conv3x3(x[None].contiguous(memory_format=torch.channels_last), w, backend="cpu")[0]
            rows.setdefault("conv3x3 kernel (F(2x2))", []).append((kernel.double() - exact).abs().max() / direct)
        except (ImportError, RuntimeError, ValueError):
            pass
        for name, m, points in VARIANTS:
            for block in (None, 32):
                y = emulate(x, w, m, points, block).double()
                label = name + (", 32-channel blocks" if block else "")
                rows.setdefault(label, []).append((y - exact).abs().max() / direct)
    for label, ratios in rows.items():
        print(f"{label:48s} " + "  ".join(f"{float(r):5.2f}x" for r in ratios))


if __name__ == "__main__":
    main()
