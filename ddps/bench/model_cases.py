"""The cases of the denoiser modules (Attention, LinearAttention on NCHW and channels-last input,
the UNet) and of the whole ADE20K head (one denoiser step, sampling, a training step)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..nn import DDPSHead
from ..nn.head import ADE20K_HEAD
from ..nn.unet import Attention, LinearAttention, UNet
from .cases import DIM, HEAD, K, LAYOUTS, MODULE, T, Case, output_grad


def _module_pair(cls, *args):
    torch.manual_seed(0)
    ref = cls(*args)
    fused = cls(*args, backend="auto")
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def module_cases(batch: int, size: int, modes, linear_sides=None, unet: bool = True) -> list[Case]:
    """Attention at S/4 and LinearAttention at ``linear_sides`` (default: S, S/2 and S/4, the
    UNet's levels), on NCHW and channels-last input, in ``modes``; and the UNet's forward."""
    cases = []
    for mode in modes:
        for layout, fmt in LAYOUTS.items():
            def build_for(cls, shape, extra=(), mode=mode, fmt=fmt):
                def build(device):
                    ref, fused = (m.to(device) for m in _module_pair(cls, *shape[1:2], *extra))
                    # Every provider gets x in the case's layout: NCHW as a user's own model gives it, or
                    # channels-last as inside the fused UNet.
                    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(device)
                    x = x.contiguous(memory_format=fmt)
                    inputs = {"reference": ref, "compile(reference)": torch.compile(ref, dynamic=False), "fused": fused}
                    return {name: _module_call(m, x, mode) for name, m in inputs.items()}
                return build

            side = size // 4
            cases.append(Case("Attention", "module", f"x [{batch},{DIM},{side},{side}] {layout}", mode,
                              build_for(Attention, (batch, DIM, side, side)), MODULE, flops=True))
            for side in linear_sides or (size, size // 2, size // 4):
                cases.append(Case("LinearAttention", "module", f"x [{batch},{DIM},{side},{side}] {layout}", mode,
                                  build_for(LinearAttention, (batch, DIM, side, side)), MODULE, flops=True))

    def build_unet(device):
        ref, fused = (m.to(device).eval() for m in _module_pair(UNet, DIM, DIM, DIM + 16, (1, 1, 1)))
        x = torch.randn(1, DIM + 16, size, size, generator=torch.Generator().manual_seed(0)).to(device)
        t = torch.tensor([5], device=device)
        compiled = torch.compile(ref, dynamic=False)
        return {name: (lambda m=m: _no_grad(m, x, t))
                for name, m in (("reference", ref), ("compile(reference)", compiled), ("fused", fused))}
    if unet:
        cases.append(Case("UNet", "module", f"x [1,{DIM + 16},{size},{size}]", "fwd", build_unet, MODULE, flops=True,
                          heavy=True))
    return cases


def _no_grad(module, *args):
    with torch.no_grad():
        return module(*args)


def _module_call(module, x, mode):
    if mode == "fwd":
        module.eval()
        return lambda: _no_grad(module, x)
    module.train()
    leaf = x.detach().clone().requires_grad_()
    grad = {}

    def call():
        module.zero_grad(set_to_none=True)
        leaf.grad = None
        out = module(leaf)
        out.backward(output_grad(out, grad))
        return leaf.grad
    return call


def head_cases(size: int) -> list[Case]:
    def heads(device):
        torch.manual_seed(0)
        ref = DDPSHead(**ADE20K_HEAD).to(device)
        fused = DDPSHead(**ADE20K_HEAD, backend="auto").to(device)
        fused.load_state_dict(ref.state_dict(), strict=True)
        g = torch.Generator().manual_seed(0)
        return {"reference": ref, "ddps": fused}, g

    def step(device):
        models, g = heads(device)
        cond = torch.randn(1, DIM, size, size, generator=g).to(device)
        mask = torch.randint(0, K, (1, size, size), generator=g).to(device)
        t = torch.tensor([10], device=device)
        return {name: (lambda h=h: _no_grad(lambda: h.eval()._step(cond)(mask, t))) for name, h in models.items()}

    def sample(device):
        models, g = heads(device)
        cond = torch.randn(1, DIM, size, size, generator=g).to(device)
        return {name: (lambda h=h: h.eval().sample(cond)[0]) for name, h in models.items()}

    def train(device):
        models, g = heads(device)
        cond = torch.randn(2, DIM, size, size, generator=g).to(device)
        gt = torch.randint(0, K, (2, 4 * size, 4 * size), generator=g).to(device)

        def call(head):
            head.train()
            torch.manual_seed(1)  # the same noise levels t on both heads
            logits, _ = head.forward_train(cond, gt)
            loss = F.cross_entropy(F.interpolate(logits, gt.shape[-2:], mode="bilinear"), gt)
            loss.backward()
            head.zero_grad(set_to_none=True)
            return logits.detach()
        return {name: (lambda h=h: call(h)) for name, h in models.items()}

    group = "end-to-end"
    shape = f"ADE20K head, mask {size}x{size}"
    return [
        Case("head.step", group, f"{shape}, B=1, guidance 0.4", "fwd", step, HEAD, flops=True, heavy=True),
        # The noise is drawn differently on the two heads (dense Gumbel vs Philox): shapes are compared.
        Case("head.sample", group, f"{shape}, B=1, T={T}, 3 steps", "fwd", sample, HEAD, compare="shape", flops=True,
             heavy=True, breakdown=True),
        Case("head.train_step", group, f"{shape}, B=2", "fwd+bwd", train, HEAD, compare="shape", heavy=True),
    ]
