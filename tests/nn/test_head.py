"""DDPSHead: sampling loop and training forward against the original head's golden outputs."""
import pytest
import torch

from ddps.nn import DDPSHead, inference_timesteps

MODES = {"q_pred": "renoise", "q_posterior": "posterior"}


def make_head(config, **overrides):
    kwargs = dict(num_classes=config["K"], cond_channels=config["cond_ch"], dim=config["dim"],
                  out_dim=config["out_dim"], dim_mults=config["dim_mults"], embed_dim=config["emb_dim"],
                  num_timesteps=config["T"], inference_steps=config["inference_timesteps"],
                  collect_timesteps=config["collect"], guidance_scale=config["guidance_scale"],
                  schedule=config["schedule"], mode=MODES[config["mode"]])
    kwargs.update(overrides)
    return DDPSHead(**kwargs)


@pytest.fixture(params=["head0", "head1", "head2"])
def golden_head(request, official_heads):
    golden = official_heads[request.param]
    head = make_head(golden["config"])
    head.load_state_dict(golden["state_dict"], strict=True)
    return head, golden


def test_sample_reproduces_original(golden_head):
    head, golden = golden_head
    head.eval()
    torch.manual_seed(golden["torch_seed"])
    final, collected = head.sample(golden["cond"])
    assert (final - golden["final"]).abs().max() <= 1e-4
    assert list(collected) == head.collect_timesteps and len(collected) == len(golden["collected"])
    for ours, theirs in zip(collected.values(), golden["collected"]):  # the original's list, in step order
        assert (ours - theirs).abs().max() <= 1e-4


def test_forward_train_reproduces_original(golden_head):
    head, golden = golden_head
    train = golden["train"]
    head.train()
    torch.manual_seed(train["torch_seed"])
    logits, t = head.forward_train(train["cond"], train["gt"])
    assert torch.equal(t, train["t"])
    assert (logits - train["logits"]).abs().max() <= 1e-4
    logits.square().mean().backward()
    assert head.unet.init_conv.weight.grad is not None


def test_state_dict_keys(official_heads):
    golden = official_heads["head0"]
    head = make_head(golden["config"])
    assert set(head.state_dict()) == set(golden["state_dict"])


def test_checkpoint_of_another_schedule_is_refused(official_heads):
    golden = official_heads["head0"]  # trained with the linear schedule
    head = make_head(golden["config"], schedule="cos")
    with pytest.raises(ValueError, match="log_cumprod_at.*schedule='cos'"):
        head.load_state_dict(golden["state_dict"])


def test_schedule_follows_the_module_device():
    head = make_head({"K": 5, "cond_ch": 3, "dim": 8, "out_dim": 8, "dim_mults": [1], "emb_dim": 4, "T": 4,
                      "inference_timesteps": None, "collect": [], "guidance_scale": 1.0, "schedule": "linear",
                      "mode": "q_pred"})
    head.to("meta")
    assert head.schedule.device.type == "meta" and head.log_at.device.type == "meta"


def test_inference_timesteps():
    assert inference_timesteps(20, 2) == [0, 10, 19]
    assert inference_timesteps(20, 5) == [0, 4, 8, 12, 16, 19]
    assert inference_timesteps(3, None) == [0, 1, 2]
    assert inference_timesteps(20, 50) == list(range(20))


BASE = {"K": 5, "cond_ch": 3, "dim": 8, "out_dim": 8, "dim_mults": [1], "emb_dim": 4, "T": 4,
        "inference_timesteps": None, "collect": [], "guidance_scale": 1.0, "schedule": "linear", "mode": "q_pred"}


@pytest.mark.parametrize("overrides,match,argument", [
    ({"mode": "ddim"}, "mode='ddim' is not a sampling mode", "mode"),
    ({"mode": "posterior", "guidance_scale": 0.4}, "guidance_scale=0.4 needs mode='renoise'", "guidance_scale"),
    ({"collect_timesteps": [4]}, r"collect_timesteps \[4\]", "collect_timesteps"),
    ({"inference_steps": 0}, "inference_steps=0", "inference_steps"),
    ({"dropout_ratio": 1.0}, "dropout_ratio=1.0", "dropout_ratio"),
    ({"cond_dropout": 1.5}, r"cond_dropout=1.5 must lie in \[0, 1\]", "cond_dropout"),
    ({"backend": "fused"}, "backend='fused'", "backend"),
    ({"stop_below": 1.5}, "stop_below=1.5 must lie in", "stop_below"),
    ({"stop_below": -0.1}, "stop_below=-0.1 must lie in", "stop_below"),
])
def test_bad_head_arguments(overrides, match, argument):
    # the error names the argument, so that the app can name its own config key
    with pytest.raises(ValueError, match=match) as error:
        make_head(BASE, **overrides)
    assert error.value.argument == argument


@pytest.mark.parametrize("call,exc,match", [
    (lambda h: h.sample(torch.randn(1, 4, 8, 8)), ValueError, r"cond must be \[B, cond_channels=3"),
    (lambda h: h.sample(torch.ones(1, 3, 8, 8, dtype=torch.long)), TypeError, "cond must be a floating-point"),
    (lambda h: h.forward_train(torch.randn(2, 3, 4, 4), torch.full((2, 1, 16, 16), 5)), ValueError, "gt holds label 5"),
    (lambda h: h.forward_train(torch.randn(2, 3, 4, 4), torch.zeros(3, 1, 16, 16, dtype=torch.long)), ValueError, r"gt must be \[B=2"),
    (lambda h: h.forward_train(torch.randn(2, 3, 4, 4), torch.zeros(2, 1, 16, 16)), TypeError, "gt must hold integer"),
])
def test_bad_head_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call(make_head(BASE))


# Triton on the golden head where it is compiled (a GPU); under the interpreter its UNet takes a
# minute, and test_triton_reaches_every_op_of_the_loop runs the same loop on a smaller head.
@pytest.mark.parametrize("backend", ["auto", "cpu", *(["triton"] if torch.cuda.is_available() else [])])
def test_fused_backends_drive_the_same_loop(official_heads, backend):
    golden = official_heads["head0"]  # renoise mode, collects steps 0, 10, 19
    head = make_head(golden["config"], backend=backend)
    head.load_state_dict(golden["state_dict"], strict=True)
    head.eval()
    torch.manual_seed(golden["torch_seed"])
    final, collected = head.sample(golden["cond"])
    # Step 0 denoises the same random mask (drawn before any sampling op): identical logits.
    assert (collected[0] - golden["collected"][0]).abs().max() <= 1e-4  # keyed by step: step 0
    assert final.shape == golden["final"].shape and torch.isfinite(final).all()
    torch.manual_seed(golden["torch_seed"])
    again, _ = head.sample(golden["cond"])
    assert torch.equal(final, again)  # same seed, same result
    train = golden["train"]
    head.train()
    torch.manual_seed(train["torch_seed"])
    logits, t = head.forward_train(train["cond"], train["gt"])
    assert torch.equal(t, train["t"]) and logits.shape == train["logits"].shape


def test_posterior_mode_with_fused_ops(official_heads):
    golden = official_heads["head1"]  # posterior mode
    head = make_head(golden["config"], backend="cpu")
    head.load_state_dict(golden["state_dict"], strict=True)
    head.eval()
    torch.manual_seed(golden["torch_seed"])
    final, collected = head.sample(golden["cond"])
    assert len(collected) == 2 and torch.isfinite(final).all()
    assert list(collected) == head.collect_timesteps


def _reference_and_fused(golden):
    heads = []
    for backend in ("reference", "cpu"):
        head = make_head(golden["config"], backend=backend)
        head.load_state_dict(golden["state_dict"], strict=True)
        heads.append(head.eval())
    return heads


def _relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("batch_guidance", [False, True], ids=["two_calls", "batched"])
@pytest.mark.parametrize("name", ["head0", "head1", "head2"])
def test_fused_step_matches_reference_step(official_heads, name, batch_guidance):
    # The fused step: fused UNet, init_conv's condition share computed once, guidance from the
    # bias-only share (head0: scale 0.4, head2: 0; head1: 1, no guidance branch), its two calls
    # made one on a doubled batch or not. The reference step: the original's two full denoiser calls.
    golden = official_heads[name]
    ref, fused = _reference_and_fused(golden)
    fused.batch_guidance = batch_guidance
    cond = golden["cond"]
    g = torch.Generator().manual_seed(1)
    ref_step, fused_step = ref._step(cond), fused._step(cond)
    with torch.no_grad():
        for i in (0, ref.num_timesteps // 2, ref.num_timesteps - 1):
            mask = torch.randint(0, ref.num_classes, cond.shape[:1] + cond.shape[2:], generator=g)
            t = torch.full([cond.shape[0]], i)
            assert _relative_error(fused_step(mask, t), ref_step(mask, t)) <= 1e-4


@pytest.mark.parametrize("batch_guidance", [False, True], ids=["two_calls", "batched"])
def test_fused_step_under_autocast_gives_the_trunk_its_dtype(official_heads, batch_guidance):
    # The reference's init_conv returns autocast's dtype, and the first Block's weight
    # standardisation takes eps by it (1e-3, where float32 takes 1e-5): the fused step's two shares
    # (the guidance branch's is init_conv's float32 bias) are summed and rounded to it too.
    golden = official_heads["head0"]  # guidance 0.4: two branches
    ref, fused = _reference_and_fused(golden)
    fused.batch_guidance = batch_guidance
    cond = golden["cond"]
    mask = torch.randint(0, ref.num_classes, cond.shape[:1] + cond.shape[2:], generator=torch.Generator().manual_seed(1))
    t = torch.full([cond.shape[0]], 3)
    dtypes = []
    hook = fused.unet.downs[0][0].register_forward_pre_hook(lambda _m, args: dtypes.append(args[0].dtype))
    with torch.no_grad():
        expected = ref._step(cond)(mask, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low_ref, low_fused = ref._step(cond)(mask, t).float(), fused._step(cond)(mask, t).float()
    hook.remove()
    assert dtypes == [torch.bfloat16] * (1 if batch_guidance else 2)
    assert (low_fused - expected).abs().max() <= 2 * (low_ref - expected).abs().max()


def test_fused_training_denoiser_gradients_match_reference(official_heads):
    golden = official_heads["head0"]
    ref, fused = _reference_and_fused(golden)  # eval: no dropout, gradients still flow
    cond = golden["cond"]
    mask = torch.randint(0, ref.num_classes, cond.shape[:1] + cond.shape[2:], generator=torch.Generator().manual_seed(2))
    t = torch.arange(cond.shape[0]) % ref.num_timesteps
    ref_logits = ref.denoise(cond, mask, t)
    fused_logits = fused.denoise_from_share(fused.cond_share(cond), mask, t)
    assert _relative_error(fused_logits, ref_logits) <= 1e-4
    grad = torch.randn(ref_logits.shape, generator=torch.Generator().manual_seed(3))
    ref_logits.backward(grad)
    fused_logits.backward(grad)
    checked = 0
    for (name, p_ref), p_fused in zip(ref.named_parameters(), fused.parameters()):
        if p_ref.grad is not None:
            assert _relative_error(p_fused.grad, p_ref.grad) <= 1e-4, name
            checked += 1
    assert checked > 100 and fused.unet.init_conv.weight.grad is not None


def test_collected_logits_are_keyed_by_their_step():
    torch.manual_seed(0)
    head = DDPSHead(num_classes=5, cond_channels=3, dim=8, out_dim=8, dim_mults=(1, 2), embed_dim=4,
                    num_timesteps=10, inference_steps=4, collect_timesteps=(9, 0, 4)).eval()
    final, collected = head.sample(torch.randn(1, 3, 8, 8))
    assert list(collected) == [0, 4, 9] == [s for s in inference_timesteps(10, 4) if s in (0, 4, 9)]
    assert torch.equal(collected[9], final)  # the last step's logits are the final ones
    assert not torch.equal(collected[4], final)


def test_a_collect_step_the_schedule_skips_is_refused():
    # With 4 of 10 steps the schedule visits 0, 2, 4, 6, 8, 9: step 5's logits never exist (they
    # used to be reported under step 5 while coming from step 9).
    with pytest.raises(ValueError, match=r"collect_timesteps \[5\] are never visited: with num_timesteps=10 and "
                                         r"inference_steps=4 the steps that run are \[0, 2, 4, 6, 8, 9\]"):
        DDPSHead(num_classes=5, cond_channels=3, dim=8, out_dim=8, dim_mults=(1,), embed_dim=4, num_timesteps=10,
                 inference_steps=4, collect_timesteps=(0, 5, 9))


def test_cond_of_another_dtype_or_an_odd_size_is_named():
    head = DDPSHead(num_classes=5, cond_channels=3, dim=8, out_dim=8, dim_mults=(1, 2), embed_dim=4,
                    num_timesteps=10).eval()
    with pytest.raises(TypeError, match=r"cond has dtype torch.float64 but the head's weights are torch.float32"):
        head.sample(torch.randn(1, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"cond's spatial size \(7, 7\) must be divisible by 2: the denoiser halves it "
                                         r"1 times"):
        head.sample(torch.randn(1, 3, 7, 7))


def small_head(cls=DDPSHead, **overrides):
    kwargs = dict(num_classes=5, cond_channels=4, dim=8, out_dim=8, dim_mults=(1, 2), embed_dim=4, num_timesteps=10,
                  inference_steps=2, collect_timesteps=(0, 5, 9), guidance_scale=0.4, dropout_ratio=0.0)
    kwargs.update(overrides)
    return cls(**kwargs)


class _Spy:
    """Records the (source labels, noise level) of every q(x_t | x_0) draw and the masks the
    denoiser is called with."""

    def __init__(self, head, monkeypatch):
        self.noised, self.masks = [], []
        noise, denoise, from_share = head._noise, head.denoise, head.denoise_from_share
        monkeypatch.setattr(head, "_noise", lambda x0, s: self.noised.append((x0.clone(), s.clone())) or noise(x0, s))
        monkeypatch.setattr(head, "denoise", lambda c, m, t: self.masks.append(m.clone()) or denoise(c, m, t))
        monkeypatch.setattr(head, "denoise_from_share",
                            lambda c, m, t: self.masks.append(m.clone()) or from_share(c, m, t))


@pytest.mark.parametrize("source", ["first_prediction", "ground_truth"])
def test_noise_source(source, monkeypatch):
    torch.manual_seed(0)
    head = small_head(noise_source=source).train()
    spy = _Spy(head, monkeypatch)
    cond, gt = torch.randn(6, 4, 8, 8), torch.randint(0, 5, (6, 1, 8, 8))
    torch.manual_seed(3)
    _, t = head.forward_train(cond, gt)
    assert (t != 0).any()
    (x0, level), = spy.noised
    assert torch.equal(level, 10 - 1 - t)
    if source == "ground_truth":  # the naive variant: the ground truth itself is noised, one denoiser call
        assert torch.equal(x0, gt[:, 0]) and len(spy.masks) == 1
    else:  # the original: where t != 0, the model's first prediction (from a random mask) is noised
        first = head.denoise(cond[t != 0], spy.masks[0], torch.zeros(int((t != 0).sum()), dtype=torch.long))
        assert torch.equal(x0[t != 0], first.softmax(1).argmax(1)) and torch.equal(x0[t == 0], gt[t == 0, 0])
        assert len(spy.masks) == 3  # first prediction, the step itself (+ the check's call)


@pytest.mark.parametrize("transition", ["absorbing", "mask_and_replace"])
@pytest.mark.parametrize("mode", ["renoise", "posterior"])
def test_mask_transitions_train_and_sample(transition, mode, monkeypatch):
    torch.manual_seed(0)
    head = small_head(transition=transition, mode=mode, guidance_scale=1.0 if mode == "posterior" else 0.4,
                      backend="auto")
    assert head.embed.num_embeddings == 6  # the [MASK] state, index K = 5, has an embedding
    spy = _Spy(head, monkeypatch)
    cond = torch.randn(2, 4, 16, 16)
    final, collected = head.eval().sample(cond)
    assert final.shape == (2, 5, 16, 16) and list(collected) == [0, 5, 9]
    # inference starts from the noisiest level: nearly all [MASK] (absorbing: all but att[T-1] = 9e-6;
    # mask_and_replace: 90 % of the noise mass)
    share = (spy.masks[0] == 5).float().mean().item()
    assert share > (0.99 if transition == "absorbing" else 0.8)
    logits, _ = head.train().forward_train(cond, torch.randint(0, 5, (2, 64, 64)))
    assert logits.shape == (2, 5, 16, 16) and torch.isfinite(logits).all()


def test_refinement_control_draws_no_noise():
    from ddps.nn import RefinementHead

    torch.manual_seed(0)
    head = small_head(RefinementHead)
    cond, base, gt = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 8, 8), torch.randint(0, 5, (2, 32, 32))
    state = torch.random.get_rng_state()
    logits, t = head.train().forward_train(cond, gt, base)
    final, collected = head.eval().sample(cond, base)
    assert torch.equal(torch.random.get_rng_state(), state)  # no random mask, no noise: nothing drawn
    assert collected == {} and (t == 0).all()
    torch.testing.assert_close(logits, head.denoise(cond, base.argmax(1), t))
    unguided = head.denoise(torch.zeros_like(cond), base.argmax(1), t)
    torch.testing.assert_close(final, logits * 1.4 - 0.4 * unguided)
    with pytest.raises(ValueError, match="pass its logits as base"):
        head.sample(cond)
    with pytest.raises(ValueError, match="base must be"):
        head.sample(cond, base[:, :, :4])


def test_triton_reaches_every_op_of_the_loop():
    """head backend "triton": the sampling ops and the UNet's ops on Triton (conv3x3, which has no
    Triton kernel, on its default), the same loop as the CPU kernels': the same first step, and
    the same seed the same samples."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # the interpreter spends about 0.1 s a kernel launch: one level, two steps (0 and 9), no guidance
    config = {**BASE, "K": 7, "dim": 16, "out_dim": 16, "dim_mults": [1], "T": 10, "inference_timesteps": 1,
              "collect": [0, 9]}
    heads = {b: make_head(config, backend=b).to(device).eval() for b in ("cpu", "triton")}
    heads["triton"].load_state_dict(heads["cpu"].state_dict())
    cond = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)).to(device)
    runs = {}
    for backend, head in heads.items():
        torch.manual_seed(0)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            runs[backend] = head.sample(cond)
        ran = {e.name for e in prof.events() if e.name.startswith("ddps")}
        if backend == "triton":
            assert {"ddps_triton::renoise_fwd", "ddps_triton::linear_attention_fwd", "ddps_triton::attention_fwd",
                    "ddps_triton::group_norm_film_silu_fwd"} <= ran, ran
    (final, collected), (final_cpu, collected_cpu) = runs["triton"], runs["cpu"]
    assert (collected[0] - collected_cpu[0]).abs().max() <= 1e-4 and final.shape == final_cpu.shape
    torch.manual_seed(0)
    assert torch.equal(heads["triton"].sample(cond)[0], final)


def _changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image, the fraction of pixels whose label differs between two steps' logits."""
    return (a.argmax(1) != b.argmax(1)).flatten(1).double().mean(1)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("mode,guidance", [("renoise", 0.4), ("posterior", 1.0)])
def test_stop_below_ends_sampling_at_the_first_quiet_step(backend, mode, guidance):
    # One image: until it stops, the early-stopping run draws what the full run draws, so its
    # final logits are the full run's at the first step where fewer than stop_below of its pixels
    # changed label, and every later collected step holds them too.
    steps = inference_timesteps(10, None)
    torch.manual_seed(0)  # weights whose changes per step fall to new lows several times
    head = small_head(backend=backend, mode=mode, guidance_scale=guidance, inference_steps=None,
                      collect_timesteps=steps).eval()
    cond = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(5)
    _, full = head.sample(cond)
    assert head.steps_run.tolist() == [len(steps)]
    changes = [float(_changed(full[steps[k]], full[steps[k - 1]])) for k in range(1, len(steps))]
    thresholds = sorted({*changes, 1.0})
    stops_seen = set()
    for threshold in thresholds:  # stop_below = an observed change: that step does not stop
        head.stop_below = threshold
        torch.manual_seed(5)
        final, collected = head.sample(cond)
        quiet = next((k for k in range(1, len(steps)) if changes[k - 1] < threshold), len(steps) - 1)
        stops_seen.add(quiet)
        assert head.steps_run.tolist() == [quiet + 1], threshold
        assert torch.equal(final, full[steps[quiet]]), threshold
        for k, step in enumerate(steps):
            assert torch.equal(collected[step], full[steps[min(k, quiet)]]), (threshold, step)
    assert len(stops_seen) >= 3  # the thresholds stopped the loop at several steps


def test_stop_below_stops_each_image_of_a_batch_on_its_own():
    steps = inference_timesteps(10, None)
    torch.manual_seed(0)
    head = small_head(backend="cpu", inference_steps=None, collect_timesteps=steps).eval()
    cond = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    mixed = 0
    for threshold in (0.3, 0.35, 0.4, 0.45, 0.5):
        head.stop_below = threshold
        torch.manual_seed(2)
        final, collected = head.sample(cond)
        for i in range(4):
            changes = [float(_changed(collected[steps[k]][i:i + 1], collected[steps[k - 1]][i:i + 1]))
                       for k in range(1, len(steps))]
            quiet = next((k for k in range(1, len(steps)) if changes[k - 1] < threshold), len(steps) - 1)
            assert head.steps_run[i] == quiet + 1, (threshold, i)
            assert torch.equal(final[i], collected[steps[quiet]][i])
        mixed += len(set(head.steps_run.tolist())) > 1
    assert mixed >= 2  # images of one batch stopped at different steps

