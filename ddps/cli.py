"""The ``ddps`` command line. ``ddps bench``: ddps against the original implementation on this
machine (the main job). ``ddps train`` / ``eval`` / ``segment`` / ``convert``: the two-stage
recipe (with a prior stage for a head that has one), its evaluation, masks for image files, and
original checkpoints into ddps run directories. ``ddps ablate``: the paper's findings as one
controlled comparison. ``ddps demo``: the DDPS sampling loop on random features, with the sampling
op timed on every available backend."""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
from pathlib import Path

import torch

from . import __version__, backends
from .bench.measure import machine, machine_line, measure
from .nn import DDPSHead
from .ops import q_sample
from .ops._common import DTYPES
from .schedule import DiffusionSchedule


def demo(args) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("ddps demo: --device cuda needs a visible CUDA device", file=sys.stderr)
        return 2
    if args.size % 4:
        print(f"ddps demo: --size {args.size}: the demo head's UNet halves the mask twice, so the size must be a "
              "multiple of 4", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    print(machine_line(machine(device)))
    for name, entry in backends().items():
        print(f"  backend {name:9s} {'yes' if entry['available'] else 'no ':3s}  {entry['reason']}")

    schedule = DiffusionSchedule(args.timesteps, args.classes).to(device)
    x0 = torch.randint(0, args.classes, (args.batch, args.size, args.size), device=device)
    print(f"\nq_sample: x_t ~ q(x_t | x_0), B={args.batch}, K={args.classes}, {args.size}x{args.size} labels")
    usable = ["reference"] + [b for b in ("cpu", "cuda") if backends()[b]["available"] and b == device.type]
    baseline = None
    for backend in usable:
        fn = lambda: q_sample(x0, args.timesteps // 2, schedule, backend=backend)  # noqa: E731
        fn()
        times = measure(fn, args.repeats, device)
        median = statistics.median(times)
        baseline = baseline or median
        print(f"  {backend:9s} median {median * 1e3:9.3f} ms   speedup vs reference {baseline / median:8.1f}x")

    cond = torch.randn(args.batch, args.cond_channels, args.size, args.size, device=device)
    print(f"\nDDPSHead.sample: T={args.timesteps}, {args.steps} inference steps, guidance {args.guidance}, "
          f"dim {args.dim}, cond [{args.batch}, {args.cond_channels}, {args.size}, {args.size}] (random weights, "
          "the same in both heads)")
    weights = None
    for backend in ("reference", "auto"):
        head = DDPSHead(num_classes=args.classes, cond_channels=args.cond_channels, dim=args.dim, out_dim=args.dim,
                        dim_mults=(1, 1, 1), embed_dim=16, num_timesteps=args.timesteps,
                        inference_steps=args.steps, collect_timesteps=(args.timesteps - 1,),
                        guidance_scale=args.guidance, backend=backend).to(device).eval()
        weights = weights or head.state_dict()
        head.load_state_dict(weights)
        final, _ = head.sample(cond)
        times = measure(lambda: head.sample(cond), max(1, args.repeats // 10), device)
        label = "reference" if backend == "reference" else "fused"
        print(f"  {label:9s} median {statistics.median(times) * 1e3:9.1f} ms   final logits {tuple(final.shape)}, "
              f"{final.argmax(1).unique().numel()} classes predicted")
    return 0


def bench(args) -> int:
    from . import bench as bench_mod

    return bench_mod.main(args)


def _config_path(name: str) -> Path:
    """A config file, or the name of a shipped one (``synthetic``, ``ade20k``, ...)."""
    path = Path(name)
    if path.exists() or path.suffix in (".yaml", ".yml") and path.parent != Path("."):
        return path
    from importlib import resources
    shipped = resources.files("ddps.configs") / f"{name.removesuffix('.yaml')}.yaml"
    return Path(str(shipped)) if shipped.is_file() else path


# What --resume may change in a run's config: nothing that decides what it trains. --extend also
# lets the iteration counts of the stages still to finish grow.
RESUME_FREE = ("eval.", "train.checkpoint_interval", "train.keep_last", "train.log_interval")


def _resume_config(out: Path, config: str | None, overrides, extend: bool):
    """The config a --resume continues with: the run's own (stored in its last checkpoint), with
    ``config`` and ``overrides`` over it where they leave what was trained alone."""
    import json

    from . import config as config_mod
    from .checkpoint import checkpoints

    records = checkpoints(out / "checkpoints")
    if not records:
        raise FileNotFoundError(f"{out}: no checkpoint to resume from (no {out / 'checkpoints'}/step-*.json); "
                                "start the run without --resume")
    state = json.loads(records[-1].read_text())
    stored = config_mod.load(None, (), base=state["config"])
    cfg = config_mod.load(_config_path(config) if config else None, overrides, base=state["config"])
    changed = config_mod.changes(stored, cfg)
    if state["stage"] == "done" and changed:
        raise config_mod.ConfigError(
            f"{out} is finished ({records[-1].name}): a resume trains nothing, so {'; '.join(changed.values())} would "
            f"only be written into its config. Evaluate with other settings by ddps eval --run {out} KEY=VALUE; train "
            "longer in a new run")
    growing = {"segmentor": ("segmentor.iters", "prior.iters", "train.iters"), "prior": ("prior.iters", "train.iters"),
               "head": ("train.iters",), "done": ()}[state["stage"]]
    old, new = config_mod.flatten(stored.to_dict()), config_mod.flatten(cfg.to_dict())
    refused = [text for key, text in changed.items()
               if not key.startswith(RESUME_FREE) and not (extend and key in growing and new[key] > old[key])]
    if refused:
        hint = "" if extend else f", or add --extend if only {' and '.join(growing)} should grow"
        raise config_mod.ConfigError(f"--resume would change what the run in {out} trains: {'; '.join(refused)}. "
                                     f"Resume without these overrides (the run's own config is the base){hint}")
    return cfg


def train(args) -> int:
    from . import config as config_mod
    from . import training
    from .checkpoint import checkpoints

    out = Path(args.out)
    if args.extend and not args.resume:
        raise ValueError("--extend goes with --resume: it lets a resumed run's iteration counts grow")
    if args.resume:
        cfg = _resume_config(out, args.config, args.overrides, args.extend)
    else:
        cfg = config_mod.load(_config_path(args.config or "synthetic"), args.overrides)
        if checkpoints(out / "checkpoints") or (out / "model.safetensors").exists():
            raise FileExistsError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    try:
        training.train(cfg, out, resume=args.resume)
    except training.Interrupted as e:
        # The run's config, overrides included, is in its checkpoints: this continues the same run.
        print(f"\nddps train: {e}; checkpoint written. Resume with: ddps train --out {out} --resume",
              file=sys.stderr)
        return 130
    return 0


def evaluate(args) -> int:
    import json

    from . import evaluation
    from .data import build_dataset
    from .model import load_run

    cfg, segmentor, head = load_run(args.run, args.overrides, args.weights)
    if args.base_only and not segmentor.has_classifier:
        raise ValueError(f"--base-only: the segmentor of {args.run} has no classifier of its own (a converted DDPS "
                         "checkpoint; ddps convert --segformer adds the original SegFormer's)")
    report = evaluation.evaluate(cfg, segmentor, None if args.base_only else head, build_dataset(cfg, "val"),
                                 limit=args.limit, panels_dir=Path(args.panels) if args.panels else None,
                                 panels=cfg.eval.panels)
    print(evaluation.table(report, cfg.head.kind))
    out = Path(args.json or Path(args.run) / "eval.json")
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 0


def segment(args) -> int:
    import numpy as np
    from PIL import Image

    from . import evaluation
    from .data import read_image
    from .model import dataset_classes, load_run

    # Images and KEY=VALUE overrides share the positional arguments: a word with "=" that names no
    # file is an override.
    overrides = [a for a in args.images if "=" in a and not Path(a).exists()]
    images = [a for a in args.images if a not in overrides]
    overrides = [*args.overrides, *overrides]
    if not images:
        raise ValueError("no image files given (only overrides: " + " ".join(overrides) + ")")
    stems: dict[str, str] = {}
    for name in images:
        other = stems.setdefault(Path(name).stem, name)
        if other != name:
            raise ValueError(f"{other} and {name} would both be written as {Path(args.out) / Path(name).stem}"
                             ".png: segment them into separate --out folders, or rename one")
    cfg, segmentor, head = load_run(args.run, overrides, args.weights)
    k, ignore = dataset_classes(cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    for name in images:
        scores = evaluation.predict(segmentor, head, read_image(Path(name)), cfg, k)
        stem = Path(name).stem
        wanted = {"final": f"{stem}.png"}
        if "base" in scores:
            wanted["base"] = f"{stem}_segmentor.png"
        if args.steps:
            wanted.update({n: f"{stem}_step{n.split()[1]}.png" for n in scores if n.startswith("step")})
        for key, filename in wanted.items():
            labels = scores[key].argmax(0)
            Image.fromarray(evaluation.colourise(labels, k, ignore)).save(out / filename)
            if args.labels:  # class IDs, 8-bit where they fit, else 16-bit
                ids = labels.cpu().numpy().astype(np.uint8 if k <= 256 else np.uint16)
                Image.fromarray(ids).save(out / filename.replace(".png", "_labels.png"))
        print(f"{name} -> {out / wanted['final']}")
    evaluation.legend(k).save(out / "legend.png")
    print(f"colours of the {k} classes: {out / 'legend.png'}")
    return 0


def _baseline_classifier(state: dict, path: str) -> dict:
    """``decode_head.conv_seg.*`` of the original SegFormer checkpoint at ``path``, which the DDPS
    checkpoint's head came from (the original drops the classifier): refused if their fused heads
    differ, as the classifier would then read features it was not trained on."""
    from . import checkpoint

    segformer = checkpoint.load_mmseg(path)
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


def convert(args) -> int:
    from . import checkpoint, config as config_mod
    from .model import build_head, dataset_classes, load_head_weights, save_run
    from .nn.head import SCHEDULE_BUFFERS
    from .segmentors import build_segmentor, mmseg_segformer

    out = Path(args.out)
    if (out / "config.yaml").exists() or (out / "model.safetensors").exists():
        raise FileExistsError(f"--out {out} already holds a run; choose another directory")
    cfg = config_mod.load(_config_path(args.config), args.overrides, reads_data=False)
    state = checkpoint.load_mmseg(args.checkpoint)
    if args.segformer:
        state = {**state, **_baseline_classifier(state, args.segformer)}
    try:
        seg_keys, seg_state, read = mmseg_segformer(state)
    except ValueError as e:
        raise ValueError(f"{args.checkpoint}: {e}") from None
    values = cfg.to_dict()
    values["segmentor"].update(seg_keys, iters=0, checkpoint=None, pretrained=None)
    cfg = config_mod.load(None, (), base=values, reads_data=False)
    k, _ = dataset_classes(cfg)
    segmentor = build_segmentor(cfg, k)
    try:
        segmentor.load_state_dict(seg_state)
    except RuntimeError as e:
        raise ValueError(f"{args.checkpoint}: the segmentor's weights do not fit: {e}") from None
    head = build_head(cfg, segmentor.feature_channels, for_training=True)
    try:
        head_state, ema, head_read = checkpoint.mmseg_head(state, list(head.state_dict()))
    except ValueError as e:
        raise ValueError(f"{args.checkpoint}: {e}") from None
    load_head_weights(head, head_state)  # checks every shape against the config
    if ema:  # the original averages the trained modules only; a ddps EMA is a whole head
        ema = {k: v for k, v in {**head_state, **ema}.items() if k not in SCHEDULE_BUFFERS}
        load_head_weights(head, ema)
    left_out = sorted(set(state) - read - head_read)
    out.mkdir(parents=True, exist_ok=True)
    save_run(out, cfg, segmentor, head_state, ema)
    s = cfg.segmentor
    print(f"wrote {out}: segmentor MiT-{s.variant.upper()} + SegFormer head ({s.channels} channels"
          f"{', classifier of ' + str(s.classifier_classes) + ' classes' if s.classifier_classes is not None else ', no classifier'}), "
          f"{len(head_state)} head tensors, {len(ema)} EMA tensors"
          + (f"; {len(left_out)} keys left out: {', '.join(left_out[:4])}" if left_out else ""))
    root = " data.root=DIR" if cfg.data.dataset != "synthetic-shapes" and cfg.data.root is None else ""
    print(f"use it: ddps eval --run {out}{root}   or   ddps segment --run {out} --out DIR IMAGE...")
    return 0


def ablate(args) -> int:
    from . import ablation, config as config_mod, training

    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    # --only takes every word after it; the KEY=VALUE ones among them are overrides
    only = [a for a in args.only or () if "=" not in a] or None
    overrides = [*args.overrides, *(a for a in args.only or () if "=" in a)]
    cfg = config_mod.load(_config_path(args.config), overrides)
    command = " ".join(["ddps", "ablate", *args.argv])
    try:
        result = ablation.run(cfg, Path(args.out), only, tuple(range(args.seeds)), command=command,
                              markdown_out=Path(args.markdown) if args.markdown else None)
    except training.Interrupted as e:
        print(f"\nddps ablate: {e}; checkpoint written. Resume with the same command: {command}", file=sys.stderr)
        return 130
    print(ablation.markdown(result))
    print(f"wrote {Path(args.out) / 'ablation.json'} and {Path(args.out) / 'ablation.md'}"
          + (f" and {args.markdown}" if args.markdown else ""))
    return 0


def _add_overrides(p) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. train.iters=500 eval.mode=slide (values are read as YAML)")


def _add_run(p) -> None:
    p.add_argument("--run", required=True, help="run directory written by ddps train")
    p.add_argument("--weights", help="weights file to use instead of RUN/model.safetensors")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddps", description=__doc__.replace("``", ""))  # plain text for --help
    parser.add_argument("--version", action="version", version=f"ddps {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser(
        "bench", help="measure ddps against the original implementation on this machine (the main job)",
        description="Measure every sampling and denoiser op, the denoiser modules and the whole ADE20K head "
                    "(one denoiser step, full inference with T=20 / 3 steps / guidance 0.4, one training step "
                    "at B=2): the original's eager ops (reference), torch.compile of them, plain-torch "
                    "formulations and each ddps backend, side by side in one process. The modules run on NCHW "
                    "and on channels-last input. The quick profile (default) runs B=1 and leaves torch.compile "
                    "out of the fwd+bwd and end-to-end cases; --full adds B=4 and every provider.")
    b.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device to run on (default: cpu)")
    b.add_argument("--full", action="store_true", help="the full profile instead of the quick one")
    b.add_argument("--cases", nargs="+", metavar="NAME",
                   help="run only these cases (op, module or head names; see --list)")
    b.add_argument("--list", action="store_true", help="list the profile's cases and exit")
    b.add_argument("--dtype", default="fp32", choices=tuple(DTYPES),
                   help="also run each ddps provider of the denoiser ops, modules and heads under "
                        "torch.autocast at this dtype, as a row 'provider[dtype]' beside its float32 one "
                        "(default: fp32, float32 rows only)")
    b.add_argument("--size", type=int, default=128,
                   help="mask size S (default: 128, the ADE20K head's); the ops and modules take their "
                        "shapes from it (attention at S/4, the Block at S/2)")
    b.add_argument("--repeats", type=int, default=None,
                   help="timed calls per provider (default: 5; 2 for end-to-end cases in the quick profile; "
                        "short calls repeat until 0.3 s have passed)")
    b.add_argument("--json", metavar="FILE", help="write the results as JSON")
    b.add_argument("--csv", metavar="FILE", help="write one CSV row per provider, with device, versions and commit")
    b.add_argument("--plot", metavar="FILE.png", help="plot the speedups (needs matplotlib)")
    b.add_argument("--markdown", metavar="FILE", nargs="?", const="benchmarks/RESULTS.md",
                   help="write the results as markdown (default file: benchmarks/RESULTS.md)")
    b.set_defaults(func=bench)
    t = sub.add_parser("train", help="train a segmentor and a mask-prior head on it (the two-stage recipe), then "
                                     "evaluate",
                       description="Stage 1 trains the segmentor (or loads segmentor.checkpoint); stage 2 freezes "
                                   "it and trains the head (head.kind): DDPS with diffusion on first prediction, "
                                   "the refinement control, or GSS, whose prior stage first trains its maskige VQ "
                                   "autoencoder on the labels alone (prior.*); then the "
                                   "held-out split is evaluated into OUT/eval.json. OUT also gets config.yaml, "
                                   "model.safetensors, metrics.jsonl, panels/ and checkpoints/. Ctrl-C writes a "
                                   "checkpoint and exits with 130; --resume continues from the last checkpoint. "
                                   "Under torchrun each process trains one shard of every batch.")
    t.add_argument("--config",
                   help="YAML config file or the name of a shipped one: synthetic (default), synthetic-gss, "
                        "synthetic-diff, synthetic-smoke, ade20k, ade20k-150, cityscapes; with --resume the run's "
                        "own config is the base")
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint, with the config it was started with "
                        "(overrides may change eval.* and the checkpoint and log intervals, nothing it trains)")
    t.add_argument("--extend", action="store_true",
                   help="with --resume: let the iteration counts of the stages still to finish grow "
                        "(segmentor.iters, prior.iters, train.iters)")
    _add_overrides(t)
    t.set_defaults(func=train)
    e = sub.add_parser("eval", help="evaluate a trained run on its held-out split",
                       description="mIoU, mBIoU and aAcc of the segmentor and of DDPS at every collected step; "
                                   "eval.mode=single|ms-flip|slide picks the inference.")
    _add_run(e)
    e.add_argument("--json", help="output file (default: RUN/eval.json)")
    e.add_argument("--limit", type=int, help="evaluate only the first N images")
    e.add_argument("--panels", metavar="DIR", help="write eval.panels PNG panels (image | segmentor | steps | truth)")
    e.add_argument("--base-only", action="store_true", help="evaluate the segmentor alone")
    _add_overrides(e)
    e.set_defaults(func=evaluate)
    g = sub.add_parser("segment", help="segment image files into colourised mask PNGs",
                       description="Writes OUT/<name>.png (DDPS, final step) and OUT/<name>_segmentor.png for "
                                   "each image; --steps adds OUT/<name>_step<i>.png for each collected step, "
                                   "--labels the class-ID PNGs; OUT/legend.png shows each class's colour. "
                                   "KEY=VALUE words among the images are config overrides (eval.inference_steps=4, "
                                   "eval.guidance_scale=0.2, eval.mode=slide, ...). Two images of one name (in "
                                   "other folders or with other extensions) are refused: their masks would "
                                   "overwrite each other.")
    _add_run(g)
    g.add_argument("--out", required=True, help="output directory")
    g.add_argument("--steps", action="store_true", help="also write the mask of every collected step")
    g.add_argument("--labels", action="store_true",
                   help="also write each mask as class IDs (<file>_labels.png: 8-bit, 16-bit past 256 classes)")
    g.add_argument("images", nargs="+", metavar="IMAGE|KEY=VALUE", help="image files, and config overrides")
    g.set_defaults(func=segment, overrides=())
    c = sub.add_parser("convert", help="convert an original mmseg DDPS checkpoint into a ddps run directory",
                       description="Reads the checkpoint with torch.load(weights_only=True) and converts the whole "
                                   "model: the MiT backbone and the original's SegFormer head (segmentor.type "
                                   "segformer-mmseg, variant and channels read from the weights) and the DDPS "
                                   "head with its EMA, checked against the config's head. OUT becomes a run "
                                   "directory (config.yaml, model.safetensors) for ddps eval and ddps segment. "
                                   "The original drops SegFormer's classifier, so the segmentor has no prediction "
                                   "of its own unless --segformer gives the SegFormer checkpoint it came from.")
    c.add_argument("checkpoint", help="mmseg DDPS checkpoint (.pth)")
    c.add_argument("--config", default="ade20k",
                   help="config of the run the checkpoint comes from: head sizes, dataset, eval settings "
                        "(default: ade20k; cityscapes for the Cityscapes model)")
    c.add_argument("--segformer", metavar="CKPT",
                   help="the original mmseg SegFormer checkpoint the DDPS model was trained on: its classifier "
                        "(decode_head.conv_seg) becomes the segmentor's, the baseline that ddps eval reports")
    c.add_argument("--out", required=True, help="output run directory (must not hold a run)")
    _add_overrides(c)
    c.set_defaults(func=convert)
    from . import ablation
    a = sub.add_parser("ablate", help="the paper's findings as one controlled comparison of head variants",
                       description="Trains the segmentor once (until its validation mIoU is flat, with "
                                   "segmentor.eval_interval set), then every head variant from that frozen "
                                   "segmentor with the config's budget, for each seed, evaluates all on the "
                                   "held-out split, and writes OUT/ablation.json and OUT/ablation.md (mean and "
                                   "range over seeds, and whether each of the paper's findings is reproduced). "
                                   "Variants: " + ", ".join(f"{k} ({v})" for k, v in ablation.DESCRIPTIONS.items())
                                   + ". Rerunning resumes: finished variants are not trained again.")
    a.add_argument("--config", default="synthetic",
                   help="YAML config file or the name of a shipped one (default: synthetic)")
    a.add_argument("--out", required=True, help="output directory")
    a.add_argument("--only", nargs="+", metavar="NAME", help="run only these variants")
    a.add_argument("--seeds", type=int, default=2, help="seeds per variant: 0..N-1 (default: 2)")
    a.add_argument("--markdown", metavar="FILE", help="also write the table there (e.g. benchmarks/ABLATIONS.md)")
    _add_overrides(a)
    a.set_defaults(func=ablate)
    p = sub.add_parser("demo", help="run the DDPS sampling loop on random features and time the sampling op",
                       description="Run the DDPS sampling loop on random features; time q_sample on every "
                                   "available backend against the reference.")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device to run on (default: cpu)")
    p.add_argument("--batch", type=int, default=4, help="batch size B (default: 4)")
    p.add_argument("--classes", type=int, default=151, help="number of classes K (default: 151, ADE20K)")
    p.add_argument("--size", type=int, default=128, help="mask height and width (default: 128)")
    p.add_argument("--timesteps", type=int, default=20, help="diffusion steps T (default: 20)")
    p.add_argument("--steps", type=int, default=2, help="inference steps (default: 2, as released)")
    p.add_argument("--guidance", type=float, default=0.4, help="guidance scale (default: 0.4, as released)")
    p.add_argument("--dim", type=int, default=32, help="denoiser width (default: 32; the ADE20K head uses 256)")
    p.add_argument("--cond-channels", type=int, default=64, help="condition channels (default: 64)")
    p.add_argument("--repeats", type=int, default=10, help="timed repetitions per measurement (default: 10)")
    p.add_argument("--seed", type=int, default=0, help="torch seed (default: 0)")
    p.set_defaults(func=demo)
    return parser


def reuse_freed_memory() -> bool:
    """Makes glibc's malloc keep freed blocks for reuse instead of giving them back to the OS. By
    default it serves blocks above its mmap threshold (128 KiB, raised as such blocks are freed, to
    at most 32 MiB) with fresh pages and unmaps them on free, so every training step pays the page
    faults of its activations again: the head's training step (ddps bench --cases
    head.train_step) took 7.6 s that way and 6.1-6.4 s without, on this package's reference CPU. Left
    out where DDPS_REUSE_MEMORY=0, where the user set glibc's MALLOC_MMAP_THRESHOLD_ or
    MALLOC_TRIM_THRESHOLD_, and on other C libraries. Returns whether it applied."""
    if os.environ.get("DDPS_REUSE_MEMORY") == "0" or {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} & set(os.environ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(mallopt(m_mmap_threshold, 1 << 30) and mallopt(m_trim_threshold, 2 ** 31 - 1))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    # argparse matches all positionals in one go, so overrides placed after later options come
    # back as unknown arguments; they are overrides all the same
    args, unknown = parser.parse_known_args(argv)
    stray = [a for a in unknown if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if unknown:
        args.overrides = [*args.overrides, *unknown]
    args.argv = argv[1:]
    for name in ("batch", "classes", "size", "timesteps", "steps", "dim", "cond_channels", "repeats"):
        value = getattr(args, name, None) if args.command in ("bench", "demo") else None
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.command == "bench" and args.size % 4:
        parser.error(f"--size must be a multiple of 4 (the UNet halves it twice), got {args.size}")
    if getattr(args, "limit", None) is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    from .config import ConfigError
    from .data import DataError
    if args.command != "bench":  # the benchmarks time library calls, with the allocator users have
        reuse_freed_memory()
    try:
        return args.func(args)
    except (ConfigError, DataError, FileNotFoundError, FileExistsError, ImportError, ValueError) as e:
        if args.command in ("bench", "demo"):
            raise
        print(f"ddps {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
