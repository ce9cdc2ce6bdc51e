"""Checkpoints: safetensors for tensors, JSON for everything else, every file written atomically
(a temporary file in the same directory, fsync, rename), so a crash at any moment leaves either
the old file or the new one, never half of one.

A resumable checkpoint is the pair ``step-<n>.safetensors`` + ``step-<n>.json``; the JSON is
written second and names the tensor file's size, so a checkpoint counts only once both are
complete.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

CHECKPOINT = re.compile(r"^step-(\d+)\.json$")


def atomic_write(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> bytes:
    # safetensors stores dense row-major data; channels-last weights and views are copied out
    flat = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    return st_save(flat, metadata={k: json.dumps(v) for k, v in (metadata or {}).items()})


def save_weights(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    atomic_write(path, tensors_bytes(tensors, metadata))


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise FileNotFoundError(f"cannot read weights {path}: {e.strerror}") from None
    try:
        return st_load(data)
    except Exception as e:  # safetensors raises its own SafetensorError for corrupt headers
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from None


def prefixed(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


def unprefixed(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(tensors, JSON-able structure) of an optimizer's state dict."""
    state = optimizer.state_dict()
    tensors, layout = {}, {}
    for index, entry in state["state"].items():
        layout[str(index)] = {}
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{name}"] = value
                layout[str(index)][name] = None
            else:
                layout[str(index)][name] = value
    return tensors, {"state": layout, "param_groups": state["param_groups"]}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, structure: dict) -> None:
    state = {}
    for index, entry in structure["state"].items():
        state[int(index)] = {name: tensors[f"optim.{index}.{name}"] if value is None else value
                             for name, value in entry.items()}
    # JSON has no tuples: give back the types the optimizer's own groups hold (betas)
    groups = [{k: tuple(v) if isinstance(current.get(k), tuple) else v for k, v in saved.items()}
              for saved, current in zip(structure["param_groups"], optimizer.param_groups)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(directory: str | Path, step: int, tensors: dict, state: dict, keep_last: int) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / f"step-{step:08d}.safetensors"
    data = tensors_bytes(tensors)
    atomic_write(weights, data)
    record = directory / f"step-{step:08d}.json"
    atomic_write(record, json.dumps({**state, "step": step, "weights": weights.name, "weights_bytes": len(data)},
                                    indent=1).encode())
    for old in checkpoints(directory)[:-keep_last]:
        old.unlink()  # the record first: a checkpoint without its record is never picked
        (directory / old.name.replace(".json", ".safetensors")).unlink(missing_ok=True)
    return record


def checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints' records, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = CHECKPOINT.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def load_checkpoint(record: str | Path) -> tuple[dict, dict]:
    """(tensors, state) of a checkpoint record."""
    record = Path(record)
    state = json.loads(record.read_text())
    weights = record.with_name(state["weights"])
    if not weights.exists() or weights.stat().st_size != state["weights_bytes"]:
        raise ValueError(f"checkpoint {record}: its weights file {weights.name} is missing or incomplete")
    return load_weights(weights), state
