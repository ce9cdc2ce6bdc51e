"""GSSHead: the token targets (fill, block-ignore rule), its loss and gradients, inference, on both
conditioning networks; GSS-FT-W's decoder and its loss."""
import pytest
import torch
import torch.nn.functional as F

from ddps import maskige
from ddps.nn.gss import UNTAUGHT, FrozenFeatureConditioning, FTWDecoder, GSSConditioning, GSSHead
from ddps.nn.vq import MaskigeVQ

K = 5


def _head(decoder=None, cond_channels=8):
    torch.manual_seed(0)
    vq = MaskigeVQ(codes=16, dim=8, channels=16)
    return GSSHead(K, vq, maskige.palette(K), FrozenFeatureConditioning(cond_channels, 16, K, dim=16), decoder=decoder)


def _randomise_batch_norms(module):
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
            m.weight.data.normal_()
            m.bias.data.normal_()


def _published(decoder=None):
    torch.manual_seed(0)
    vq = MaskigeVQ(codes=16, dim=8, channels=16)
    conditioning = GSSConditioning([8, 4, 6], 16, K, channels=8, seg_channels=8, cls_channels=16, heads=2, window=3)
    for classifier in (conditioning.classifier, conditioning.pixel_classifier):  # predictions that vary
        torch.nn.init.normal_(classifier.weight)
        torch.nn.init.zeros_(classifier.bias)
    return GSSHead(K, vq, maskige.palette(K), conditioning, decoder=decoder)


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
    aux = F.interpolate(head.conditioning.aux(cond), size=(16, 24), mode="bilinear", align_corners=False).argmax(1)
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
    decoder = FTWDecoder(K, dim=16, heads=2, window=4) if learned else None
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
    with pytest.raises(ValueError, match="h and w multiples of 2"):
        head.sample(torch.zeros(1, 8, 5, 6))
    with pytest.raises(ValueError, match=r"labels must be \[B=2, 16, 24\]"):
        head.loss(torch.zeros(2, 8, 4, 6), torch.zeros(3, 16, 24, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must be \[B=2, 16, 24\]"):
        _published(FTWDecoder(K, dim=8, heads=2, window=3)).decoder_loss(_levels(), torch.zeros(2, 16, 20).long())
    with pytest.raises(ValueError, match="cond must be one"):
        head.sample([torch.zeros(1, 8, 4, 6)])
    with pytest.raises(ValueError, match="cond must be the backbone's levels"):
        _published().sample(torch.zeros(1, 8, 4, 6))
    with pytest.raises(ValueError, match="6 colours; 6 classes need 7"):
        GSSHead(6, MaskigeVQ(codes=4, dim=4, channels=16), maskige.palette(5), FrozenFeatureConditioning(8, 4, 6))


def test_prior_loss_trains_the_vq_and_reconstruct_round_trips_any_size():
    head = _head(FTWDecoder(K, dim=16, heads=2, window=4)).train()
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
                distance = [float(((z[i, :, y, x] - code) ** 2).sum()) for code in codebook]
                out[i, y, x] = distance.index(min(distance))
    return out


def _gss_loss(head, tokens, pixels, labels):
    """0.8 x token cross-entropy + 0.2 x pixel cross-entropy, each averaged over all of its
    elements with the ignored ones counting zero (mmseg's default), on labels at the maskige's
    size, the targets written out: unlabelled pixels filled with the pixel branch's argmax, each
    block's code the nearest to the encoder's output, no target for a block without a label."""
    b, _, h, w = tokens.shape
    aux = F.interpolate(pixels, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    filled = torch.where(labels == 255, aux.argmax(1), labels)
    codes = _nearest_code(head.vq.encoder(head.colours[filled].permute(0, 3, 1, 2)), head.vq.quantizer.codebook)
    logp = tokens.log_softmax(1)
    terms = torch.zeros(b, h, w)
    for i in range(b):
        for y in range(h):
            for x in range(w):
                if (labels[i, 8 * y:8 * y + 8, 8 * x:8 * x + 8] != 255).any():
                    terms[i, y, x] = -logp[i, codes[i, y, x], y, x]
    assert (terms == 0).any()  # the inputs hold a block without a label
    aux_terms = torch.where(labels == 255, 0.0, -aux.log_softmax(1).gather(1, labels.clamp(max=K - 1)[:, None])[:, 0])
    return 0.8 * terms.mean() + 0.2 * aux_terms.mean()


def test_loss_is_gss_formula_averaged_over_every_element():
    head = _head().eval()
    torch.manual_seed(1)
    cond = torch.randn(2, 8, 4, 6)
    labels = torch.randint(0, K, (2, 16, 24))
    labels[0, :8, :8] = 255     # a whole block unlabelled: no token target
    labels[1, 2:6, 3:20] = 255  # partly unlabelled blocks: filled with the aux prediction
    expected = _gss_loss(head, head.conditioning.tokens(cond), head.conditioning.aux(cond), labels)
    assert head.loss(cond, labels).item() == pytest.approx(expected.item(), rel=1e-5)


def test_sample_decodes_the_predicted_tokens_to_the_nearest_class_colour():
    head = _head().eval()
    cond = torch.randn(2, 8, 4, 6)
    tokens = head.conditioning.tokens(cond).argmax(1)
    # codes whose decoded colours sit on the ignore colour: a prediction must still be a class
    head.vq.decode = lambda codes: head.colours[K].view(1, 3, 1, 1).expand(len(codes), 3, 16, 24) + \
        0.01 * codes.float().repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None]
    scores, _ = head.sample(cond)
    assert scores.shape == (2, K, 16, 24)  # every class's channel, whichever the pixels take
    decoded = head.vq.decode(tokens)
    distance = ((decoded[:, None] - head.colours[:K, :, None, None]) ** 2).sum(2)  # [B, K, H, W]
    assert torch.equal(scores.argmax(1), distance.argmin(1))
    assert torch.equal(scores.sum(1), torch.ones(2, 16, 24))


def _levels(b=2):
    torch.manual_seed(3)
    return [torch.randn(b, 8, 4, 6), torch.randn(b, 4, 2, 3), torch.randn(b, 6, 4, 6)]


def test_gss_conditioning_is_its_published_data_flow():
    net = _published().conditioning.eval()
    _randomise_batch_norms(net)
    levels = _levels()

    def cbr(seq, x):  # 1x1 convolution without bias, BatchNorm with its running statistics, ReLU
        conv, bn = seq[0], seq[1]
        assert conv.bias is None and conv.kernel_size == (1, 1)
        y = F.conv2d(x, conv.weight)
        y = (y - bn.running_mean[:, None, None]) / (bn.running_var[:, None, None] + bn.eps).sqrt()
        return (y * bn.weight[:, None, None] + bn.bias[:, None, None]).relu()

    def fuse(convs, fusion):
        # every level to the first (1/4) level's size, bilinearly, after its own 1x1 convolution
        return cbr(fusion, torch.cat([F.interpolate(cbr(c, x), size=(4, 6), mode="bilinear", align_corners=False)
                                      for c, x in zip(convs, levels)], 1))
    x = cbr(net.before_classifier, net.swin(fuse(net.convs, net.fusion)))
    tokens = F.conv2d(x, net.classifier.weight, net.classifier.bias)
    pixels = F.conv2d(fuse(net.pixel_convs, net.pixel_fusion), net.pixel_classifier.weight, net.pixel_classifier.bias)
    got_tokens, got_pixels = net(levels)
    assert got_tokens.shape == (2, 16, 4, 6) and got_pixels.shape == (2, K, 4, 6)
    assert torch.allclose(got_tokens, tokens, atol=1e-5) and torch.allclose(got_pixels, pixels, atol=1e-5)
    # GSS's sizes by default: 2048 channels before the token classifier, two Swin blocks of 16 heads
    full = GSSConditioning([64, 32, 128, 256], 8192, 19)
    assert full.classifier.in_channels == 2048 and full.fusion[0].out_channels == 512
    assert full.convs[0][0].out_channels == 384 and full.swin.blocks[0].mlp[0].out_features == 1024
    assert [(b.heads, b.window, b.shift) for b in full.swin.blocks] == [(16, 7, 0), (16, 7, 3)]
    assert isinstance(full.dropout, torch.nn.Dropout2d) and full.dropout.p == 0.1


def test_published_loss_upsamples_the_labels_twice_and_averages_over_every_element():
    head = _published().eval()
    levels = _levels()
    labels = torch.randint(0, K, (2, 16, 24))
    labels[0, :4, :4] = 255     # one 8 x 8 block of the 2x maskige unlabelled
    labels[1, 2:6, 3:20] = 255
    up = labels[:, torch.arange(32) // 2][:, :, torch.arange(48) // 2]  # each pixel 2 x 2
    expected = _gss_loss(head, *head.conditioning(levels), up)
    assert head.loss(levels, labels).item() == pytest.approx(expected.item(), rel=1e-5)


def test_published_sample_and_reconstruct_at_twice_the_labels():
    head = _published().eval()
    levels = _levels()
    scores, _ = head.sample(levels)
    tokens = head.conditioning(levels)[0].argmax(1)
    assert len(tokens.unique()) > 1
    decoded = head.vq.decode(tokens)
    assert scores.shape == (2, K, 32, 48)
    nearest = ((decoded[:, None] - head.colours[:K, :, None, None]) ** 2).sum(2).argmin(1)
    assert torch.equal(scores.argmax(1), nearest)
    labels = torch.randint(0, K, (1, 13, 21))
    padded = F.pad(labels, (0, 3, 0, 3), value=255)
    up = padded[:, torch.arange(32) // 2][:, :, torch.arange(48) // 2]
    round_trip = head.vq.decode(head.vq.encode(head.colours[torch.where(up == 255, K, up)].permute(0, 3, 1, 2)))
    one_hot = F.one_hot(((round_trip[:, None] - head.colours[:K, :, None, None]) ** 2).sum(2).argmin(1), K)
    # back to the labels' size as the evaluation resizes scores: the mean of each 2 x 2
    expected = one_hot.movedim(-1, 1).float().unfold(2, 2, 2).unfold(3, 2, 2).mean((-1, -2)).argmax(1)[:, :13, :21]
    assert torch.equal(head.reconstruct(labels), expected)


@pytest.mark.parametrize("published", [True, False])
def test_parts_are_the_pixel_branch_alone(published):
    head = (_published() if published else _head()).eval()
    cond = _levels() if published else torch.randn(2, 8, 4, 6)
    pixels = head.conditioning.pixel_classifier if published else head.conditioning.aux
    tokens = head.conditioning.classifier if published else head.conditioning.tokens
    captured, token_runs = [], []
    pixels.register_forward_hook(lambda module, args, out: captured.append(out))
    tokens.register_forward_hook(lambda module, args, out: token_runs.append(out))
    parts = head.parts(cond)
    assert list(parts) == ["pixel branch"] and torch.equal(parts["pixel branch"], captured[0])
    # each branch runs only where its output is used: an evaluation calls both, once each
    head.sample(cond)
    assert len(captured) == 1 and len(token_runs) == 1
    assert parts["pixel branch"].shape == (2, K, 4, 6)
    with pytest.raises(ValueError, match="cond must be"):
        head.parts(torch.randn(2, 8, 4, 6) if published else _levels())


def test_ftw_decoder_is_gss_ftw():
    dec = FTWDecoder(19)
    assert dec.projection[0].bias is None and dec.projection[0].out_channels == 128
    assert isinstance(dec.projection[1], torch.nn.BatchNorm2d) and isinstance(dec.projection[2], torch.nn.ReLU)
    assert [(b.heads, b.window, b.shift, b.mlp[0].out_features) for b in dec.swin.blocks] == [(4, 7, 0, 256)]
    assert dec.classifier.in_channels == 128 and dec.classifier.out_channels == 19
    small = FTWDecoder(K, dim=8, heads=2, window=3).eval()
    _randomise_batch_norms(small)
    m = torch.rand(2, 3, 10, 12)
    bn = small.projection[1]
    x = (F.conv2d(m, small.projection[0].weight) - bn.running_mean[:, None, None]) / \
        (bn.running_var[:, None, None] + bn.eps).sqrt() * bn.weight[:, None, None] + bn.bias[:, None, None]
    expected = F.conv2d(small.swin(x.relu()), small.classifier.weight, small.classifier.bias)
    assert torch.allclose(small(m), expected, atol=1e-5)


def test_decoder_loss_trains_the_decoder_alone_on_the_predicted_maskige():
    head = _published(FTWDecoder(K, dim=8, heads=2, window=3)).train()
    levels = _levels()
    labels = torch.randint(0, K, (2, 16, 24))
    labels[1, :5] = 255
    stats = {k: v.clone() for k, v in head.conditioning.state_dict().items()}
    loss = head.decoder_loss(levels, labels)
    loss.backward()
    decoder = {id(p) for p in head.decoder_parameters()}
    assert decoder and all((p.grad is not None) == (id(p) in decoder) for p in head.parameters())
    # the conditioning network predicted as it samples: eval mode, its BatchNorm statistics untouched
    assert all(torch.equal(v, stats[k]) for k, v in head.conditioning.state_dict().items())
    assert head.conditioning.training
    head.conditioning.eval()
    tokens, pixels = head.conditioning(levels)
    assert len(tokens.argmax(1).unique()) > 1 and not torch.equal(tokens.argmax(1), pixels.argmax(1))
    predicted = head.vq.decode(tokens.argmax(1))
    logits = F.interpolate(head.decoder(predicted), size=(16, 24), mode="bilinear", align_corners=False)
    terms = torch.where(labels == 255, 0.0, -logits.log_softmax(1).gather(1, labels.clamp(max=K - 1)[:, None])[:, 0])
    assert loss.item() == pytest.approx(terms.mean().item(), rel=1e-5)


def test_a_gss_ftw_model_loads_without_its_decoder_as_gss_ff():
    # GSS's two decoders of one model: the FT-W head's weights load into a nearest-colour head,
    # which then samples as the nearest-colour head with those weights does; any other unknown
    # weight is still refused
    ftw = _head(FTWDecoder(K, dim=16, heads=2, window=4))
    with torch.no_grad():  # other weights than a new head's
        for p in ftw.parameters():
            p.add_(torch.randn_like(p))
    ff = _head()
    ff.load_trained(ftw.state_dict())
    kept = {k: v for k, v in ftw.state_dict().items() if not k.startswith("decoder.")}
    assert kept.keys() == ff.state_dict().keys() and all(torch.equal(v, ff.state_dict()[k]) for k, v in kept.items())
    cond = torch.randn(1, 8, 4, 6)
    expected = _head()
    expected.load_state_dict(kept)
    assert torch.equal(ff.eval().sample(cond)[0], expected.eval().sample(cond)[0])
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        ff.load_trained({**ftw.state_dict(), "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"missing \['decoder\."):
        ftw.load_trained(ff.state_dict())
