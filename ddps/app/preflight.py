"""What a command checks before it does any work: what a run needs outside its config (the
device, the pretrained sources, every file of the splits it will read) and every path it will
write. All problems come at once, one line each naming the key or the file, as one
``ConfigError`` (exit status 2), so that nothing trains, evaluates or writes and then stops on
something that was wrong from the start. ``ddps train``, ``eval``, ``segment`` and ``ablate``
run it."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .config import eval_datasets
from .data import DataError, build_dataset
from .schema import HEADS, SEGMENTORS, ConfigError

__all__ = ["check", "device_problems", "output_problems", "source_problems", "split_problems"]


def check(cfg, *, splits=(), outputs=(), inputs=(), training: bool = False) -> None:
    """Every problem of ``cfg``'s device and sources, of the files of ``splits`` ("train",
    "val"; "val" includes eval.datasets'), of ``outputs`` ((what, path, "dir" | "file"), ...) and of the weights files
    ``inputs`` ((what, path), ...), as one ConfigError. ``training``: the run trains, so
    segmentor.checkpoint is read too."""
    problems = device_problems(cfg.device) + source_problems(cfg, training)
    for what, path in inputs:
        problems += _weights_problems(Path(path), what)
    for split in splits:
        problems += split_problems(cfg, split)
    if "val" in splits:  # the held-out splits of eval.datasets too
        for i, (name, sub) in enumerate(eval_datasets(cfg)):
            problems += [f"eval.datasets[{i}] ({name}): {p}" for p in split_problems(sub, "val")]
    for what, path, kind in outputs:
        problems += output_problems(Path(path), what, kind)
    if problems:
        raise ConfigError(*problems)


def device_problems(name: str) -> list[str]:
    """Whether torch can run on the device ``name`` here."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        return [f"device: {name!r} is not a torch device ({str(e).splitlines()[0]})"]
    if device.type == "cpu":
        return []
    backend = getattr(torch, device.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        without_cuda = device.type == "cuda" and not torch.version.cuda
        why = (f"this torch ({torch.__version__}) is built without CUDA" if without_cuda
               else f"no {device.type} device is available")
        return [f"device: {name!r}, but {why}; run on the CPU with device=cpu"]
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        return [f"device: {name!r}, but only {count} {device.type} device(s) are visible (indices 0..{count - 1})"]
    return []


def source_problems(cfg, training: bool) -> list[str]:
    """segmentor.pretrained (a local folder, or a hub id that is cached or can be fetched) and,
    for a run that trains, segmentor.checkpoint and the weights its head reads (readable
    safetensors files)."""
    problems = []
    seg = cfg.segmentor
    marker = getattr(SEGMENTORS[seg.type], "source_file", None)
    if seg.pretrained and marker:
        problems += _pretrained_problems(seg.pretrained, marker)
    if training:
        head_weights = getattr(HEADS[cfg.head.kind], "weights", None)
        for key, path in {"segmentor.checkpoint": seg.checkpoint, **(head_weights(cfg) if head_weights else {})}.items():
            if path:
                problems += _weights_problems(Path(path), key)
    return problems


def _pretrained_problems(source: str, marker: str) -> list[str]:
    path = Path(source).expanduser()
    if path.exists():
        if not (path / marker).is_file():
            return [f"segmentor.pretrained: {source} is not a model folder (no {marker} in it)"]
        return []
    # a hub id is "name" or "owner/name"; anything else can only be a folder
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        return [f"segmentor.pretrained: the folder {source} does not exist"]
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        return [f"segmentor.pretrained: no folder {source}, and without huggingface_hub it cannot be a hub id"]
    hub_log = logging.getLogger("huggingface_hub")
    level, hub_log.level = hub_log.level, logging.ERROR  # its retries' warnings: the one line below says it
    try:
        if not isinstance(try_to_load_from_cache(source, marker), str):  # cached: no connection needed
            hf_hub_download(source, marker)
    except LocalEntryNotFoundError:
        return [f"segmentor.pretrained: no folder {source}, and the Hugging Face hub, which has not been reached "
                "from here before for this model, cannot be reached now (offline?)"]
    except Exception as e:  # noqa: BLE001 - an invalid id, an unknown repository: all the same to the user
        return [f"segmentor.pretrained: no folder {source}, and no model of that name on the Hugging Face hub "
                f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"]
    finally:
        hub_log.setLevel(level)
    return []


def _weights_problems(path: Path, key: str) -> list[str]:
    """Whether ``path`` is a safetensors file (its header read)."""
    if not path.is_file():
        return [f"{key}: {path} does not exist" if not path.exists() else f"{key}: {path} is not a file"]
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a bad header
        return [f"{key}: {path} is not a safetensors file ({str(e).splitlines()[0][:200]})"]
    return []


def split_problems(cfg, split: str) -> list[str]:
    """The files of ``split`` ("train" or "val"): the dataset's own check of each (for files on
    disk: that it opens as an image, and that a mask has the mode and size of its image)."""
    try:
        dataset = build_dataset(cfg, split)
    except DataError as e:
        return [f"data ({split} split): {e}"]
    check_files = getattr(dataset, "check_files", None)
    return check_files() if check_files is not None else []


def output_problems(path: Path, what: str, kind: str) -> list[str]:
    """Whether ``path`` can be written as ``kind`` ("dir": a directory, created with its parents
    where missing; "file"): nothing in the way, and the nearest existing folder writable."""
    if path.exists():
        if kind == "dir" and not path.is_dir():
            return [f"{what} {path}: a file is there, not a directory"]
        if kind == "file" and path.is_dir():
            return [f"{what} {path}: is a directory; give a file name"]
    folder = path if kind == "dir" else path.parent
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return [f"{what} {path}: {existing} is a file, so nothing can be created under it"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"{what} {path}: {existing} is not writable"]
    return []
