"""Maskiges (ddps.maskige): palettes, encode/decode's input checks, GSS-FT-W's decoder learning what
nearest colour cannot, the module's example. The fused decode is tested in ops/test_maskige_decode.py."""
import math

import pytest
import torch

from ddps import maskige
from ddps.nn.gss import FTWDecoder
from ddps.ops import maskige_decode


@pytest.mark.parametrize("kind", maskige.COMPUTED)
@pytest.mark.parametrize("k", [1, 2, 5, 7, 19, 26, 64, 150, 151, 300])
def test_palette_shape_range_and_distinct_colours(kind, k):
    colours = maskige.palette(k, kind)
    assert colours.dtype == torch.float32 and colours.shape == (k + 1, 3)
    assert colours.min() >= 0 and colours.max() <= 1
    assert len(torch.unique(colours, dim=0)) == k + 1
    assert maskige.min_distance(colours) > 0


def test_gss_palettes_are_its_configs_values():
    # spot values from GSS's configs (configs/gss/cityscapes/*.py, configs/gss/_base_/models/*.py)
    city = maskige.palette(19, "gss-cityscapes")
    assert city.shape == (20, 3)
    assert torch.equal(city[0] * 255, torch.tensor([128., 64, 128]))    # road
    assert torch.equal(city[18] * 255, torch.tensor([119., 11, 32]))    # bicycle
    assert torch.equal(city[19], torch.zeros(3))                         # ignore: black
    ade = maskige.palette(150, "gss-ade20k")
    assert ade.shape == (151, 3)
    assert torch.equal(ade[0] * 255, torch.tensor([222., 222, 145]))
    assert torch.equal(ade[148:] * 255, torch.tensor([[0., 0, 0], [255, 255, 255], [215, 216, 196]]))
    for colours in (city, ade):
        assert torch.equal((colours * 255).round(), colours * 255)  # 8-bit values, exactly
        maskige.check_palette(colours)
    with pytest.raises(ValueError, match="gss-cityscapes palette is for 19 classes, not 20"):
        maskige.palette(20, "gss-cityscapes")


def test_palette_minimum_distances():
    # The regular grid for 151 colours (5 x 6 x 6 values) is 1/5 apart; the face-centred lattice
    # of step 1/6 holds 172 points sqrt(2)/6 apart.
    assert maskige.min_distance(maskige.palette(150, "grid")) == pytest.approx(0.2)
    assert maskige.min_distance(maskige.palette(150, "spread")) == pytest.approx(math.sqrt(2) / 6)
    assert maskige.min_distance(maskige.palette(7, "grid")) == pytest.approx(1.0)  # the cube's corners
    for k in range(1, 200):
        assert maskige.min_distance(maskige.palette(k, "spread")) >= maskige.min_distance(maskige.palette(k, "grid"))


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
    (lambda c: FTWDecoder(6)(torch.zeros(1, 4, 8, 8)), ValueError, r"\[B, 3, H, W\]"),
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
    decoder = FTWDecoder(k, dim=32, heads=4, window=4)
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
