"""Pieces every sampling op shares: input checks, the seed drawn from a torch generator, the
dispatch to a backend, and ignore_index handling for the reference backend."""
from __future__ import annotations

import functools
import importlib

import torch

from .. import _backend, _checks
from ..schedule import DiffusionSchedule

LABEL_DTYPES = (torch.int64, torch.int32, torch.uint8)
LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The precisions by name (bench --dtype, eval.dtype); the lower two run under torch.autocast.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_schedule(schedule, device: torch.device, name: str) -> DiffusionSchedule:
    if not isinstance(schedule, DiffusionSchedule):
        raise TypeError(f"schedule must be a ddps.schedule.DiffusionSchedule, got {type(schedule).__name__}")
    _checks.same_device(schedule.att, "schedule", device, name)
    return schedule


def check_labels(x, name: str, schedule: DiffusionSchedule, ignore_index, allow_mask: bool) -> torch.Tensor:
    """Label tensor of an accepted dtype on the schedule's device, values in [0, K) ([0, K] where
    [MASK] may appear) or equal to ignore_index."""
    _checks.same_device(_checks.tensor(x, name), name, schedule.device, "the schedule")
    _checks.labels(x, name, schedule.num_states if allow_mask else schedule.num_classes, ignore_index)
    if x.dtype not in LABEL_DTYPES:
        raise TypeError(f"{name} must be int64, int32 or uint8 labels, got dtype {x.dtype}")
    return x


def check_logits(logits, schedule: DiffusionSchedule) -> torch.Tensor:
    _checks.tensor(logits, "logits")
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(f"logits must be float32, float16 or bfloat16, got dtype {logits.dtype}")
    if logits.dim() < 2 or logits.shape[1] != schedule.num_classes:
        raise ValueError(f"logits must be [B, K={schedule.num_classes}, *spatial], got shape {tuple(logits.shape)}")
    return logits


def check_ignore_index(ignore_index, schedule: DiffusionSchedule):
    if ignore_index is None:
        return None
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int or None, got {type(ignore_index).__name__}")
    if 0 <= ignore_index < schedule.num_states:
        raise ValueError(f"ignore_index={ignore_index} is a class of the schedule (0..{schedule.num_states - 1})")
    return ignore_index


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a denoiser op computes and returns in for x: autocast's lower-precision dtype where
    autocast is on for x's device and x is float32, bfloat16 or float16 (the cast autocast makes
    for the ops' nearest stock equivalents, conv2d, matmul and scaled_dot_product_attention, and
    does not make for custom ops), else x's own."""
    if torch.is_autocast_enabled(x.device.type) and x.dtype in LOGIT_DTYPES:
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def draw_seed(generator: torch.Generator | None) -> torch.Tensor:
    """A 62-bit Philox seed from ``generator`` (the default CPU generator when None), as a CPU
    int64 scalar tensor: the same generator state gives the same seed, hence the same samples on
    every backend."""
    device = generator.device if generator is not None else "cpu"
    return torch.randint(0, 2**62, (), dtype=torch.int64, device=device, generator=generator).cpu()


def mask_index(schedule: DiffusionSchedule) -> int:
    return -1 if schedule.mask_index is None else schedule.mask_index


def keep_ignored(sample, labels: torch.Tensor, ignore_index, *inputs: torch.Tensor) -> torch.Tensor:
    """Run the reference ``sample(*inputs)`` with ignored pixels set to class 0, then put
    ``labels``' value back where any input was ignored."""
    if ignore_index is None:
        return sample(*inputs)
    ignored = torch.zeros_like(labels, dtype=torch.bool)
    for x in inputs:
        if not x.dtype.is_floating_point:
            ignored |= x == ignore_index
    cleaned = [x.masked_fill(ignored, 0) if not x.dtype.is_floating_point else x for x in inputs]
    return torch.where(ignored, labels, sample(*cleaned).to(labels.dtype))


@functools.cache
def triton_op(module: str, launcher: str, fake):
    """``ddps.kernels.<module>.<launcher>`` as the custom op ``ddps_triton::<launcher>``, registered
    on first use (importing Triton is slow and it may be absent). ``fake``: its shapes, given
    explicitly because the traced default would run the kernel on fake tensors under the Triton
    interpreter."""
    fn = getattr(importlib.import_module(f"ddps.kernels.{module}"), launcher)
    custom = torch.library.triton_op(f"ddps_triton::{launcher}", fn, mutates_args=())
    custom.register_fake(fake)
    return custom


@functools.cache
def triton_autograd(op: str, forward_fake, backward_fake, tensor_inputs: int, first_saved_output: int,
                    backward_constants: int):
    """``ddps_triton::<op>_fwd``, differentiable through ``ddps_triton::<op>_bwd(grad, *tensor
    inputs, *forward outputs from first_saved_output on, *the first backward_constants other
    inputs)``, which returns one gradient per tensor input (the other inputs are constants)."""
    forward = triton_op(op, f"{op}_fwd", forward_fake)
    backward = triton_op(op, f"{op}_bwd", backward_fake)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:tensor_inputs], *output[first_saved_output:])
        ctx.constants = inputs[tensor_inputs:]

    def grads(ctx, grad, *_grads_of_saved_outputs):
        return (*backward(grad, *ctx.saved_tensors, *ctx.constants[:backward_constants]),
                *(None,) * len(ctx.constants))

    forward.register_autograd(grads, setup_context=setup_context)
    return forward


def launch(op: str, backend: str, *args):
    """Run a sampling op's compiled (``cpu``/``cuda``) or Triton kernel with the schema's
    arguments (both take the seed as a CPU int64 scalar tensor; the compiled op's fake serves both)."""
    if backend == "triton":
        return triton_op(op, f"{op}_fwd", _backend.FAKES[op])(*args)
    return getattr(torch.ops.ddps, op)(*args)
