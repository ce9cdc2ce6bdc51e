"""Where a call's time goes: one profiled call, each op's own time summed by the kind of work it
belongs to (an op inside a classified one, such as the GEMM under a convolution, counts as that
one), so that the next bound is visible beside the FLOP floor."""
from __future__ import annotations

import os

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from .measure import sync

KINDS = ("conv3x3", "1x1 convolutions", "strided convolutions", "other convolutions", "attention", "norms",
         "sampling", "other")
# ddps's ops by their name without namespace (ddps:: for the C++ ones, ddps_triton:: with _fwd / _bwd
# for the Triton ones)
OPS = {"conv3x3": "conv3x3", "attention": "attention", "linear_attention": "attention", "qkv": "attention",
       "group_norm_film_silu": "norms", "channel_layer_norm": "norms", "renoise": "sampling",
       "q_posterior_sample": "sampling", "q_sample": "sampling", "p_posterior_sample": "sampling",
       "posterior_log_probs": "sampling"}
ATEN = {"aten::scaled_dot_product_attention": "attention", "aten::layer_norm": "norms", "aten::group_norm": "norms",
        "aten::randint": "sampling"}


def kind(name: str, weight_shape=None, stride=None) -> str | None:
    """The kind of an op by its profiler name (and, for ``aten::convolution``, its weight's shape
    and stride); None for an op that is not one of KINDS' own (it counts as its caller's)."""
    namespace, _, op = name.partition("::")
    if namespace in ("ddps", "ddps_triton"):
        return OPS.get(op.removesuffix("_fwd").removesuffix("_bwd"))
    if name == "aten::convolution":
        if stride is not None and any(s > 1 for s in stride):
            return "strided convolutions"
        return "1x1 convolutions" if list(weight_shape[-2:]) == [1, 1] else "other convolutions"
    return ATEN.get(name)


def _event_kind(event) -> str | None:
    if event.name != "aten::convolution":
        return kind(event.name)
    stride = event.concrete_inputs[3] if len(event.concrete_inputs) > 3 else None
    return kind(event.name, event.input_shapes[1], stride)


def op_times(fn, device: torch.device) -> dict[str, float]:
    """Milliseconds of each of KINDS in one profiled call of ``fn`` (on a GPU, the kernels' time,
    counted for the op that launched them)."""
    gpu = device.type == "cuda"
    # Kineto prints a line per stage of every profile into the live table unless told otherwise
    # before its first use (a user's own setting wins).
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else []),
                 record_shapes=True) as prof:
        fn()
        sync(device)
    totals = dict.fromkeys(KINDS, 0.0)
    for event in prof.events():
        if event.device_type != DeviceType.CPU:
            continue  # a kernel: in its launching op's self_device_time_total
        owner, found = event, None
        while owner is not None and found is None:
            found, owner = _event_kind(owner), owner.cpu_parent
        totals[found or "other"] += (event.self_device_time_total if gpu else event.self_cpu_time_total) / 1e3
    return totals
