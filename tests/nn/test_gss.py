"""GSSHead: the token targets (fill, block-ignore rule), its loss and gradients, inference."""
import pytest
import torch
import torch.nn.functional as F

from ddps import maskige
from ddps.nn.gss import UNTAUGHT, GSSHead
from ddps.nn.vq import MaskigeVQ

K = 5


def _head(decoder=None, cond_channels=8):
    torch.manual_seed(0)
    vq = MaskigeVQ(codes=16, dim=8, channels=16)
    return GSSHead(K, cond_channels, vq, maskige.palette(K), dim=16, decoder=decoder)


def test_token_targets_skip_unlabelled_blocks_and_tokenise_the_filled_mask():
    head = _head()
    labels = torch.randint(0, K, (2, 16, 24))
    labels[0, :8, :8] = 255  # block (0, 0) of sample 0: nothing labelled
    labels[1, :8, 8:16] = 255
    labels[1, 3, 12] = 2  # block (0, 1) of sample 1: one labelled pixel
    filled = torch.where(labels == 255, 1, labels)
    targets = head.token_targets(labels, filled)
    codes = head.vq.encode(maskige.encode(filled, head.colours))
    assert targets.shape == (2, 2, 3)
    assert targets[0, 0, 0] == UNTAUGHT and targets[1, 0, 1] == codes[1, 0, 1]
    keep = torch.ones_like(targets, dtype=torch.bool)
    keep[0, 0, 0] = False
    assert torch.equal(targets[keep], codes[keep])


def test_loss_fills_unlabelled_pixels_with_the_aux_prediction(monkeypatch):
    head = _head()
    cond = torch.randn(2, 8, 4, 6)
    labels = torch.randint(0, K, (2, 16, 24))
    labels[:, 5:9, 2:20] = 255
    seen = {}

    def record(lab, filled, ignore_index):
        seen["filled"] = filled
        return torch.zeros(2, 2, 3, dtype=torch.long)
    monkeypatch.setattr(head, "token_targets", record)
    head.loss(cond, labels)
    aux = F.interpolate(head.aux(cond), size=(16, 24), mode="bilinear", align_corners=False).argmax(1)
    assert torch.equal(seen["filled"], torch.where(labels == 255, aux, labels))


def test_only_the_conditioning_network_and_aux_learn():
    head = _head().train()  # the VQ in training mode too: the head's loss must still leave its codebook
    cond = torch.randn(2, 8, 4, 6)
    labels = torch.randint(0, K, (2, 16, 24))
    codebook = head.vq.quantizer.codebook.clone()
    head.loss(cond, labels).backward()
    trainable = {id(p) for p in head.trainable_parameters()}
    for name, p in head.named_parameters():
        assert (p.grad is not None) == (id(p) in trainable), name
    assert torch.equal(head.vq.quantizer.codebook, codebook)
    # a batch without a labelled pixel: a finite loss, no NaN
    assert torch.isfinite(head.loss(cond, torch.full((2, 16, 24), 255)))


@pytest.mark.parametrize("learned", [False, True])
def test_training_lowers_the_loss_and_sample_gives_scores_at_the_label_size(learned):
    decoder = maskige.LearnedDecoder(K, dim=16, window=4) if learned else None
    head = _head(decoder)
    labels = torch.randint(0, K, (4, 1, 1)).expand(4, 16, 16).clone()
    cond = F.one_hot(labels[:, ::4, ::4], 8).movedim(-1, 1).float()  # features that tell the class
    optimiser = torch.optim.Adam(head.trainable_parameters(), lr=1e-2)
    first = head.loss(cond, labels).item()
    for _ in range(30):
        loss = head.loss(cond, labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert loss.item() < 0.5 * first
    scores, steps = head.eval().sample(cond)
    assert scores.shape == (4, K, 16, 16) and steps == {}
    if not learned:
        assert torch.equal(scores.sum(1), torch.ones(4, 16, 16))  # one class per pixel


def test_bad_input_is_named():
    head = _head()
    with pytest.raises(ValueError, match=r"labels must be \[B=2, 16, 24\]"):
        head.loss(torch.zeros(2, 8, 4, 6), torch.zeros(2, 16, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="h and w even"):
        head.sample(torch.zeros(1, 8, 5, 6))
    with pytest.raises(ValueError, match="6 colours; 6 classes need 7"):
        GSSHead(6, 8, MaskigeVQ(codes=4, dim=4, channels=16), maskige.palette(5))


def test_prior_loss_trains_the_vq_and_reconstruct_round_trips_any_size():
    head = _head(maskige.LearnedDecoder(K, dim=16, window=4)).train()
    labels = torch.randint(0, K, (2, 16, 24))
    labels[0, :3] = 255
    codebook = head.vq.quantizer.codebook.clone()
    head.prior_loss(labels).backward()
    prior = {id(p) for p in head.prior_parameters()}
    assert prior and all(p.grad is not None for p in head.prior_parameters())
    assert all(p.grad is None for p in head.parameters() if id(p) not in prior)
    assert not torch.equal(head.vq.quantizer.codebook, codebook)  # the EMA codebook followed the encodings
    round_trip = head.eval().reconstruct(torch.randint(0, K, (1, 13, 21)))  # padded to 16 x 24, cropped back
    assert round_trip.shape == (1, 13, 21) and round_trip.min() >= 0 and round_trip.max() < K
