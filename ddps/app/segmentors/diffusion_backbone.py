"""DIFF's frozen backbone: a Stable-Diffusion UNet, VAE and text encoder (diffusers,
transformers; the pretrained ones or a tiny random model of the same structure) and the DDIM
inversion that keeps the UNet's up-block features (see ``diff.py``)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from torch import nn

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


class DiffusionBackbone(nn.Module):
    """The frozen UNet and VAE, the prompts' embeddings, and the DDIM inversion that keeps the
    UNet's features.

    ``resnets`` / ``attentions``: [up block, index] pairs (None: every one of every up block but
    the first, the maps that reach DIFF's decode head). The captured up blocks must be consecutive
    and include the finest, so that their strides form a pyramid down to 1/8 of the latent's."""

    def __init__(self, models, timesteps, save_steps, resnets=None, attentions=None, eta: float = 1.0,
                 eta_range=(10, 250), guidance_scale: float = 5.0, prompts=(), latent: str = "sample",
                 prompt_features: str = "sum"):
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
        self.latent, self.prompt_features = latent, prompt_features
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
        """Latents (scaled) of images in [0, 255], [B, 3, H, W] with H, W multiples of
        ``multiple``: a draw from the VAE's posterior (global RNG; DIFF's) or its mean."""
        dtype = self.unet.dtype
        x = (images.float() / 127.5 - 1).to(dtype)
        posterior = self.vae.encode(x).latent_dist
        latents = posterior.sample() if self.latent == "sample" else posterior.mean
        return latents.float() * self.vae.config.scaling_factor

    def _ddim(self, x, e, t: int, nt: int):
        """DIFF's DDIM step from t to nt (eta > 0: its stochastic term)."""
        a, an = self.alphas[t], self.alphas[nt]
        eta = self.eta if self.eta_range[0] < t < self.eta_range[1] else 0.0
        c1 = eta * ((1 - an / a) * (1 - an) / (1 - a)).sqrt()
        c2 = (1 - an - c1 ** 2).clamp_min(1e-10).sqrt()
        x0 = (x - (1 - a).sqrt() * e) / a.sqrt()
        out = an.sqrt() * x0 + c2 * e
        return out + c1 * torch.randn_like(e) if eta else out

    def _step(self, x, e, t: int, nt: int, masks):
        """The inversion's move from t to nt: the DDIM step on the unconditional noise e[:B]; under
        IPKL (``masks``: one per prompted class, its noise e[gB:(g+1)B]) each class's guided step
        under its mask, averaged with the unconditional one."""
        b = x.shape[0]
        eu = e[:b]
        x_next = self._ddim(x, eu, t, nt)
        if not masks:
            return x_next
        value, count = x_next, torch.ones_like(masks[0])
        for g, m in enumerate(masks, 1):
            guided = eu + self.guidance_scale * (e[g * b:(g + 1) * b] - eu)
            value, count = value + m * self._ddim(x, guided, t, nt), count + m
        return value / count

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
            x = self._step(x, e, t, nt, masks)
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
                    else:  # [groups * B, h * w, C], over the prompts
                        y = y.float().view(groups, b, h, w, -1)
                        # DIFF sums them, its empty prompt twice (it runs the UNet on two copies of it)
                        y = y.sum(0) + y[0] if self.prompt_features == "sum" else y.mean(0)
                        maps.append(y.permute(0, 3, 1, 2))
            out.append(torch.cat(maps, 1))
        return out
