"""Input validation shared by the reference path and the fused ops: user errors become a
ValueError / TypeError naming the argument and the offending value, never a crash or garbage."""
from __future__ import annotations

import torch


class ArgumentError(ValueError):
    """A bad argument of a module's constructor; ``argument`` names it, so that a caller that knows
    it under another name (a run config's key) can say which of its own was wrong."""

    def __init__(self, argument: str, message: str):
        super().__init__(message)
        self.argument = argument


def choice(value, argument: str, choices: tuple, what: str):
    if value not in choices:
        raise ArgumentError(argument, f"{argument}={value!r} is not {what}; choose one of {choices}")
    return value


def _check_values() -> bool:
    # Value checks read data; a traced program (torch.compile) has none to read, so there only the
    # shapes, dtypes and devices are checked.
    return not torch.compiler.is_compiling()


def tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def labels(x, name: str, num_classes: int, ignore_index: int | None = None) -> torch.Tensor:
    """Integer class labels [B, *spatial] with values in [0, num_classes) (or ignore_index)."""
    tensor(x, name)
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class labels, got dtype {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must be [B, *spatial] labels, got a 0-d tensor")
    if x.numel() and _check_values():
        low, high = torch.aminmax(x)  # one pass; the element-wise search only runs on failure
        if int(low) >= 0 and int(high) < num_classes:
            return x
        bad = (x < 0) | (x >= num_classes)
        if ignore_index is not None:
            bad &= x != ignore_index
        if bool(bad.any()):
            flat = int(bad.reshape(-1).nonzero()[0, 0])
            index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), x.shape))
            value = int(x.reshape(-1)[flat])
            raise ValueError(
                f"{name} holds label {value} at index {index}; labels must lie in "
                f"[0, {num_classes})" + (f" or equal ignore_index={ignore_index}" if ignore_index is not None else "")
            )
    return x


def same_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}")


def same_device(x: torch.Tensor, name: str, device: torch.device, what: str) -> None:
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but {what} is on {device}")


def timesteps(t, name: str, batch: int, num_timesteps: int, device: torch.device) -> torch.Tensor:
    """Noise levels s in [0, T): an int, or an integer tensor [B] (or 0-d); returns int64 [B]."""
    if isinstance(t, bool) or not isinstance(t, (int, torch.Tensor)):
        raise TypeError(f"{name} must be an int or an integer tensor [B], got {type(t).__name__}")
    if isinstance(t, int):
        if not 0 <= t < num_timesteps:
            raise ValueError(f"{name}={t} is outside [0, {num_timesteps})")
        return torch.full((batch,), t, dtype=torch.int64, device=device)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    if t.dim() == 0:
        t = t.expand(batch)
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"{name} must have shape [{batch}] (one noise level per sample), got {tuple(t.shape)}")
    same_device(t, name, device, "the labels")
    if t.numel() and _check_values():
        low, high = torch.aminmax(t)
        if int(low) >= 0 and int(high) < num_timesteps:
            return t.long()
        bad = (t < 0) | (t >= num_timesteps)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"{name}[{i}]={int(t[i])} is outside [0, {num_timesteps})")
    return t.long()


def floating(x, name: str) -> torch.Tensor:
    tensor(x, name)
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got dtype {x.dtype}")
    return x


def heads(q, k, v) -> None:
    """q, k, v: attention inputs [B, heads, d, N] of one shape, dtype and device."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        floating(x, name)
        if x.dim() != 4:
            raise ValueError(f"{name} must be [B, heads, d, N], got shape {tuple(x.shape)}")
    for name, x in (("k", k), ("v", v)):
        same_shape(q, x, "q", name)
        same_device(x, name, q.device, "q")
        if x.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but q has dtype {q.dtype}")
