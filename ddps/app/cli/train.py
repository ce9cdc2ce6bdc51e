"""ddps train: the training recipe (ddps.app.trainer), started or resumed."""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from .. import checkpoint, config as config_mod, preflight, trainer
from ..runlock import RunLock
from .common import add_overrides

NAME = "train"
HELP = "train a segmentor and a mask-prior head on it (the recipe), then evaluate"
DESCRIPTION = ("Stage 1 trains the segmentor (or loads segmentor.checkpoint); a head with a prior of its own "
               "(head.kind=gss) then trains it on the labels alone (prior.*); stage 2 freezes the segmentor and "
               "trains the head (head.kind): DDPS with diffusion on first prediction, the refinement control, or "
               "GSS's conditioning network (which trains the segmentor's backbone with it, or with "
               "head.gss.conditioning=frozen-features sits on the frozen features); GSS-FT-W's decoder "
               "(head.gss.decoder=learned) then trains on its predictions (decoder.*); then the held-out split is "
               "evaluated into OUT/eval.json. OUT also gets config.yaml, model.safetensors, metrics.jsonl, panels/ "
               "and checkpoints/. Ctrl-C writes a checkpoint and exits with 130; --resume continues from the last "
               "checkpoint. Under torchrun (torchrun --nproc_per_node N -m ddps train ...) each process trains one "
               "shard of every batch.")
# What --resume may change in a run's config: nothing that decides what it trains. --extend also
# lets the iteration counts of the stages still to finish grow.
RESUME_FREE = ("eval.", "train.checkpoint_interval", "train.keep_last", "train.log_interval")
GROWING = {"segmentor": ("segmentor.iters", "prior.iters", "train.iters", "decoder.iters"),
           "prior": ("prior.iters", "train.iters", "decoder.iters"), "head": ("train.iters", "decoder.iters"),
           "decoder": ("decoder.iters",), "done": ()}


def add_arguments(p) -> None:
    p.add_argument("--config", help="YAML config file or the name of a shipped one: synthetic (default), "
                                    f"{', '.join(n for n in config_mod.shipped() if n != 'synthetic')}; with --resume "
                                    "the run's own config is the base")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint, with the config it was started with "
                        "(overrides may change eval.* and the checkpoint and log intervals, nothing it trains)")
    p.add_argument("--extend", action="store_true",
                   help="with --resume: let the iteration counts of the stages still to finish grow "
                        "(segmentor.iters, prior.iters, train.iters)")
    add_overrides(p)


def run(args) -> int:
    out = Path(args.out)
    if args.extend and not args.resume:
        raise ValueError("--extend goes with --resume: it lets a resumed run's iteration counts grow")
    if args.resume:
        cfg = resume_config(out, args.config, args.overrides, args.extend)
    else:
        cfg = config_mod.load(config_mod.find(args.config or "synthetic"), args.overrides)
    preflight.check(cfg, splits=("train", "val"), outputs=[("--out", out, "dir")], training=True)
    try:
        # under torchrun, rank 0 holds the folder for all (torchrun stops the others if it cannot)
        with RunLock(out, "ddps train") if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext():
            started = checkpoint.checkpoints(out / "checkpoints") or (out / "model.safetensors").exists()
            if not args.resume and started:
                raise FileExistsError(f"{out} already holds a run: pass --resume to continue it, or choose another "
                                      "--out")
            trainer.train(cfg, out, resume=args.resume)
    except trainer.Interrupted as e:
        # The run's config, overrides included, is in its checkpoints: this continues the same run.
        print(f"\nddps train: {e}; checkpoint written. Resume with: ddps train --out {out} --resume",
              file=sys.stderr)
        return 130
    return 0


def resume_config(out: Path, config: str | None, overrides, extend: bool):
    """The config a --resume continues with: the run's own (stored in its last checkpoint), with
    ``config`` and ``overrides`` over it where they leave what was trained alone."""
    records = checkpoint.checkpoints(out / "checkpoints")
    if not records:
        raise FileNotFoundError(f"{out}: no checkpoint to resume from (no {out / 'checkpoints'}/step-*.json); "
                                "start the run without --resume")
    state = json.loads(records[-1].read_text())
    stored = config_mod.load(None, (), base=state["config"])
    cfg = config_mod.load(config_mod.find(config) if config else None, overrides, base=state["config"])
    changed = config_mod.changes(stored, cfg)
    if state["stage"] == "done" and changed:
        raise config_mod.ConfigError(
            f"{out} is finished ({records[-1].name}): a resume trains nothing, so {'; '.join(changed.values())} would "
            f"only be written into its config. Evaluate with other settings by ddps eval --run {out} KEY=VALUE; train "
            "longer in a new run")
    growing = GROWING[state["stage"]]
    old, new = config_mod.flatten(stored.to_dict()), config_mod.flatten(cfg.to_dict())
    refused = [text for key, text in changed.items()
               if not key.startswith(RESUME_FREE) and not (extend and key in growing and new[key] > old[key])]
    if refused:
        growable = [key for key in changed if key in growing]
        hint = f", or add --extend if only {' and '.join(growable)} should grow" if growable and not extend else ""
        raise config_mod.ConfigError(f"--resume would change what the run in {out} trains: {'; '.join(refused)}. "
                                     f"Resume without these overrides (the run's own config is the base){hint}")
    return cfg
