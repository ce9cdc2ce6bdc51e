"""The original's mmseg checkpoints in ddps's names (``ddps convert``): ``load_mmseg`` reads one
safely, ``mmseg_segformer`` / ``mmseg_head`` map its segmentor and DDPS head keys, and ``convert``
turns a whole released checkpoint into a run's model."""
from __future__ import annotations

from pathlib import Path

import torch

from . import config as config_mod
from .model import build_head, build_segmentor
from .segmentors.segformer import MIT_HEADS, MIT_VARIANTS


class _Reads(dict):
    """A state dict that remembers which keys were read, so that none goes unconverted unnoticed."""

    def __init__(self, state: dict):
        super().__init__(state)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def _mit_layer(state: _Reads, prefix: str, target: str) -> dict:
    """One transformer layer of mmseg's MiT in transformers' names: nn.MultiheadAttention's packed
    in-projection splits into query, key and value; MixFFN's 1x1 convolutions become linears."""
    out = {}
    for p in ("weight", "bias"):
        q, k, v = state[f"{prefix}attn.attn.in_proj_{p}"].chunk(3)
        out.update({f"{target}attention.self.query.{p}": q, f"{target}attention.self.key.{p}": k,
                    f"{target}attention.self.value.{p}": v})
        for index, name in ((0, "dense1"), (4, "dense2")):
            value = state[f"{prefix}ffn.layers.{index}.{p}"]
            out[f"{target}mlp.{name}.{p}"] = value.flatten(1) if p == "weight" else value
    renamed = {"norm1": "layer_norm_1", "norm2": "layer_norm_2", "attn.attn.out_proj": "attention.output.dense",
               "attn.sr": "attention.self.sr", "attn.norm": "attention.self.layer_norm",
               "ffn.layers.1": "mlp.dwconv.dwconv"}
    for old, new in renamed.items():
        for p in ("weight", "bias"):
            if f"{prefix}{old}.{p}" in state:  # sr and its norm only where the stage reduces
                out[f"{target}{new}.{p}"] = state[f"{prefix}{old}.{p}"]
    return out


def mmseg_segformer(state: dict) -> tuple[dict, dict, set]:
    """(segmentor config keys, MMSegSegFormer state dict, keys read) of an original mmseg
    checkpoint's ``backbone.*`` (MixVisionTransformer) and ``decode_head.{convs,fusion_conv,
    conv_seg}.*``. The MiT variant is read from the stage widths and depths; a checkpoint that is
    none of b0..b5, or misses a key, is a ValueError."""
    state = _Reads(state)
    widths, depths = [], []
    while f"backbone.layers.{len(widths)}.0.projection.weight" in state:
        i = len(widths)
        widths.append(dict.__getitem__(state, f"backbone.layers.{i}.0.projection.weight").shape[0])
        depths.append(len({k.split(".")[4] for k in state if k.startswith(f"backbone.layers.{i}.1.")}))
    if not widths:
        raise ValueError("no MiT backbone (backbone.layers.0.0.projection.weight): ddps convert needs the whole "
                         "SegFormer DDPS checkpoint, backbone included")
    variant = next((name for name, (embed, d) in MIT_VARIANTS.items()
                    if widths == [embed * h for h in MIT_HEADS] and tuple(depths) == d), None)
    if variant is None:
        raise ValueError(f"backbone: stage widths {widths} and depths {depths} are none of mmseg's MiT b0..b5 "
                         "(is this a SegFormer DDPS checkpoint?)")
    tensors, target = {}, "backbone.encoder."
    try:
        for i, depth in enumerate(depths):
            stage = f"backbone.layers.{i}."
            for p in ("weight", "bias"):
                tensors[f"{target}patch_embeddings.{i}.proj.{p}"] = state[f"{stage}0.projection.{p}"]
                tensors[f"{target}patch_embeddings.{i}.layer_norm.{p}"] = state[f"{stage}0.norm.{p}"]
                tensors[f"{target}layer_norm.{i}.{p}"] = state[f"{stage}2.{p}"]
            for j in range(depth):
                tensors.update(_mit_layer(state, f"{stage}1.{j}.", f"{target}block.{i}.{j}."))
        tensors["decode.fusion_conv.conv.weight"] = state["decode_head.fusion_conv.conv.weight"]
    except KeyError as e:
        raise ValueError(f"{e.args[0]} is missing: not a whole SegFormer DDPS checkpoint") from None
    for key in list(state):
        if key.startswith(("decode_head.convs.", "decode_head.fusion_conv.")):
            tensors["decode." + key[len("decode_head."):]] = state[key]
        elif key.startswith("decode_head.conv_seg."):
            tensors["classifier." + key.rsplit(".", 1)[1]] = state[key]
    classifier = tensors.get("classifier.weight")
    config = {"type": "segformer-mmseg", "variant": variant,
              "channels": tensors["decode.fusion_conv.conv.weight"].shape[0],
              "classifier_classes": None if classifier is None else classifier.shape[0]}
    return config, tensors, state.read


def load_mmseg(path: str | Path) -> dict:
    """The state dict of an original mmseg checkpoint (``{"state_dict": ..., "meta": ...}``),
    loaded with ``weights_only=True``: nothing in the file is unpickled as code."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # torch's message advises weights_only=False, which is not for a CLI user to take
        raise ValueError(f"{path}: not loadable with torch.load(weights_only=True) ({type(e).__name__}): not a torch "
                         "checkpoint, or one holding Python objects besides tensors, which ddps does not run") from None
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected an mmseg checkpoint (a dict with 'state_dict'), got {type(ckpt).__name__}")
    return state


def mmseg_head(state: dict, head_keys) -> tuple[dict, dict, set]:
    """(head state, EMA state, keys read) of an original checkpoint's state dict: head keys under
    ``decode_head.``; EMA copies as buffers ``decode_head.ema_<key with . -> _>``."""
    head, ema, read = {}, {}, set()
    for key in head_keys:
        source = "decode_head." + key
        if source in state:
            head[key] = state[source]
            read.add(source)
        ema_key = "decode_head.ema_" + key.replace(".", "_")
        if ema_key in state:
            ema[key] = state[ema_key]
            read.add(ema_key)
    missing = [k for k in head_keys if k not in head]
    if missing:
        raise ValueError(f"{len(missing)} DDPS head keys are missing, e.g. decode_head.{missing[0]} "
                         "(is this a DDPS checkpoint with the config's head sizes?)")
    return head, ema, read


def baseline_classifier(state: dict, path: str) -> dict:
    """``decode_head.conv_seg.*`` of the original SegFormer checkpoint at ``path``, which the DDPS
    checkpoint's head came from (the original drops the classifier): refused if their fused heads
    differ, as the classifier would then read features it was not trained on."""
    segformer = load_mmseg(path)
    if "decode_head.conv_seg.weight" not in segformer:
        raise ValueError(f"--segformer {path}: no decode_head.conv_seg.weight (not an mmseg SegFormer checkpoint)")
    shared = [k for k in segformer if k.startswith(("decode_head.convs.", "decode_head.fusion_conv."))
              and not k.endswith("num_batches_tracked")]
    differ = [k for k in shared if k not in state or not torch.equal(state[k], segformer[k])]
    if not shared or differ:
        raise ValueError(f"--segformer {path}: its decode head differs from the DDPS checkpoint's "
                         f"({differ[0] if differ else 'it has none'}): give the SegFormer checkpoint the DDPS model "
                         "was trained on")
    return {k: segformer[k] for k in ("decode_head.conv_seg.weight", "decode_head.conv_seg.bias")}


def convert(cfg, path: str, segformer: str | None = None):
    """A released DDPS checkpoint as a run: (its config: ``cfg`` with the segmentor read from the
    weights, segmentor, head state, EMA state, the checkpoint's keys left out). Every shape is
    checked against the config's head."""
    state = load_mmseg(path)
    if segformer:
        state = {**state, **baseline_classifier(state, segformer)}
    try:
        seg_keys, seg_state, read = mmseg_segformer(state)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    values = cfg.to_dict()
    values["segmentor"].update(seg_keys, iters=0, checkpoint=None, pretrained=None)
    cfg = config_mod.load(None, (), base=values, reads_data=False)
    segmentor = build_segmentor(cfg)
    try:
        segmentor.load_state_dict(seg_state)
    except RuntimeError as e:
        raise ValueError(f"{path}: the segmentor's weights do not fit: {e}") from None
    head = build_head(cfg, segmentor.feature_channels, for_training=True)
    try:
        head_state, ema, head_read = mmseg_head(state, list(head.state_dict()))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    head.load_trained(head_state)  # checks every shape against the config
    if ema:  # the original averages the trained modules only; a ddps EMA is a whole head
        ema = {k: v for k, v in {**head_state, **ema}.items() if k not in head.derived_buffers}
        head.load_trained(ema)
    return cfg, segmentor, head_state, ema, sorted(set(state) - read - head_read)
