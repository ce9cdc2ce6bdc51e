"""ddps.nn.vq: the EMA codebook's updates and restarts, the maskige VQ autoencoder learning
synthetic masks, its input checks."""
import pytest
import torch

from ddps import maskige
from ddps.nn.vq import MaskigeVQ, VectorQuantizer


def test_codebook_moves_to_the_mean_of_its_encodings_and_restarts_unused_codes():
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
    from ddps.app.data.synthetic import SyntheticShapes
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
    vq = MaskigeVQ(codes=8, dim=4, channels=16)
    with pytest.raises(ValueError, match="multiples of 8"):
        vq(torch.zeros(1, 3, 12, 16))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        vq.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 8\)"):
        vq.decode(torch.full((1, 2, 2), 8))
    with pytest.raises(ValueError, match="integer"):
        vq.decode(torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="a codebook needs at least 2 codes, got 1"):
        VectorQuantizer(1, 4)
