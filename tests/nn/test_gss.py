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


def _nearest_code(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    # brute force: each position's code of least squared distance, one position at a time
    b, _, h, w = z.shape
    out = torch.empty(b, h, w, dtype=torch.long)
    for i in range(b):
        for y in range(h):
            for x in range(w):
                out[i, y, x] = min(range(len(codebook)), key=lambda c: float(((z[i, :, y, x] - codebook[c]) ** 2).sum()))
    return out


def test_loss_is_gss_formula_averaged_over_every_element():
    """0.8 x token cross-entropy + 0.2 x pixel cross-entropy, each averaged over all of its
    elements with the ignored ones counting zero (mmseg's default), the targets written out here."""
    head = _head().eval()
    torch.manual_seed(1)
    cond = torch.randn(2, 8, 4, 6)
    labels = torch.randint(0, K, (2, 16, 24))
    labels[0, :8, :8] = 255     # a whole block unlabelled: no token target
    labels[1, 2:6, 3:20] = 255  # partly unlabelled blocks: filled with the aux prediction
    aux = F.interpolate(head.aux(cond), size=(16, 24), mode="bilinear", align_corners=False)
    filled = torch.where(labels == 255, aux.argmax(1), labels)
    painted = head.colours[torch.where(filled == 255, K, filled)].permute(0, 3, 1, 2)
    codes = _nearest_code(head.vq.encoder(painted), head.vq.quantizer.codebook)
    token_logp = head.tokens(cond).log_softmax(1)
    token_terms = torch.zeros(2, 2, 3)
    for i in range(2):
        for y in range(2):
            for x in range(3):
                if (labels[i, 8 * y:8 * y + 8, 8 * x:8 * x + 8] != 255).any():
                    token_terms[i, y, x] = -token_logp[i, codes[i, y, x], y, x]
    aux_logp = aux.log_softmax(1)
    aux_terms = torch.where(labels == 255, 0.0, -aux_logp.gather(1, labels.clamp(max=K - 1)[:, None])[:, 0])
    expected = 0.8 * token_terms.sum() / token_terms.numel() + 0.2 * aux_terms.sum() / aux_terms.numel()
    assert head.loss(cond, labels).item() == pytest.approx(expected.item(), rel=1e-5)


def test_sample_decodes_the_predicted_tokens_to_the_nearest_class_colour():
    head = _head().eval()
    cond = torch.randn(2, 8, 4, 6)
    tokens = head.tokens(cond).argmax(1)
    # codes whose decoded colours sit on the ignore colour: a prediction must still be a class
    head.vq.decode = lambda codes: head.colours[K].view(1, 3, 1, 1).expand(len(codes), 3, 16, 24) + \
        0.01 * codes.float().repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None]
    scores, _ = head.sample(cond)
    decoded = head.vq.decode(tokens)
    distance = ((decoded[:, None] - head.colours[:K, :, None, None]) ** 2).sum(2)  # [B, K, H, W]
    assert torch.equal(scores.argmax(1), distance.argmin(1))
    assert torch.equal(scores.sum(1), torch.ones(2, 16, 24))
