"""ddps.ops.maskige_decode (GSS-FF's nearest colour) on every backend: the maskige round trip,
perturbations below half the palette's minimum distance, bit for bit GSS's composite, ties, NaN
and inf as torch.argmin, any layout and spatial rank."""
import pytest
import torch

from ddps import maskige
from ddps.ops import maskige_decode
from ddps.ops.maskige_decode import composite
from helpers.sampling import FUSED, IDS

ALL = FUSED + [("reference", "cpu")]
ALL_IDS = IDS + ["reference-cpu"]


def _labels(k, shape, seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, shape, generator=g)
    if ignore:
        labels[torch.rand(shape, generator=g) < 0.1] = 255
    return labels


@pytest.mark.parametrize("backend,device", ALL, ids=ALL_IDS)
@pytest.mark.parametrize("k", [6, 150])
def test_round_trip_is_exact(backend, device, k):
    colours = maskige.palette(k).to(device)
    labels = _labels(k, (2, 17, 23)).to(device)
    painted = maskige.encode(labels, colours)
    assert painted.shape == (2, 3, 17, 23) and painted.dtype == torch.float32
    assert torch.equal(painted[0, :, 0, 0], colours[labels[0, 0, 0] if labels[0, 0, 0] != 255 else k])
    assert torch.equal(maskige.decode(painted, colours, backend=backend), labels)


@pytest.mark.parametrize("backend,device", ALL, ids=ALL_IDS)
@pytest.mark.parametrize("kind,k", [(kind, 150) for kind in maskige.COMPUTED] + [("gss-ade20k", 150),
                                                                                 ("gss-cityscapes", 19)])
def test_decode_survives_any_perturbation_below_half_the_minimum_distance(backend, device, kind, k):
    colours = maskige.palette(k, kind)
    radius = 0.499 * maskige.min_distance(colours)
    labels = _labels(k, (3, 40, 41), seed=1)
    g = torch.Generator().manual_seed(2)
    direction = torch.randn(3, 3, 40, 41, generator=g)
    direction /= direction.norm(dim=1, keepdim=True)
    length = radius * torch.rand(3, 1, 40, 41, generator=g) ** 0.1  # mostly near the radius
    noisy = maskige.encode(labels, colours) + direction * length
    assert torch.equal(maskige.decode(noisy.to(device), colours.to(device), backend=backend), labels.to(device))


@pytest.mark.parametrize("backend,device", FUSED, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("plane", [(1, 1), (3, 5), (8, 8), (8, 9), (13, 29)], ids=lambda p: f"{p[0]}x{p[1]}")
def test_fused_equals_the_reference_composite(backend, device, dtype, plane):
    # Any maskige, not only near the palette: distances that round alike in both, ties included.
    # Planes of 1, 15, 64, 72 and 377 pixels cover the CPU kernel's 32-pixel tiles and their ends.
    g = torch.Generator().manual_seed(sum(plane))
    colours = maskige.palette(150)
    x = (torch.rand(2, 3, *plane, generator=g) * 1.2 - 0.1).to(dtype)
    out = maskige_decode(x.to(device), colours.to(device), backend=backend).cpu()
    assert out.dtype == torch.int64 and out.shape == (2, *plane)
    assert torch.equal(out, composite(x, colours))
    assert torch.equal(maskige_decode(x, colours, backend="reference"), composite(x, colours))


@pytest.mark.parametrize("backend,device", FUSED, ids=IDS)
def test_ties_nan_and_inf_resolve_like_torch_argmin(backend, device):
    colours = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0.5, 0, 0]])
    x = torch.zeros(1, 3, 70)  # 70 pixels: two full tiles of the CPU kernel and a tail
    x[0, :, 0] = torch.tensor([0.25, 0, 0])  # halfway between rows 0 and 3: the lower row
    x[0, :, 1] = torch.tensor([0.5, 0.5, 0])  # rows 1 and 2 tie (0.5), row 3 is nearer (0.25)
    x[0, :, 2] = torch.tensor([1.0, 1.0, 0])  # rows 1 and 2 tie: row 1
    x[0, 1, 3] = float("nan")  # a NaN pixel: row 0
    x[0, 0, 40] = float("nan")  # ... in the second 32-pixel tile
    x[0, 2, 66] = float("nan")  # ... in the tail too
    x[0, 0, 4] = float("inf")  # all distances infinite: row 0
    x[0, 0, 5] = float("-inf")
    x[0, :, 67] = torch.tensor([0.75, 0, 0])  # halfway between rows 3 and 1: row 1
    out = maskige_decode(x.to(device), colours.to(device), backend=backend).cpu()
    expected = composite(x, colours)
    assert torch.equal(out, expected)
    assert out[0, :6].tolist() == [0, 3, 1, 0, 0, 0] and out[0, 66:68].tolist() == [0, 1]


@pytest.mark.parametrize("backend,device", ALL, ids=ALL_IDS)
def test_any_layout_and_spatial_rank(backend, device):
    colours = maskige.palette(19).to(device)
    labels = _labels(19, (2, 12, 10), ignore=False).to(device)
    painted = maskige.encode(labels, colours)
    channels_last = painted.contiguous(memory_format=torch.channels_last)
    assert torch.equal(maskige_decode(channels_last, colours, backend=backend), labels)
    assert torch.equal(maskige_decode(painted.flatten(2), colours, backend=backend), labels.flatten(1))
    assert maskige_decode(painted[:0], colours, backend=backend).shape == (0, 12, 10)
