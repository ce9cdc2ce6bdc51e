"""DDPSHead: the diffusion mask-prior head on top of a frozen segmentor's features (SPEC §4-6).

State-dict keys match the original head's (``unet.*``, ``conv_seg_new.*``, ``embed.weight`` and
the four schedule buffers), so converted original checkpoints load with ``strict=True``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import _backend, _checks, ops, reference
from ..ops._common import compute_dtype
from ..schedule import DiffusionSchedule
from .mask_head import MaskHead
from .unet import UNet

MODES = ("renoise", "posterior")
# What training noises: the model's own first prediction (the original's "diffusion on first
# prediction") or the ground truth (the naive integration the paper compares against).
NOISE_SOURCES = ("first_prediction", "ground_truth")
SCHEDULE_BUFFERS = ("log_cumprod_at", "log_cumprod_bt", "log_at", "log_bt")
# The released ADE20K head at inference (T = 20, 2 steps collecting 0, 10 and 19, guidance 0.4),
# which the benchmarks and the demo run.
ADE20K_HEAD = dict(num_classes=151, cond_channels=256, dim=256, out_dim=256, dim_mults=(1, 1, 1), embed_dim=16,
                   num_timesteps=20, inference_steps=2, collect_timesteps=(0, 10, 19), guidance_scale=0.4)


def inference_timesteps(num_timesteps: int, inference_steps: int | None) -> list[int]:
    """The denoiser timesteps visited at inference (0 = noisiest), ending with T - 1."""
    steps = num_timesteps if inference_steps is None else min(num_timesteps, inference_steps)
    timesteps = list(range(0, num_timesteps, num_timesteps // steps))
    if timesteps[-1] != num_timesteps - 1:
        timesteps.append(num_timesteps - 1)
    return timesteps


def unvisited(collect_timesteps, num_timesteps: int, inference_steps: int | None) -> list[int]:
    """The collect steps that the inference schedule does not visit (their logits would not exist)."""
    visited = inference_timesteps(num_timesteps, inference_steps)
    return [c for c in collect_timesteps if c not in visited]


def check_arguments(num_timesteps: int, inference_steps: int | None = None, collect_timesteps=(),
                    guidance_scale: float = 1.0, mode: str = "renoise", dropout_ratio: float = 0.1,
                    cond_dropout: float = 0.0, backend: str = "reference",
                    noise_source: str = "first_prediction", stop_below: float = 0.0) -> None:
    """DDPSHead's rules for its arguments, without building it; a broken one is an
    ``ArgumentError`` naming it."""
    _backend.check_module_backend(backend)
    _checks.choice(mode, "mode", MODES, "a sampling mode")
    _checks.choice(noise_source, "noise_source", NOISE_SOURCES, "a noise source")
    if mode == "posterior" and guidance_scale != 1:
        raise _checks.ArgumentError("guidance_scale", f"guidance_scale={guidance_scale} needs mode='renoise': the "
                                    "original posterior loop applies no guidance (use guidance_scale=1.0)")
    if inference_steps is not None and inference_steps < 1:
        raise _checks.ArgumentError("inference_steps", f"inference_steps={inference_steps} must be >= 1 (or None "
                                    "for all steps)")
    if not 0 <= dropout_ratio < 1:
        raise _checks.ArgumentError("dropout_ratio", f"dropout_ratio={dropout_ratio} must lie in [0, 1)")
    if not 0 <= cond_dropout <= 1:
        raise _checks.ArgumentError("cond_dropout", f"cond_dropout={cond_dropout} must lie in [0, 1]")
    if not 0 <= stop_below <= 1:
        raise _checks.ArgumentError("stop_below", f"stop_below={stop_below} must lie in [0, 1] (a fraction of an "
                                    "image's pixels; 0 never stops)")
    bad = [c for c in collect_timesteps if not 0 <= c < num_timesteps]
    if bad:
        raise _checks.ArgumentError("collect_timesteps", f"collect_timesteps {bad} are outside [0, "
                                    f"num_timesteps={num_timesteps})")
    never = unvisited(collect_timesteps, num_timesteps, inference_steps)
    if never:
        raise _checks.ArgumentError("collect_timesteps", f"collect_timesteps {never} are never visited: with "
                                    f"num_timesteps={num_timesteps} and inference_steps={inference_steps} the steps "
                                    f"that run are {inference_timesteps(num_timesteps, inference_steps)}")


class DDPSHead(MaskHead):
    """Denoising-diffusion mask head, on the protocol of ``MaskHead``: ``sample(cond, base=None)``
    -> (final logits [B, K, H, W], {step: logits} for each of ``collect_timesteps``, keyed by the
    step they come from; a collect step that the inference schedule never visits is refused at
    construction); ``base``, the segmentor's logits, is not read. Also ``forward_train(cond, gt,
    base=None)``: one training forward; gt [B, 1, H', W'] or [B, H', W'] labels -> (logits
    [B, K, H, W], t [B]).

    mode "renoise" re-noises each step's argmax with q(x_t | x_0) ("free re-noising"); "posterior"
    samples q(x_{t-1} | x_t, x_0) (the original applies no guidance there, so guidance_scale must
    be 1 in that mode). ``noise_source``: what training noises (NOISE_SOURCES). ``transition``:
    the categorical noise (``DiffusionSchedule``'s; the original's is "uniform"; the mask kinds
    add a [MASK] state, index K, to the embedding and start inference from the noisiest level).
    ``backend``: "reference" runs the original's dense sampling ops, UNet and loop, bitwise; any
    other (see ``ddps.backends()``) the fused ``ddps.ops`` on it, the fused UNet, and init_conv
    computed in two shares (see ``_step``). ``stop_below``: an image stops sampling once fewer
    than this fraction of its pixels changed label in a step (its later collected steps and its
    final logits are those of that step; 0, the original's loop, never stops); ``steps_run`` holds
    each image's number of steps in the last ``sample``.
    """

    metrics_name = "ddps"
    derived_buffers = SCHEDULE_BUFFERS

    def __init__(self, num_classes: int, cond_channels: int, dim: int, out_dim: int, dim_mults,
                 embed_dim: int, num_timesteps: int, inference_steps: int | None = None,
                 collect_timesteps=(), guidance_scale: float = 1.0, schedule: str = "linear",
                 mode: str = "renoise", dropout_ratio: float = 0.1, cond_dropout: float = 0.0,
                 backend: str = "reference", noise_source: str = "first_prediction", transition: str = "uniform",
                 stop_below: float = 0.0):
        super().__init__()
        check_arguments(num_timesteps, inference_steps, collect_timesteps, guidance_scale, mode, dropout_ratio,
                        cond_dropout, backend, noise_source, stop_below)
        self.backend = backend
        self.num_classes = num_classes
        self.cond_channels = cond_channels
        self.num_timesteps = num_timesteps
        self.inference_steps = inference_steps
        self.collect_timesteps = sorted(collect_timesteps)
        self.guidance_scale = guidance_scale
        self.mode = mode
        self.cond_dropout = cond_dropout
        self.noise_source = noise_source
        self.stop_below = stop_below
        self.steps_run = None  # per image, the steps the last ``sample`` ran
        # Fused heads only: the guided and the unguided denoiser call of a step as one call on a
        # doubled batch. Off by default: on the reference CPU two B = 1 calls are faster (its
        # convolutions run slower per sample at B = 2); not measured on a GPU.
        self.batch_guidance = False
        self.unet = UNet(dim, out_dim, cond_channels + embed_dim, dim_mults, backend=backend)
        self.conv_seg_new = nn.Conv2d(out_dim, num_classes, kernel_size=1)
        self.schedule = DiffusionSchedule(num_timesteps, num_classes, schedule, transition)
        self.embed = nn.Embedding(self.schedule.num_states, embed_dim)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else None
        for name in SCHEDULE_BUFFERS:
            self.register_buffer(name, getattr(self.schedule, name).clone())
        self._register_load_state_dict_pre_hook(self._check_schedule_buffers)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.schedule = self.schedule.to(self.log_at.device)
        return self

    def _check_schedule_buffers(self, state_dict, prefix, *args):
        # The buffers are a function of (T, K, schedule kind); a checkpoint whose buffers differ
        # was trained with another schedule, which strict key matching alone would not reveal.
        for name in SCHEDULE_BUFFERS:
            key = prefix + name
            if key in state_dict and state_dict[key].shape == getattr(self, name).shape:
                if not torch.allclose(state_dict[key].float().cpu(), getattr(self.schedule, name).cpu(),
                                      rtol=1e-5, atol=1e-6, equal_nan=True):
                    raise ValueError(f"checkpoint buffer {key!r} does not match schedule="
                                     f"{self.schedule.kind!r} with T={self.num_timesteps}, K={self.num_classes}")

    def _noise(self, x0: torch.Tensor, noise_level: torch.Tensor) -> torch.Tensor:
        """x_t ~ q(x_t | x0) for labels x0."""
        if self.backend == "reference":
            return reference.q_pred(x0, noise_level, self.schedule)
        return ops.q_sample(x0, noise_level, self.schedule, backend=_backend.preferred("q_sample", self.backend))

    def trainable_parameters(self) -> list:
        # the UNet and the classifier, as the original; the class embedding stays at its initial value
        return list(self.unet.parameters()) + list(self.conv_seg_new.parameters())

    @property
    def size_multiple(self) -> int:
        return self.unet.size_multiple

    def loss(self, cond: torch.Tensor, labels: torch.Tensor, base: torch.Tensor | None = None,
             ignore_index: int = 255) -> torch.Tensor:
        """The training loss for labels [B, H, W] at the image's resolution: forward_train's logits,
        upsampled, against the labels (ignore_index left out). Where ignore_index is no class of the
        head, the diffusion takes ignored pixels as its last class, K (see ddps.app.heads.ddps.head_classes)."""
        diffusion = labels if 0 <= ignore_index < self.num_classes else \
            torch.where(labels == ignore_index, self.num_classes - 1, labels)
        logits, _ = self.forward_train(cond, diffusion, base)
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index)

    def _noisiest(self, b: int, h: int, w: int, device) -> torch.Tensor:
        """A mask at the noisiest level: uniform labels (the original's randint); under the mask
        transitions a draw from q(x_{T-1} | x_0), which no longer depends on x_0."""
        mask = torch.randint(0, self.num_classes, [b, h, w], device=device).long()
        if self.schedule.mask_index is None:
            return mask
        return self._noise(mask, torch.full([b], self.num_timesteps - 1, device=device))

    def cls_seg(self, feat: torch.Tensor) -> torch.Tensor:
        if self.dropout is not None:
            feat = self.dropout(feat)
        return self.conv_seg_new(feat)

    def denoise(self, cond: torch.Tensor, mask: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Logits [B, K, H, W] of the clean mask from cond, the noisy mask and timesteps [B]."""
        mask_embedding = self.embed(mask).permute(0, 3, 1, 2)
        return self.cls_seg(self.unet.forward_native_layout(torch.cat([cond, mask_embedding], dim=1), t))

    def _check_cond(self, cond) -> None:
        _checks.tensor(cond, "cond")
        if cond.dim() != 4 or cond.shape[1] != self.cond_channels:
            raise ValueError(f"cond must be [B, cond_channels={self.cond_channels}, H, W], got shape {tuple(cond.shape)}")
        if not cond.dtype.is_floating_point:
            raise TypeError(f"cond must be a floating-point tensor, got dtype {cond.dtype}")
        weights = self.unet.init_conv.weight.dtype
        if cond.dtype != weights and not torch.is_autocast_enabled(cond.device.type):
            raise TypeError(f"cond has dtype {cond.dtype} but the head's weights are {weights}: cast cond "
                            f"(cond.to({weights})) or the head (head.to({cond.dtype})), or run under torch.autocast")
        factor, levels = self.unet.size_multiple, self.unet.num_levels
        if cond.shape[2] % factor or cond.shape[3] % factor:
            raise ValueError(f"cond's spatial size {tuple(cond.shape[2:])} must be divisible by {factor}: the denoiser "
                             f"halves it {levels - 1} times (dim_mults has {levels} levels); pad or resize the features")
        _checks.same_device(cond, "cond", self.log_at.device, "the head")

    def cond_share(self, cond: torch.Tensor) -> torch.Tensor:
        """init_conv's bias plus its convolution over the condition channels: [B, dim, H, W]."""
        stem = self.unet.init_conv
        return F.conv2d(cond.contiguous(memory_format=torch.channels_last), stem.weight[:, :self.cond_channels],
                        stem.bias, padding=stem.padding)

    def denoise_from_share(self, cond_share: torch.Tensor, mask: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``denoise`` with init_conv's condition share given (``cond_share``): init_conv over
        cat(cond, embed(mask)) is the condition's convolution plus the embedding's, and only the
        latter (16 of 272 input channels at the ADE20K config) changes from call to call."""
        stem = self.unet.init_conv
        embedding = self.embed(mask).permute(0, 3, 1, 2)  # a channels-last view
        mask_share = F.conv2d(embedding, stem.weight[:, self.cond_channels:], None, padding=stem.padding)
        # Under autocast in its dtype, as the reference's init_conv returns it: the guidance branch's
        # share (init_conv's float32 bias) would otherwise widen the trunk's first level to float32,
        # and give its first Block's weight standardisation float32's eps.
        x = cond_share + mask_share
        return self.cls_seg(self.unet.trunk(x.to(compute_dtype(x)), t))

    def _step(self, cond: torch.Tensor):
        """The denoiser call of one inference step, guidance included: (mask, t) -> logits."""
        g = self.guidance_scale
        if self.backend == "reference":
            def step(mask, t):
                out = self.denoise(cond, mask, t)
                if g != 1:
                    out = out * (1 + g) - g * self.denoise(torch.zeros_like(cond), mask, t)
                return out
            return step
        # The condition's share of init_conv is computed once for all steps; the guidance branch's
        # condition is zero, so its share is init_conv's bias alone.
        share, unguided_share = self.cond_share(cond), self.unet.init_conv.bias[None, :, None, None]

        def step(mask, t):
            if g == 1:
                return self.denoise_from_share(share, mask, t)
            if self.batch_guidance:
                both = torch.cat([share, unguided_share.expand_as(share)]).contiguous(memory_format=torch.channels_last)
                out, unguided = self.denoise_from_share(both, torch.cat([mask, mask]), torch.cat([t, t])).chunk(2)
            else:
                out, unguided = self.denoise_from_share(share, mask, t), self.denoise_from_share(unguided_share, mask, t)
            return out * (1 + g) - g * unguided
        return step

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, base: torch.Tensor | None = None):
        self._check_cond(cond)
        b, _, h, w = cond.shape
        T = self.num_timesteps
        mask = self._noisiest(b, h, w, cond.device)
        step = self._step(cond)
        collected = {}
        out = None
        # With stop_below, an image leaves the batch once fewer than that fraction of its pixels
        # changed label in a step: ``live`` indexes the images still sampling, and ``frozen`` holds
        # every image's latest logits.
        live, frozen = torch.arange(b, device=cond.device), None
        self.steps_run = torch.zeros(b, dtype=torch.long, device=cond.device)
        for i in inference_timesteps(T, self.inference_steps):
            if len(live):
                t = (torch.ones([len(live)], device=cond.device) * i).long()
                noise_level = (torch.ones([len(live)], device=cond.device) * (T - i - 1)).long()
                if i != 0:
                    mask = self._next_mask(out, mask, noise_level)
                previous, out = out, step(mask, t)
                self.steps_run[live] += 1
                if self.stop_below > 0:
                    frozen = out.clone() if frozen is None else frozen.index_copy_(0, live, out)
                    if previous is not None:
                        changed = (out.argmax(1) != previous.argmax(1)).flatten(1).float().mean(1)
                        going = changed >= self.stop_below
                        if not going.all():
                            live, out, mask, cond = live[going], out[going], mask[going], cond[going]
                            step = self._step(cond)
            if i in self.collect_timesteps:
                collected[i] = out if frozen is None else frozen.clone()
        return (out if frozen is None else frozen), collected

    def _next_mask(self, logits, mask, noise_level):
        """The next step's noisy mask from the previous step's logits (SPEC §5)."""
        if self.backend == "reference":
            prev = logits.argmax(dim=1)
            if self.mode == "renoise":
                return reference.q_pred(prev, noise_level, self.schedule)
            return reference.q_posterior(prev, mask, noise_level, self.schedule)
        if self.mode == "renoise":  # argmax and re-noising in one pass over the logits
            return ops.renoise(logits, noise_level, self.schedule, backend=_backend.preferred("renoise", self.backend))
        return ops.q_posterior_sample(logits.argmax(dim=1), mask, noise_level, self.schedule,
                                      backend=_backend.preferred("q_posterior_sample", self.backend))

    def _check_train_input(self, cond: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        """gt as [B, 1, H', W'] labels, after the checks of both inputs."""
        self._check_cond(cond)
        _checks.labels(gt, "gt", self.num_classes)
        if gt.dim() == 3:
            gt = gt[:, None]
        if gt.dim() != 4 or gt.shape[1] != 1 or gt.shape[0] != cond.shape[0]:
            raise ValueError(f"gt must be [B={cond.shape[0]}, 1, H, W] or [B, H, W] labels, got shape {tuple(gt.shape)}")
        _checks.same_device(gt, "gt", cond.device, "cond")
        return gt

    def forward_train(self, cond: torch.Tensor, gt: torch.Tensor, base: torch.Tensor | None = None):
        gt = self._check_train_input(cond, gt)
        b, _, h, w = cond.shape
        device = cond.device
        if self.training and self.cond_dropout > 0:
            keep = torch.rand(size=(b, 1, 1, 1), device=device) >= self.cond_dropout
            cond = cond * keep.float()
        t = torch.randint(0, self.num_timesteps, [b], device=device)
        multi_step = t != 0
        source = F.interpolate(gt.float(), [h, w], mode="nearest").long().squeeze(1)
        # Fused: init_conv's condition share serves both denoiser calls below.
        share = None if self.backend == "reference" else self.cond_share(cond)
        if self.noise_source == "first_prediction" and multi_step.sum() > 0:
            with torch.no_grad():
                # "Diffusion on first prediction": the noised source is the model's own
                # prediction from a random mask, not the ground truth.
                n = int(multi_step.sum())
                mask_rand = self._noisiest(n, h, w, device)
                zero = torch.zeros([n], device=device).long()
                if share is None:
                    logits = self.denoise(cond[multi_step].clone().detach(), mask_rand, zero)
                else:
                    logits = self.denoise_from_share(share[multi_step], mask_rand, zero)
                source[multi_step] = logits.softmax(dim=1).argmax(dim=1).long()
        mask = self._noise(source, (self.num_timesteps - t - 1).long())
        if share is None:
            return self.denoise(cond, mask, t), t
        return self.denoise_from_share(share, mask, t), t


class RefinementHead(DDPSHead):
    """The control that separates the mask prior from the capacity: DDPSHead's UNet and classifier
    trained as a plain refinement head. Its input is the condition plus the embedded argmax of the
    segmentor's own logits (``base``), at the fixed timestep 0, with no noise drawn; inference is
    one denoiser call (guided as DDPSHead's), so ``sample`` collects no steps. DDPS minus this head
    is the effect of the diffusion rather than of the extra network."""

    metrics_name = "refine"

    def _base_labels(self, cond: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        if base is None:
            raise ValueError("the refinement head refines the segmentor's prediction: pass its logits as base "
                             "(a segmentor without a classifier has none)")
        if base.dim() != 4 or base.shape[0] != cond.shape[0] or base.shape[2:] != cond.shape[2:]:
            raise ValueError(f"base must be [B={cond.shape[0]}, K, {cond.shape[2]}, {cond.shape[3]}] logits at the "
                             f"condition's size, got shape {tuple(base.shape)}")
        return base.argmax(dim=1)

    def forward_train(self, cond: torch.Tensor, gt: torch.Tensor, base: torch.Tensor | None = None):
        self._check_train_input(cond, gt)
        t = torch.zeros(cond.shape[0], dtype=torch.long, device=cond.device)
        return self.denoise(cond, self._base_labels(cond, base), t), t

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, base: torch.Tensor | None = None):
        self._check_cond(cond)
        t = torch.zeros(cond.shape[0], dtype=torch.long, device=cond.device)
        return self._step(cond)(self._base_labels(cond, base), t), {}
