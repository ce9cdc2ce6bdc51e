"""The cases of ``ddps bench``: every op of the sampling and denoiser kernels, the denoiser modules
and the whole head, each with its providers.

Providers: ``reference`` (the original's eager ops: the baseline of every speedup),
``compile(reference)`` (torch.compile of the same function, static shapes: each shape gets its own
graph, as a user compiling for one input size would have, and Inductor 2.13 fails on the dynamic
LinearAttention fwd+bwd graph that the second shape would otherwise trigger), ``plain-torch`` (the best formulation
in stock torch ops where it differs from both the reference and ddps) and each ddps backend that
runs on the device (``cpu``, ``cuda``, ``triton``; modules and heads: ``fused``/``ddps``).

Shapes follow the ADE20K head (K = 151, dim 256, T = 20) from one mask size S (default 128): the
sampling ops and the first LinearAttention at S x S, the Block at S/2, the mid Attention at S/4.
Every case builds its tensors only when it runs.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .. import _backend, maskige, ops, reference
from ..nn.head import ADE20K_HEAD
from ..ops import _tables
from ..ops._common import DTYPES
from ..ops.attention import split_heads
from ..ops.conv3x3 import winograd_weight
from ..ops.maskige_decode import composite as maskige_decode_composite
from ..schedule import DiffusionSchedule

K, T, DIM = ADE20K_HEAD["num_classes"], ADE20K_HEAD["num_timesteps"], ADE20K_HEAD["dim"]
REFERENCE = ("reference", "compile(reference)")
PLAIN = (*REFERENCE, "plain-torch")
MODULE = (*REFERENCE, "fused")
HEAD = ("reference", "ddps")
LAYOUTS = {"NCHW": torch.contiguous_format, "channels-last": torch.channels_last}


@dataclass
class Case:
    """One row group of the table. ``build(device)`` returns {provider: zero-argument callable}
    in table order, reference first; each call returns the tensor (or tuple) compared against the
    reference's. ``compare``: "values" (max relative difference) or "shape" (samplers and noisy
    loops, whose draws differ between providers by design; their distributions are tested in
    tests/)."""

    name: str
    group: str
    shape: str
    mode: str
    build: Callable[[torch.device], dict]
    fixed: tuple[str, ...]  # the providers other than the ddps backends of ``op``, in table order
    op: str | None = None  # the ddps op whose runnable backends are providers too
    compare: str = "values"
    nbytes: int | None = None  # bytes the op must move: its inputs read once, its output written once
    flops: bool = False  # report GFLOP/s (matmul and convolution FLOPs of each provider's call)
    heavy: bool = False  # seconds per call: fewer repeats, no torch.compile provider in the quick profile
    breakdown: bool = False  # report the ddps providers' time by kind of op (ddps.bench.breakdown)

    def provider_names(self, device: torch.device) -> list[str]:
        """The keys of ``build(device)``, known without building anything."""
        return [*self.fixed, *(ddps_backends(self.op, device) if self.op else ())]

    def at_dtype(self, dtype: str) -> bool:
        """Whether --dtype adds rows to this case: the denoiser's ops, modules and heads (the
        sampling ops take labels and logits as given, whatever autocast says)."""
        return dtype != "fp32" and self.group in ("denoiser op", "module", "end-to-end")


def with_dtype(case: Case, providers: dict, dtype: str, device: torch.device) -> dict:
    """``providers`` plus, for ``--dtype bf16`` or ``fp16``, each ddps provider (every one but the
    reference, its torch.compile and plain torch) once more under ``torch.autocast`` at that dtype,
    named ``provider[dtype]`` and placed after it: its float32 row and the reference's beside it."""
    if not case.at_dtype(dtype):
        return providers
    out = {}
    for name, fn in providers.items():
        out[name] = fn
        if name not in PLAIN:
            out[f"{name}[{dtype}]"] = functools.partial(_autocast, fn, device, DTYPES[dtype])
    return out


def _autocast(fn, device, dtype):
    with torch.autocast(device.type, dtype=dtype):
        return fn()


def ddps_backends(op: str, device: torch.device) -> list[str]:
    """The ddps backends of ``op`` that run on ``device``. Triton on CPU tensors is its interpreter,
    a test tool, so it is not benchmarked."""
    usable = []
    for name in _backend.IMPLEMENTED[op]:
        if name == "reference" or (name == "triton" and device.type == "cpu"):
            continue
        try:
            _backend.resolve(op, name, device)
        except ValueError:
            continue
        usable.append(name)
    return usable


def _compiled(fn, *args):
    compiled = torch.compile(fn, dynamic=False)
    return lambda: compiled(*args)


# --- sampling ops: the best plain-torch formulations on labels (no [B, K, ...] tensors) --------
def plain_q_sample(x0, t, schedule):
    table = schedule.table("q_sample", _tables.q_sample_table).double() / 2**32
    u = torch.rand(x0.shape, dtype=torch.float64, device=x0.device)
    level = table[t].reshape(-1, *([1] * (x0.dim() - 1)), 2)
    noised = torch.where(u < level[..., 1], schedule.num_classes, torch.randint_like(x0, schedule.num_classes))
    return torch.where(u < level[..., 0], x0, noised)


def plain_q_posterior_sample(x0, x_t, t, schedule):
    table = schedule.table("q_posterior_sample", _tables.q_posterior_table).double() / 2**32
    case = torch.where(x_t == x0, 0, 1)
    b = torch.arange(x0.shape[0], device=x0.device).reshape(-1, *([1] * (x0.dim() - 1)))
    to_xt, to_x0 = table[t[b], case].unbind(-1)
    u = torch.rand(x0.shape, dtype=torch.float64, device=x0.device)
    lo, hi = torch.minimum(x0, x_t), torch.maximum(x0, x_t)
    idx = torch.randint_like(x0, schedule.num_classes - 2)
    idx = idx + (idx >= lo)
    idx = idx + ((hi != lo) & (idx >= hi))
    return torch.where(u < to_xt, x_t, torch.where(u < to_x0, x0, idx))


def _sampling_inputs(batch, size, device):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, K, (batch, size, size), generator=g).to(device)
    x_t = torch.randint(0, K, (batch, size, size), generator=g).to(device)
    logits = torch.randn(batch, K, size, size, generator=g).to(device)
    t = (torch.arange(batch) * (T - 1) // max(batch - 1, 1)).to(device)
    return DiffusionSchedule(T, K).to(device), x0, x_t, logits, t


def sampling_cases(batch: int, size: int) -> list[Case]:
    # Long: one builder per op (its providers, the ddps backends among them) and the table of
    # cases that names them; split up, the table would be read apart from what it builds.
    shape = f"B={batch} K={K} {size}x{size}"
    labels = batch * size * size * 8
    logit_bytes = batch * K * size * size * 4

    def q_sample(device):
        schedule, x0, _, _, t = _sampling_inputs(batch, size, device)
        return {"reference": lambda: reference.q_pred(x0, t, schedule),
                "compile(reference)": _compiled(reference.q_pred, x0, t, schedule),
                "plain-torch": lambda: plain_q_sample(x0, t, schedule),
                **{b: (lambda b=b: ops.q_sample(x0, t, schedule, backend=b))
                   for b in ddps_backends("q_sample", device)}}

    def q_posterior_sample(device):
        schedule, x0, x_t, _, t = _sampling_inputs(batch, size, device)
        return {"reference": lambda: reference.q_posterior(x0, x_t, t, schedule),
                "compile(reference)": _compiled(reference.q_posterior, x0, x_t, t, schedule),
                "plain-torch": lambda: plain_q_posterior_sample(x0, x_t, t, schedule),
                **{b: (lambda b=b: ops.q_posterior_sample(x0, x_t, t, schedule, backend=b))
                   for b in ddps_backends("q_posterior_sample", device)}}

    def renoise(device):
        schedule, _, _, logits, t = _sampling_inputs(batch, size, device)

        def ref(logits):
            return reference.q_pred(logits.argmax(1), t, schedule)
        return {"reference": lambda: ref(logits),
                "compile(reference)": _compiled(ref, logits),
                "plain-torch": lambda: plain_q_sample(logits.argmax(1), t, schedule),
                **{b: (lambda b=b: ops.renoise(logits, t, schedule, backend=b))
                   for b in ddps_backends("renoise", device)}}

    def p_posterior_sample(device):
        schedule, _, x_t, logits, t = _sampling_inputs(batch, size, device)
        return {"reference": lambda: reference.p_posterior(logits, x_t, t, schedule),
                "compile(reference)": _compiled(reference.p_posterior, logits, x_t, t, schedule),
                **{b: (lambda b=b: ops.p_posterior_sample(logits, x_t, t, schedule, backend=b))
                   for b in ddps_backends("p_posterior_sample", device)}}

    def posterior_log_probs(device):
        schedule, _, x_t, logits, t = _sampling_inputs(batch, size, device)
        return {"reference": lambda: reference.p_posterior_log(logits, x_t, t, schedule),
                "compile(reference)": _compiled(reference.p_posterior_log, logits, x_t, t, schedule),
                "ddps": lambda: ops.posterior_log_probs(logits, x_t, t, schedule)}

    def maskige_decode(device):
        colours = maskige.palette(K - 1)  # the classes and ignore: K colours
        g = torch.Generator().manual_seed(0)
        labels = torch.randint(0, K - 1, (batch, size, size), generator=g)
        x = maskige.encode(labels, colours) + 0.05 * torch.randn(batch, 3, size, size, generator=g)
        x, colours = x.to(device), colours.to(device)
        return {"reference": lambda: maskige_decode_composite(x, colours),
                "compile(reference)": _compiled(maskige_decode_composite, x, colours),
                **{b: (lambda b=b: ops.maskige_decode(x, colours, backend=b))
                   for b in ddps_backends("maskige_decode", device)}}

    group = "sampling op"
    return [
        Case("q_sample", group, shape, "fwd", q_sample, PLAIN, "q_sample", "shape", 2 * labels),
        Case("q_posterior_sample", group, shape, "fwd", q_posterior_sample, PLAIN, "q_posterior_sample", "shape",
             3 * labels),
        Case("renoise", group, shape, "fwd", renoise, PLAIN, "renoise", "shape", logit_bytes + labels),
        Case("p_posterior_sample", group, shape, "fwd", p_posterior_sample, REFERENCE, "p_posterior_sample",
             "shape", logit_bytes + 2 * labels),
        Case("posterior_log_probs", group, shape, "fwd", posterior_log_probs, (*REFERENCE, "ddps"),
             nbytes=2 * logit_bytes + labels),
        Case("maskige_decode", "GSS op", shape, "fwd", maskige_decode, REFERENCE, "maskige_decode",
             nbytes=batch * size * size * (3 * 4 + 8)),
    ]


# --- denoiser ops --------------------------------------------------------------------------------
def _differentiated(fn, leaves):
    """fwd+bwd: the call plus the gradients of ``leaves`` for a fixed output gradient."""
    grad = {}

    def call():
        out = fn()
        return torch.autograd.grad(out, leaves, output_grad(out, grad))
    return call


def output_grad(out, cache: dict):
    """A fixed random gradient for ``out``, made on the first call and laid out as ``out`` is (as
    the next layer's backward gives it: channels-last in the fused UNet)."""
    if "grad" not in cache:
        cache["grad"] = torch.empty_like(out).copy_(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    return cache["grad"]


def _providers(mode, calls):
    """{provider: callable} for ``mode``; ``calls``: {provider: (inputs, fn(*inputs))}, where the
    inputs are leaf tensors created for that provider (so the layouts may differ)."""
    out = {}
    for name, (inputs, fn) in calls.items():
        if name.startswith("compile"):
            fn = torch.compile(fn, dynamic=False)
        call = (lambda fn=fn, inputs=inputs: fn(*inputs))
        out[name] = call if mode == "fwd" else _differentiated(call, inputs)
    return out


def _qkv(batch, side, device, channels_last, grad):
    """The mid/linear attention's qkv conv output [B, 3 * 4 * 32, side, side] (leaf)."""
    x = torch.randn(batch, 3 * 128, side, side, generator=torch.Generator().manual_seed(0)).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(grad)


def _sdpa_attention(qkv, scale):
    """An SDPA-based module's core: token-major copies of q, k, v, then torch's fused attention."""
    q, k, v = (x.transpose(-1, -2).contiguous() for x in split_heads(qkv, 4))
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out.transpose(-1, -2).reshape(qkv.shape[0], -1, qkv.shape[-1] * qkv.shape[-2])


def denoiser_op_cases(batch: int, size: int, modes) -> list[Case]:
    # Long for the reason sampling_cases is: each op's builder beside its case.
    scale = 32 ** -0.5
    cases = []
    for mode in modes:
        grad = mode != "fwd"

        def attention_case(name, side, mode=mode, grad=grad):
            # attention_qkv, linear_attention_qkv: the op's backends on the whole qkv tensor (4-d output).
            whole = name.endswith("_qkv")
            op = name.removesuffix("_qkv")
            fixed = PLAIN if op == "attention" else REFERENCE

            def build(device):
                def core(backend):
                    if whole:
                        return lambda qkv: getattr(ops, name)(qkv, 4, scale, backend=backend)
                    return lambda qkv: getattr(ops, op)(*split_heads(qkv, 4), scale, backend=backend)

                def plain(fn):
                    def call(qkv):
                        out = fn(qkv)
                        return out.reshape(*out.shape[:2], *qkv.shape[-2:]) if whole else out
                    return call
                calls = {name: ((_qkv(batch, side, device, False, grad),),
                                plain((lambda qkv: _sdpa_attention(qkv, scale)) if name == "plain-torch" else
                                      (lambda qkv: getattr(reference, op)(*split_heads(qkv, 4), scale))))
                         for name in fixed}
                for b in ddps_backends(op, device):  # the fused UNet's layout: a channels-last conv's output
                    calls[b] = ((_qkv(batch, side, device, True, grad),), core(b))
                return _providers(mode, calls)
            return Case(name, "denoiser op", f"q,k,v [{batch},4,32,{side}x{side}]", mode, build, fixed, op)

        for name in ("attention", "attention_qkv"):
            cases.append(attention_case(name, size // 4))
        for name in ("linear_attention", "linear_attention_qkv"):
            for side in (size, size // 2, size // 4):
                cases.append(attention_case(name, side))

        side = size // 2

        def norm_inputs(device, channels_last, grad=grad):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(batch, DIM, side, side, generator=g).to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            params = [torch.randn(DIM, generator=g).to(device) for _ in range(2)]
            film = [0.1 * torch.randn(batch, DIM, 1, 1, generator=g).to(device) for _ in range(2)]
            return [t.requires_grad_(grad) for t in (x, *params, *film)]

        def norm_build(op, extra, fmt, mode=mode):
            """The providers of a norm op called as op(*inputs, *extra): x in the case's layout (fmt)
            for the ddps backends, contiguous for the reference."""
            def build(device):
                calls = {}
                for name in (*REFERENCE, *ddps_backends(op, device)):
                    on_reference = name in REFERENCE
                    inputs = norm_inputs(device, not on_reference and fmt == torch.channels_last)
                    if op == "channel_layer_norm":  # x and the gain, stored [1, C, 1, 1] by the module
                        inputs = [inputs[0], inputs[1].reshape(1, -1, 1, 1)]
                    fn = getattr(reference, op) if on_reference else getattr(ops, op)
                    kw = {} if on_reference else {"backend": name}
                    calls[name] = (inputs, lambda *a, fn=fn, kw=kw: fn(*a, *extra, **kw))
                return _providers(mode, calls)
            return build

        elems = batch * DIM * side * side * 4
        shape = f"x [{batch},{DIM},{side},{side}]"
        nbytes = 2 * elems if mode == "fwd" else None
        # Channels-last is the fused UNet's layout; channel_layer_norm also runs on NCHW, as in the
        # attention modules called from a user's own model (group_norm_film_silu's Block converts).
        for op, extra, layouts in (("channel_layer_norm", (), LAYOUTS),
                                   ("group_norm_film_silu", (8,), {"channels-last": torch.channels_last})):
            for layout, fmt in layouts.items():
                cases.append(Case(op, "denoiser op", f"{shape} {layout}", mode, norm_build(op, extra, fmt), REFERENCE,
                                  op, nbytes=nbytes))
        cases.append(Case("conv3x3", "denoiser op", f"x [{batch},{DIM},{size},{size}], 3x3 {DIM}->{DIM}", mode,
                          _conv3x3_build(batch, size, mode), PLAIN, "conv3x3", flops=True))
    return cases


def _conv3x3_build(batch, size, mode):
    """The Blocks' convolution at the first level: the reference's F.conv2d on NCHW tensors,
    plain-torch's on channels-last ones (what the fused UNet ran before conv3x3), the ddps backends
    on channels-last ones, with the weight's transform kept in fwd (as the fused UNet in eval) and
    recomputed per call in fwd+bwd (as in training)."""
    def build(device):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, DIM, size, size, generator=g)
        weight = torch.randn(DIM, DIM, 3, 3, generator=g) / (9 * DIM) ** 0.5
        bias = torch.randn(DIM, generator=g)
        calls = {}
        for name in (*PLAIN, *ddps_backends("conv3x3", device)):
            layout = torch.contiguous_format if name in REFERENCE else torch.channels_last
            inputs = [t.to(device).contiguous(memory_format=layout) for t in (x, weight)] + [bias.to(device)]
            inputs = [t.requires_grad_(mode != "fwd") for t in inputs]
            if name in PLAIN:
                calls[name] = (inputs, lambda x, w, b: F.conv2d(x, w, b, padding=1))
            else:
                kept = winograd_weight(inputs[1]) if mode == "fwd" else None
                calls[name] = (inputs, lambda x, w, b, name=name, kept=kept: ops.conv3x3(x, w, b, winograd=kept,
                                                                                           backend=name))
        return _providers(mode, calls)
    return build
