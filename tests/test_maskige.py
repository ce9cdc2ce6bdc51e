"""Maskiges: palettes, encode/decode, the fused maskige_decode against GSS's composite, and the
learned decoder."""
import math

import pytest
import torch

from ddps import maskige
from ddps.ops import maskige_decode
from ddps.ops.maskige_decode import composite
from sampling import FUSED, IDS

ALL = FUSED + [("reference", "cpu")]
ALL_IDS = IDS + ["reference-cpu"]


@pytest.mark.parametrize("kind", maskige.KINDS)
@pytest.mark.parametrize("k", [1, 2, 5, 7, 19, 26, 64, 150, 151, 300])
def test_palette_shape_range_and_distinct_colours(kind, k):
    colours = maskige.palette(k, kind)
    assert colours.dtype == torch.float32 and colours.shape == (k + 1, 3)
    assert colours.min() >= 0 and colours.max() <= 1
    assert len(torch.unique(colours, dim=0)) == k + 1
    assert maskige.min_distance(colours) > 0


def test_palette_minimum_distances():
    # GSS's grid for ADE20K (150 classes and ignore: 5 x 6 x 6 values) is 1/5 apart; the
    # face-centred lattice of step 1/6 holds 172 points sqrt(2)/6 apart.
    assert maskige.min_distance(maskige.palette(150, "grid")) == pytest.approx(0.2)
    assert maskige.min_distance(maskige.palette(150, "spread")) == pytest.approx(math.sqrt(2) / 6)
    assert maskige.min_distance(maskige.palette(7, "grid")) == pytest.approx(1.0)  # the cube's corners
    for k in range(1, 200):
        assert maskige.min_distance(maskige.palette(k, "spread")) >= maskige.min_distance(maskige.palette(k, "grid"))


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
@pytest.mark.parametrize("kind", maskige.KINDS)
def test_decode_survives_any_perturbation_below_half_the_minimum_distance(backend, device, kind):
    colours = maskige.palette(150, kind)
    radius = 0.499 * maskige.min_distance(colours)
    labels = _labels(150, (3, 40, 41), seed=1)
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


@pytest.mark.parametrize("call,error,match", [
    (lambda c: maskige.encode(torch.tensor([[6]]), c), ValueError, "label 6"),
    (lambda c: maskige.encode(torch.tensor([[-1]]), c), ValueError, "label -1"),
    (lambda c: maskige.encode(torch.zeros(1, 2), c), TypeError, "integer class labels"),
    (lambda c: maskige.decode(torch.zeros(1, 4, 2, 2), c), ValueError, r"\[B, 3, \*spatial\]"),
    (lambda c: maskige.decode(torch.zeros(1, 3, 2, 2, dtype=torch.int64), c), TypeError, "float32, float16"),
    (lambda c: maskige_decode(torch.zeros(1, 3, 2), c[:, :2]), ValueError, r"palette must be"),
    (lambda c: maskige.decode(torch.zeros(1, 3, 2), torch.cat([c, c[2:3]])), ValueError, "rows 2 and 7"),
    (lambda c: maskige.encode(torch.zeros(1, 2, dtype=torch.long), c.masked_fill(c > 0.5, float("nan"))),
     ValueError, "non-finite"),
    (lambda c: maskige.palette(0), ValueError, "positive int"),
    (lambda c: maskige.palette(5, "jitter"), ValueError, "palette kind"),
    (lambda c: maskige.LearnedDecoder(6)(torch.zeros(1, 4, 8, 8)), ValueError, r"\[B, 3, H, W\]"),
], ids=["label-k", "label-negative", "float-labels", "channels", "int-maskige", "palette-shape", "duplicate",
        "nan-colour", "no-classes", "kind", "learned-channels"])
def test_bad_input_is_named(call, error, match):
    with pytest.raises(error, match=match):
        call(maskige.palette(6))


@pytest.mark.parametrize("size", [(16, 16), (13, 21)])
def test_learned_decoder_learns_what_nearest_colour_cannot(size):
    # Colours pulled halfway towards a wrong class's colour: nearest-colour decoding gets those pixels
    # wrong, a decoder that sees the window around them need not.
    torch.manual_seed(0)
    k, colours = 6, maskige.palette(6)
    decoder = maskige.LearnedDecoder(k, dim=32, window=4)
    optimiser = torch.optim.Adam(decoder.parameters(), lr=3e-3)

    def batch():
        labels = torch.randint(0, k, (4, 1, 1)).expand(4, *size).clone()  # one class per image
        painted = maskige.encode(labels, colours)
        shifted = maskige.encode((labels + 1) % k, colours)
        blur = torch.rand(4, 1, *size) < 0.3
        return torch.where(blur, 0.45 * painted + 0.55 * shifted, painted), labels

    for _ in range(150):
        x, labels = batch()
        loss = torch.nn.functional.cross_entropy(decoder(x), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    x, labels = batch()
    assert decoder(x).shape == (4, k, *size)
    nearest = (maskige.decode(x, colours) == labels).float().mean()
    learned = (decoder(x).argmax(1) == labels).float().mean()
    assert nearest < 0.8 and learned > 0.99


def test_module_example_runs():
    import doctest
    assert doctest.testmod(maskige).failed == 0


# --- the VQ autoencoder ---------------------------------------------------------------------------
def test_codebook_moves_to_the_mean_of_its_encodings_and_restarts_unused_codes():
    from ddps.nn.vq import VectorQuantizer
    torch.manual_seed(0)
    vq = VectorQuantizer(codes=4, dim=2, decay=0.0, eps=0.0, dead_below=0.5)
    vq.codebook.copy_(torch.tensor([[0.0, 0], [10, 10], [100, 100], [-100, 100]]))
    z = torch.tensor([[0.5, -0.5], [9.0, 11.0], [11.0, 12.0]]).t().reshape(1, 2, 3, 1)  # 3 encodings
    quantised, codes, _ = vq.train()(z)
    assert codes.flatten().tolist() == [0, 1, 1]
    assert torch.allclose(vq.codebook[0], torch.tensor([0.5, -0.5]))
    assert torch.allclose(vq.codebook[1], torch.tensor([10.0, 11.5]))
    # codes 2 and 3 drew nothing: restarted at encodings of the batch
    for row in vq.codebook[2:]:
        assert any(torch.equal(row, e) for e in z.reshape(2, 3).t())
    # the straight-through value is the (updated) code of each encoding
    assert torch.allclose(quantised.reshape(2, 3).t(), vq.codebook[codes.flatten()])
    # eval mode leaves the codebook alone
    before = vq.codebook.clone()
    vq.eval()(z + 1)
    assert torch.equal(vq.codebook, before)


def test_vq_training_lowers_reconstruction_error_on_synthetic_masks():
    from ddps.data.synthetic import SyntheticShapes
    from ddps.nn.vq import MaskigeVQ
    torch.manual_seed(0)
    colours = maskige.palette(6)
    shapes = SyntheticShapes("training", 0, 32, 32, 4, 0.35)
    masks = torch.stack([shapes[i][1] for i in range(32)])
    held_out = torch.stack([SyntheticShapes("validation", 0, 8, 32, 4, 0.35)[i][1] for i in range(8)])
    vq = MaskigeVQ(codes=64, dim=16, channels=32)
    optimiser = torch.optim.Adam(vq.parameters(), lr=2e-3)

    def error():
        with torch.no_grad():
            vq.eval()
            painted = maskige.encode(held_out, colours)
            reconstruction = vq.decode(vq.encode(painted))
            vq.train()
            return (reconstruction - painted).square().mean().item(), \
                (maskige.decode(reconstruction, colours) != held_out).float().mean().item()

    mse0, wrong0 = error()
    for step in range(60):
        batch = masks[torch.randint(0, 32, (8,))]
        _, codes, loss = vq(maskige.encode(batch, colours))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    mse, wrong = error()
    assert codes.shape == (8, 4, 4)
    assert mse < 0.5 * mse0 and wrong < wrong0


def test_vq_names_bad_input():
    from ddps.nn.vq import MaskigeVQ, VectorQuantizer
    vq = MaskigeVQ(codes=8, dim=4, channels=16)
    with pytest.raises(ValueError, match="multiples of 8"):
        vq(torch.zeros(1, 3, 12, 16))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        vq.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 8\)"):
        vq.decode(torch.full((1, 2, 2), 8))
    with pytest.raises(ValueError, match="integer"):
        vq.decode(torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="codes >= 2"):
        VectorQuantizer(1, 4)
