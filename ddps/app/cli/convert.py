"""ddps convert: a released DDPS checkpoint (mmseg) into a ddps run directory (ddps.app.mmseg), or
DALL-E's released dVAE (pickled modules) into one safetensors file for GSS's prior (ddps.nn.dvae)."""
from __future__ import annotations

from pathlib import Path

from ...nn import dvae
from .. import checkpoint, config as config_mod, mmseg, preflight
from ..model import save_run
from .common import add_overrides

NAME = "convert"
HELP = "convert an original mmseg DDPS checkpoint into a ddps run directory, or DALL-E's dVAE for GSS"
DESCRIPTION = ("Reads the checkpoint with torch.load(weights_only=True) and converts the whole model: the MiT "
               "backbone and the original's SegFormer head (segmentor.type segformer-mmseg, variant and channels "
               "read from the weights) and the DDPS head with its EMA, checked against the config's head. OUT "
               "becomes a run directory (config.yaml, model.safetensors) for ddps eval and ddps segment. The "
               "original drops SegFormer's classifier, so the segmentor has no prediction of its own unless "
               "--segformer gives the SegFormer checkpoint it came from. With --dalle ENCODER DECODER instead: "
               "DALL-E's released encoder.pkl and decoder.pkl, pickled modules, are unpickled once, admitting "
               "only the classes such a file holds, and their weights written to the safetensors file OUT, which "
               "head.gss.dalle_weights takes.")


def add_arguments(p) -> None:
    p.add_argument("checkpoint", nargs="?", help="mmseg DDPS checkpoint (.pth)")
    p.add_argument("--dalle", nargs=2, metavar=("ENCODER", "DECODER"),
                   help="convert DALL-E's released dVAE (encoder.pkl decoder.pkl) into the file --out instead")
    p.add_argument("--config", default="ade20k",
                   help="config of the run the checkpoint comes from: head sizes, dataset, eval settings "
                        "(default: ade20k; cityscapes for the Cityscapes model)")
    p.add_argument("--segformer", metavar="CKPT",
                   help="the original mmseg SegFormer checkpoint the DDPS model was trained on: its classifier "
                        "(decode_head.conv_seg) becomes the segmentor's, the baseline that ddps eval reports")
    p.add_argument("--out", required=True, help="output run directory (must not hold a run); with --dalle, the "
                                                "safetensors file to write")
    add_overrides(p)


def run(args) -> int:
    if args.dalle:
        return _convert_dalle(args)
    if not args.checkpoint:
        raise config_mod.ConfigError("checkpoint: give the mmseg DDPS checkpoint to convert (or --dalle ENCODER DECODER)")
    out = Path(args.out)
    if (out / "config.yaml").exists() or (out / "model.safetensors").exists():
        raise FileExistsError(f"--out {out} already holds a run; choose another directory")
    cfg = config_mod.load(config_mod.find(args.config), args.overrides, reads_data=False)
    problems = preflight.output_problems(out, "--out", "dir")
    problems += [f"{what} {path} does not exist" for what, path in (("checkpoint", args.checkpoint),
                                                                   ("--segformer", args.segformer))
                 if path and not Path(path).is_file()]
    if problems:
        raise config_mod.ConfigError(*problems)
    cfg, segmentor, head_state, ema, left_out = mmseg.convert(cfg, args.checkpoint, args.segformer)
    out.mkdir(parents=True, exist_ok=True)
    save_run(out, cfg, segmentor, head_state, ema)
    s = cfg.segmentor
    classifier = f"classifier of {s.classifier_classes} classes" if s.classifier_classes is not None else "no classifier"
    print(f"wrote {out}: segmentor MiT-{s.variant.upper()} + SegFormer head ({s.channels} channels, {classifier}), "
          f"{len(head_state)} head tensors, {len(ema)} EMA tensors"
          + (f"; {len(left_out)} keys left out: {', '.join(left_out[:4])}" if left_out else ""))
    root = " data.root=DIR" if cfg.data.dataset != "synthetic-shapes" and cfg.data.root is None else ""
    print(f"use it: ddps eval --run {out}{root}   or   ddps segment --run {out} --out DIR IMAGE...")
    return 0


def _convert_dalle(args) -> int:
    out = Path(args.out)
    problems = [f"{name}: not read with --dalle" for name, given in
                (("checkpoint", args.checkpoint), ("--segformer", args.segformer), ("overrides", args.overrides)) if given]
    problems += [f"--dalle: {path} does not exist" for path in args.dalle if not Path(path).is_file()]
    problems += preflight.output_problems(out, "--out", "file")
    if out.exists():
        problems.append(f"--out: {out} exists; choose another file")
    if problems:
        raise config_mod.ConfigError(*problems)
    tensors = dvae.load_released(*args.dalle)
    dvae.DalleDVAE().load_weights(tensors)  # the released sizes, or a ValueError naming what differs
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.save_weights(out, tensors)
    print(f"wrote {out}: DALL-E's dVAE, {len(tensors)} tensors")
    print(f"use it: ddps train --config synthetic-gss head.gss.prior=dalle head.gss.dalle_weights={out} ...")
    return 0
