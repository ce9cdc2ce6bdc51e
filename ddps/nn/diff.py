"""DIFF (Ji et al., "Diffusion Features to Bridge Domain Gap for Semantic Segmentation") behind the
segmentor protocol: a frozen Stable-Diffusion UNet, VAE and text encoder (diffusers, transformers)
as the backbone, a trainable aggregation and top-down fusion of its features, and a decode head.

What DIFF computes, and where this module differs:
- the image in [-1, 1] is VAE-encoded and scaled by the VAE's scaling factor (0.18215 for SD 2.1);
  DIFF samples the latent posterior, here its mean is taken, so the features are a function of the
  image (same image, same features; they can be cached);
- DDIM inversion with an empty prompt over a fixed timestep list (DIFF's 37 for SD 2.1): step i
  runs the UNet at t_(i-1) (t_(-1) = 0) and moves the latent to t_i; at the chosen steps the
  residual branch of each captured up-block ResNet (``conv2``'s output, before the skip is added)
  and each captured up-block transformer block's output are kept (forward hooks). Steps after the
  last kept one change no feature and are not run. ``eta`` > 0 adds DIFF's stochastic term (drawn
  from the global RNG) for ``eta_range[0] < t < eta_range[1]``;
- per output stride the kept maps are concatenated over channels and projected by a bottleneck
  block with GroupNorm; the strides are fused top-down (deconvolution, add, residual block) into a
  pyramid from 1/4 to the coarsest stride. DIFF aggregates the UNet's 1/64 maps and then drops them:
  the default layer selection here skips them, and a selection that includes them fuses them;
- the decode head is an all-MLP head (per level 1x1 conv, upsampling to 1/4, concatenation, fusion)
  in place of DIFF's DAFormer head; its fused 1/4 features are the DDPS head's condition;
- IPKL (training only): a conditional branch runs the inversion with the empty prompt plus one
  prompt per ground-truth class present (classifier-free guidance, each class's latent update
  applied under its mask, the updates averaged), and the transformer features are averaged over
  the prompts (DIFF sums them, over a duplicated empty prompt too). The loss is the cross-entropy of
  both branches plus a weighted MSE between their logits.
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..segmentors import Segmentor, check_images, cross_entropy

def _diffusers():
    try:
        import diffusers
        import transformers
    except ImportError:
        raise ImportError("segmentor.type=diffusion-features needs diffusers and transformers: "
                          "pip install 'ddps[diff]'") from None
    return diffusers, transformers


def _char_tokenizer(max_length: int):
    """A CLIP tokenizer with no merges (one token per byte): the real tokenizer code for the tiny
    random text encoder, which has no vocabulary of its own."""
    _, transformers = _diffusers()
    from transformers.models.clip.tokenization_clip import bytes_to_unicode
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
        (Path(d) / "merges.txt").write_text("#version: 0.2\n")
        return transformers.CLIPTokenizer(str(Path(d) / "vocab.json"), str(Path(d) / "merges.txt"),
                                          model_max_length=max_length)


def tiny_models(dtype=torch.float32):
    """A random UNet / VAE / text encoder with SD 2.1's structure (4 up blocks, cross-attention in
    the last 3, an 8x VAE, linear projections) at a width that runs on a CPU in milliseconds: the
    model of ``segmentor.pretrained: null``, for tests and the synthetic run."""
    diffusers, transformers = _diffusers()
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 16, 32, 32),
        norm_num_groups=8, cross_attention_dim=16, attention_head_dim=4, use_linear_projection=True,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
                                  layers_per_block=1, norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=514, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16))
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    if dtype != torch.float32:
        unet, vae = unet.to(dtype), vae.to(dtype)
    return unet, vae, text, _char_tokenizer(16), scheduler.alphas_cumprod


def pretrained_models(source: str, dtype=torch.float32):
    """UNet, VAE, text encoder, tokenizer and the scheduler's cumulative alphas of a diffusers
    Stable-Diffusion folder or hub id (model_index.json with unet/, vae/, text_encoder/,
    tokenizer/, scheduler/), by diffusers' and transformers' own loading code."""
    diffusers, transformers = _diffusers()
    try:
        unet = diffusers.UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype)
        vae = diffusers.AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype)
        text = transformers.CLIPTextModel.from_pretrained(source, subfolder="text_encoder")
        tokenizer = transformers.CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
        scheduler = diffusers.DDIMScheduler.from_pretrained(source, subfolder="scheduler")
    except (OSError, ValueError) as e:
        raise ValueError(f"segmentor.pretrained: {source!r} is not a diffusers Stable-Diffusion model "
                         f"(unet/, vae/, text_encoder/, tokenizer/, scheduler/): {e}") from None
    return unet, vae, text, tokenizer, scheduler.alphas_cumprod


def _gn(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(channels, groups), channels)


class Bottleneck(nn.Module):
    """detectron2's bottleneck block with GroupNorm (1x1, 3x3, 1x1; a projected shortcut), DIFF's
    per-stride projection of the concatenated maps."""

    def __init__(self, cin: int, cout: int, groups: int = 16):
        super().__init__()
        mid = max(cout // 4, 1)
        self.body = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), _gn(mid, groups), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False), _gn(mid, groups), nn.ReLU(inplace=True),
            nn.Conv2d(mid, cout, 1, bias=False), _gn(cout, groups))
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), _gn(cout, groups))

    def forward(self, x):
        return F.relu(self.body(x) + self.shortcut(x))


class ResBlock(nn.Module):
    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), _gn(channels, groups), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1), _gn(channels, groups))

    def forward(self, x):
        return F.relu(self.body(x) + x)


class Fusion(nn.Module):
    """DIFF's top-down fusion: each level GroupNorm-ed, then from the coarsest down
    x = ResBlock(deconv(x) + level), and a last deconvolution to 1/4. Returns the pyramid fine to
    coarse: [1/4, then the input levels]."""

    def __init__(self, channels: list[int], x4: int, groups: int = 32):
        super().__init__()
        self.norms = nn.ModuleList(_gn(c, groups) for c in channels)  # fine to coarse
        targets = channels[:-1][::-1] + [x4]
        sources = channels[::-1]
        self.ups = nn.ModuleList(nn.ConvTranspose2d(s, t, 4, 2, 1) for s, t in zip(sources, targets))
        self.blocks = nn.ModuleList(ResBlock(t, groups) for t in targets)

    def forward(self, levels):
        levels = [norm(x) for norm, x in zip(self.norms, levels)]
        x = levels[-1]
        for i, (up, block) in enumerate(zip(self.ups, self.blocks)):
            x = up(x)
            finer = len(levels) - 2 - i
            if finer >= 0:
                x = x + levels[finer]
            x = block(x)
        return [x, *levels]


class MLPHead(nn.Module):
    """Per level a 1x1 convolution to ``channels``, bilinear upsampling to the finest level,
    concatenation and a fusing 1x1 convolution with GroupNorm and ReLU: the 1/4 features."""

    def __init__(self, in_channels: list[int], channels: int):
        super().__init__()
        self.proj = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.fuse = nn.Sequential(nn.Conv2d(channels * len(in_channels), channels, 1, bias=False), _gn(channels, 8),
                                  nn.ReLU(inplace=True))

    def forward(self, levels):
        size = levels[0].shape[-2:]
        outs = [F.interpolate(p(x), size=size, mode="bilinear", align_corners=False) if i else p(x)
                for i, (p, x) in enumerate(zip(self.proj, levels))]
        return self.fuse(torch.cat(outs, 1))


class DiffusionBackbone(nn.Module):
    """The frozen UNet and VAE, the prompts' embeddings, and the DDIM inversion that keeps the
    UNet's features.

    ``resnets`` / ``attentions``: [up block, index] pairs (None: every one of every up block but
    the first, the maps that reach DIFF's decode head). The captured up blocks must be consecutive
    and include the finest, so that their strides form a pyramid down to 1/8 of the latent's."""

    def __init__(self, models, timesteps, save_steps, resnets=None, attentions=None, eta: float = 0.0,
                 eta_range=(10, 250), guidance_scale: float = 5.0, prompts=()):
        super().__init__()
        self.unet, self.vae, text_encoder, tokenizer, alphas = models
        self.register_buffer("alphas", torch.as_tensor(alphas, dtype=torch.float32), persistent=False)
        ts = sorted(int(t) for t in timesteps)
        if len(set(ts)) != len(ts) or not 0 < ts[0] <= ts[-1] < len(self.alphas):
            raise ValueError(f"segmentor.diff.timesteps: {list(timesteps)} must be distinct, in "
                             f"[1, {len(self.alphas)})")
        bad = [s for s in save_steps if not 0 <= s < len(ts)]
        if bad or not save_steps:
            raise ValueError(f"segmentor.diff.save_steps: {bad or 'none'}: expected inversion steps in "
                             f"[0, {len(ts)}) (one per segmentor.diff.timesteps)")
        # step i runs the UNet at t_(i-1) (0 for the first) and moves the latent to t_i
        self.steps = list(zip([0] + ts[:-1], ts))
        self.save_steps = sorted(set(save_steps))
        self.eta, self.eta_range, self.guidance_scale = eta, tuple(eta_range), guidance_scale
        blocks = self.unet.up_blocks
        last = len(blocks) - 1
        if resnets is None:
            resnets = [[i, j] for i in range(1, last + 1) for j in range(len(blocks[i].resnets))]
        if attentions is None:
            attentions = [[i, j] for i in range(1, last + 1)
                          for j in range(len(getattr(blocks[i], "attentions", None) or []))]
        self.layers = []  # (kind, block, index)
        for kind, pairs, attr in (("resnet", resnets, "resnets"), ("attention", attentions, "attentions")):
            for pair in pairs:
                i, j = pair
                modules = (getattr(blocks[i], attr, None) or []) if 0 <= i <= last else []
                if not 0 <= j < len(modules):
                    raise ValueError(f"segmentor.diff.{attr}: [{i}, {j}] is not a layer of the UNet "
                                     f"({last + 1} up blocks; {attr} per block: "
                                     f"{[len(getattr(b, attr, None) or []) for b in blocks]})")
                module = modules[j].conv2 if kind == "resnet" else modules[j].transformer_blocks[0]
                module.register_forward_hook(self._hook((kind, i, j)))
                self.layers.append((kind, i, j))
        used = sorted({i for _, i, _ in self.layers}, reverse=True)  # fine to coarse
        if not used or used[0] != last or used != list(range(last, last - len(used), -1)):
            raise ValueError(f"segmentor.diff: the captured up blocks {sorted(used)} must be consecutive and include "
                             f"the finest, {last}")
        self.blocks = used
        self.latent_stride = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.multiple = self.latent_stride * 2 ** last
        self._kept = None
        self._has_prompt = [bool(p) for p in prompts]
        # The prompts' embeddings, computed once: the text encoder is not kept (SD 2.1's has 340M weights).
        with torch.no_grad():  # the empty prompt, then the classes' (IPKL)
            ids = tokenizer(["", *prompts], padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            self.register_buffer("prompts", text_encoder(ids).last_hidden_state.float())
        self.requires_grad_(False).eval()

    def _hook(self, key):
        def keep(module, inputs, output):
            if self._kept is not None:
                self._kept.setdefault(key, []).append(output)
        return keep

    def train(self, mode: bool = True):
        return super().train(False)  # dropout of a frozen model stays off

    def channels(self) -> list[int]:
        """Channels of each captured stride's concatenated maps, fine to coarse."""
        def width(kind, i, j):
            up = self.unet.up_blocks[i]
            if kind == "resnet":
                return up.resnets[j].conv2.out_channels
            return up.attentions[j].transformer_blocks[0].norm1.normalized_shape[0]
        return [sum(width(*layer) for layer in self.layers if layer[1] == block) * len(self.save_steps)
                for block in self.blocks]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Latents (the posterior mean, scaled) of images in [0, 255], [B, 3, H, W] with H, W
        multiples of ``multiple``."""
        dtype = self.unet.dtype
        x = (images.float() / 127.5 - 1).to(dtype)
        return self.vae.encode(x).latent_dist.mean.float() * self.vae.config.scaling_factor

    def _ddim(self, x, e, t: int, nt: int):
        """DIFF's DDIM step from t to nt (eta > 0: its stochastic term)."""
        a, an = self.alphas[t], self.alphas[nt]
        eta = self.eta if self.eta_range[0] < t < self.eta_range[1] else 0.0
        c1 = eta * ((1 - an / a) * (1 - an) / (1 - a)).sqrt()
        c2 = (1 - an - c1 ** 2).clamp_min(1e-10).sqrt()
        x0 = (x - (1 - a).sqrt() * e) / a.sqrt()
        out = an.sqrt() * x0 + c2 * e
        return out + c1 * torch.randn_like(e) if eta else out

    def features(self, latents: torch.Tensor, labels: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per captured stride, fine to coarse, the kept maps concatenated over channels (float32).
        ``labels`` [B, h, w] at the latent's resolution: IPKL's conditional branch, one prompt per
        class present that has a prompt (ignore values and classes without one have none)."""
        b = latents.shape[0]
        groups, masks = [0], []
        if labels is not None:
            for c in torch.unique(labels).tolist():
                if 0 <= c < len(self.prompts) - 1 and self._has_prompt[c]:
                    groups.append(c + 1)
                    masks.append((labels == c)[:, None].float())
        emb = self.prompts[groups].to(self.unet.dtype).repeat_interleave(b, 0)
        kept, x = {}, latents.float()
        for i, (t, nt) in enumerate(self.steps[:self.save_steps[-1] + 1]):
            self._kept = kept if i in self.save_steps else None
            try:
                e = self.unet(x.repeat(len(groups), 1, 1, 1).to(self.unet.dtype), t,
                              encoder_hidden_states=emb).sample.float()
            finally:
                self._kept = None
            if i == self.save_steps[-1]:
                break
            eu = e[:b]
            x_next = self._ddim(x, eu, t, nt)
            if masks:  # each class's guided update under its mask, averaged with the unconditional one
                value, count = x_next, torch.ones_like(masks[0])
                for g, m in enumerate(masks, 1):
                    guided = eu + self.guidance_scale * (e[g * b:(g + 1) * b] - eu)
                    value, count = value + m * self._ddim(x, guided, t, nt), count + m
                x_next = value / count
            x = x_next
        return self._assemble(kept, b, latents.shape[-2:], len(groups))

    def _assemble(self, kept: dict, b: int, size, groups: int) -> list[torch.Tensor]:
        out = []
        for block in self.blocks:
            h, w = (s // 2 ** (len(self.unet.up_blocks) - 1 - block) for s in size)
            maps = []
            for kind, i, j in self.layers:
                if i != block:
                    continue
                for y in kept[(kind, i, j)]:
                    if kind == "resnet":
                        maps.append(y[:b].float())
                    else:  # [groups * B, h * w, C], averaged over the prompts
                        y = y.float().view(groups, b, h, w, -1).mean(0)
                        maps.append(y.permute(0, 3, 1, 2))
            out.append(torch.cat(maps, 1))
        return out


class DIFFSegmentor(Segmentor):
    """The DIFF segmentor: the frozen :class:`DiffusionBackbone`, a bottleneck per stride, the
    top-down fusion and an all-MLP decode head (``channels``: the features' width, the DDPS head's
    condition) with a 1x1 classifier. Images of any size are padded (bottom, right) to the UNet's
    multiple and the outputs cropped back to ceil(H/4) x ceil(W/4).

    Only the aggregation, fusion, decode head and classifier train. The state dict leaves out the
    frozen models when they come from ``pretrained`` (reloaded from there), and holds them when
    they are the random tiny ones."""

    def __init__(self, num_classes: int, channels: int, diff, pretrained: str | None = None, dtype=torch.float32):
        super().__init__()
        models = pretrained_models(pretrained, dtype) if pretrained else tiny_models(dtype)
        self.pretrained = pretrained
        self.backbone = DiffusionBackbone(models, diff.timesteps, diff.save_steps, diff.resnets, diff.attentions,
                                          diff.eta, diff.eta_range, diff.guidance_scale, diff.class_prompts)
        widths = self.backbone.channels()
        if len(diff.projection) < len(widths):
            raise ValueError(f"segmentor.diff.projection: {diff.projection} gives {len(diff.projection)} widths for "
                             f"{len(widths)} captured strides (fine to coarse)")
        proj = list(diff.projection[:len(widths)])
        self.aggregate = nn.ModuleList(Bottleneck(c, p) for c, p in zip(widths, proj))
        self.fusion = Fusion(proj, diff.projection_x4)
        self.decode = MLPHead([diff.projection_x4, *proj], channels)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.num_classes, self.feature_channels = num_classes, channels
        self.ipkl, self.ipkl_weight = diff.ipkl, diff.ipkl_weight

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        if self.pretrained:
            prefix = kwargs.get("prefix", "") + "backbone."
            for key in [k for k in state if k.startswith(prefix)]:
                del state[key]
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if self.pretrained:
            state_dict = {**{f"backbone.{k}": v for k, v in self.backbone.state_dict().items()}, **state_dict}
        return super().load_state_dict(state_dict, strict, assign)

    def _pad(self, images: torch.Tensor) -> torch.Tensor:
        m = self.backbone.multiple
        h, w = images.shape[-2:]
        return F.pad(images.float(), (0, -w % m, 0, -h % m))

    def _decode(self, levels, size):
        levels = [agg(x) for agg, x in zip(self.aggregate, levels)]
        features = self.decode(self.fusion(levels))[..., :(size[0] + 3) // 4, :(size[1] + 3) // 4]
        return features, self.classifier(features)

    def forward(self, images: torch.Tensor):
        x = self._pad(check_images(images))
        with torch.no_grad():
            levels = self.backbone.features(self.backbone.encode(x))
        return self._decode(levels, images.shape[-2:])

    def loss(self, images: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
        if not self.ipkl:
            return super().loss(images, labels, ignore_index)
        x = self._pad(check_images(images))
        with torch.no_grad():
            latents = self.backbone.encode(x)
            # the ground truth at the latent's resolution (nearest), padding ignored
            padded = F.pad(labels, (0, x.shape[-1] - labels.shape[-1], 0, x.shape[-2] - labels.shape[-2]), value=-1)
            small = F.interpolate(padded[:, None].float(), size=latents.shape[-2:], mode="nearest")[:, 0].long()
            plain = self.backbone.features(latents)
            guided = self.backbone.features(latents, small)
        _, logits = self._decode(plain, images.shape[-2:])
        _, logits_c = self._decode(guided, images.shape[-2:])
        return (cross_entropy(logits, labels, ignore_index) + cross_entropy(logits_c, labels, ignore_index)
                + self.ipkl_weight * F.mse_loss(logits_c, logits))
