"""Shared pieces of the application's tests: the command line in this process or in another, an
original mmseg DDPS checkpoint's segmentor at MiT-B0 size, a tiny diffusers Stable-Diffusion
folder."""
import subprocess
import sys
import types

import torch

from ddps.app.segmentors.diffusion_backbone import _diffusers, tiny_models


def start(*args):
    """``python -m ddps ARGS`` started in a process of its own (for signals)."""
    return subprocess.Popen([sys.executable, "-m", "ddps", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


# mmseg's MiT-B0 as the released checkpoints lay it out (stage widths 32 * (1, 2, 5, 8), two
# layers per stage, spatial reduction 8/4/2/1, patches 7/3/3/3), written from mmseg's module
# structure rather than from ddps' mapping, so that the test checks the mapping.
B0_WIDTHS, B0_DEPTHS, B0_HEADS, SR, PATCH = (32, 64, 160, 256), (2, 2, 2, 2), (1, 2, 5, 8), (8, 4, 2, 1), (7, 3, 3, 3)
CHANNELS = 16  # the SegFormer head's width in these tests (256 in the released B2 models)


def mmseg_b0_state(gen: torch.Generator, channels: int = CHANNELS) -> dict:
    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=gen) * scale

    def norm(prefix, c):
        return {f"{prefix}.weight": 1 + rand(c), f"{prefix}.bias": rand(c)}

    def bn(prefix, c):
        return {**norm(prefix, c), f"{prefix}.running_mean": rand(c), f"{prefix}.running_var": 0.5 + rand(c).abs(),
                f"{prefix}.num_batches_tracked": torch.tensor(1000)}

    state, cin = {}, 3
    for i, c in enumerate(B0_WIDTHS):
        stage = f"backbone.layers.{i}"
        state[f"{stage}.0.projection.weight"] = rand(c, cin, PATCH[i], PATCH[i])
        state[f"{stage}.0.projection.bias"] = rand(c)
        state.update(norm(f"{stage}.0.norm", c))
        for j in range(B0_DEPTHS[i]):
            layer = f"{stage}.1.{j}"
            state.update(norm(f"{layer}.norm1", c))
            state[f"{layer}.attn.attn.in_proj_weight"] = rand(3 * c, c)
            state[f"{layer}.attn.attn.in_proj_bias"] = rand(3 * c)
            state[f"{layer}.attn.attn.out_proj.weight"] = rand(c, c)
            state[f"{layer}.attn.attn.out_proj.bias"] = rand(c)
            if SR[i] > 1:
                state[f"{layer}.attn.sr.weight"] = rand(c, c, SR[i], SR[i], scale=0.05)
                state[f"{layer}.attn.sr.bias"] = rand(c)
                state.update(norm(f"{layer}.attn.norm", c))
            state.update(norm(f"{layer}.norm2", c))
            state[f"{layer}.ffn.layers.0.weight"] = rand(4 * c, c, 1, 1)
            state[f"{layer}.ffn.layers.0.bias"] = rand(4 * c)
            state[f"{layer}.ffn.layers.1.weight"] = rand(4 * c, 1, 3, 3)
            state[f"{layer}.ffn.layers.1.bias"] = rand(4 * c)
            state[f"{layer}.ffn.layers.4.weight"] = rand(c, 4 * c, 1, 1, scale=0.1)
            state[f"{layer}.ffn.layers.4.bias"] = rand(c)
        state.update(norm(f"{stage}.2", c))
        state[f"decode_head.convs.{i}.conv.weight"] = rand(channels, c, 1, 1)
        state.update(bn(f"decode_head.convs.{i}.bn", channels))
        cin = c
    state["decode_head.fusion_conv.conv.weight"] = rand(channels, 4 * channels, 1, 1)
    state.update(bn("decode_head.fusion_conv.bn", channels))
    return state


def pretrained_folder(path):
    """A tiny random Stable-Diffusion folder as diffusers saves one (unet/, vae/, text_encoder/,
    tokenizer/, scheduler/); returns its UNet."""
    torch.manual_seed(5)
    unet, vae, text, tokenizer, _ = tiny_models()
    unet.save_pretrained(path / "unet")
    vae.save_pretrained(path / "vae")
    text.save_pretrained(path / "text_encoder")
    tokenizer.save_pretrained(path / "tokenizer")
    _diffusers()[0].DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").save_pretrained(
        path / "scheduler")
    return unet


def run_cli(capsys, *args):
    """``ddps ARGS`` in this process, as its console script runs it (without a second process's
    start-up): an object with returncode, stdout and stderr."""
    from ddps.app.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return types.SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)
