"""``ddps ablate``: the paper's three findings as one controlled comparison. The segmentor is
trained once (to convergence where ``segmentor.eval_interval`` is set), then every head variant
is trained from that same frozen segmentor with the same budget, for each seed, and all are
evaluated on the same held-out split. Finished variants are not trained again.

Layout of OUT: ``segmentor/`` (its run, ``segmentor.safetensors``), ``<variant>/seed-<s>/`` (a
run directory each; the inference variants hold an ``eval.json``: their source's run of that
seed evaluated otherwise, ``ddps`` sampled without guidance or ``gss-ftw`` decoded by nearest
colour), ``ablation.json`` and ``ablation.md``.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
import yaml

from ..bench.measure import machine, machine_line
from . import checkpoint, config as config_mod, evaluation, trainer
from .data import build_dataset
from .model import load_run

# GSS's conditioning network and FT-W's decoder cut down to the demo's size (GSS's: 384/512/2048
# wide, 16 heads; FT-W 128 wide, 4 heads), and the demo's VQ prior (as configs/synthetic-gss.yaml;
# the lengths and batches of the prior and decoder stages are the config's)
GSS_DEMO = ["head.kind=gss", "head.gss.fusion_channels=[64,128,256]", "head.gss.swin=[4,2,7]", "head.gss.codes=512",
            "head.gss.channels=32", "head.gss.decoder_swin=[32,2,1,7]"]
# name -> (what it changes, training overrides); every one is a config a user can rerun
TRAINED = {
    "ddps": ("the original recipe: first-prediction noise, uniform transition, free re-noising", []),
    "gt-noise": ("training noises the ground truth: the naive integration", ["head.noise_source=ground_truth"]),
    "absorbing": ("absorbing [MASK] noise instead of uniform", ["head.transition=absorbing"]),
    "mask-and-replace": ("VQ-Diffusion mask-and-replace noise", ["head.transition=mask_and_replace"]),
    "refine": ("control: the same network as a plain refinement head, no diffusion", ["head.kind=refine"]),
    "gss-ftw": ("GSS as published instead, GSS-FT-W: a maskige VQ autoencoder (prior stage), its conditioning "
                "network on the backbone's levels, trained end to end from the shared segmentor, then FT-W's "
                "decoder trained on its predicted maskiges", [*GSS_DEMO, "eval.use_ema=false", "head.gss.decoder=learned"]),
    "gss-frozen": ("gss's prior, but a small conditioning network on the frozen segmentor's features",
                   [*GSS_DEMO, "head.gss.conditioning=frozen-features"]),
}
# name -> (what it changes, the trained variant whose runs it evaluates, evaluation overrides)
INFERRED = {
    "gss": ("GSS as published instead, GSS-FF: the gss-ftw runs decoded by nearest colour, without FT-W's decoder",
            "gss-ftw", ["head.gss.decoder=nearest"]),
    "renoise-g1": ("ddps heads, free re-noising without guidance", "ddps", ["eval.guidance_scale=1.0"]),
    "posterior-g1": ("ddps heads, posterior sampling without guidance, as the original's posterior loop", "ddps",
                     ["eval.sampling=posterior", "eval.guidance_scale=1.0"]),
}
# the table's order: GSS's two decoders side by side
VARIANTS = ("ddps", "gt-noise", "absorbing", "mask-and-replace", "refine", "gss", "gss-ftw", "gss-frozen",
            "renoise-g1", "posterior-g1")
DESCRIPTIONS = {name: {**TRAINED, **INFERRED}[name][0] for name in VARIANTS}


def _same_config(cfg, out: Path) -> None:
    """OUT keeps the config it was started with; a rerun with another would mix variants trained
    under different settings."""
    path = out / "config.yaml"
    if not path.exists():
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
        return
    changed = config_mod.changes(config_mod.load(None, (), base=yaml.safe_load(path.read_text())), cfg)
    if changed:
        raise config_mod.ConfigError(f"{out} holds an ablation with other settings ({'; '.join(changed.values())}): "
                                     "rerun it with its own config and overrides, or choose another --out")


def _segmentor(cfg, out: Path) -> Path:
    """The shared segmentor's weights: segmentor.checkpoint, or trained (or resumed) once."""
    if cfg.segmentor.checkpoint:
        return Path(cfg.segmentor.checkpoint)
    if cfg.segmentor.iters == 0:
        raise config_mod.ConfigError("segmentor.iters: 0 leaves the segmentor untrained; ddps ablate trains it once "
                                     "(segmentor.iters > 0) or takes segmentor.checkpoint")
    weights = out / "segmentor" / "segmentor.safetensors"
    if weights.exists():
        return weights
    run = out / "segmentor"
    resume = bool(checkpoint.checkpoints(run / "checkpoints"))
    trainer.train(cfg, run, resume=resume, until="head")
    tensors, _ = checkpoint.load_checkpoint(checkpoint.checkpoints(run / "checkpoints")[-1])
    checkpoint.save_weights(weights, {k: v for k, v in tensors.items() if k.startswith("segmentor.")})
    return weights


def _train(cfg, overrides, run: Path) -> dict:
    if (run / "eval.json").exists():  # finished: never trained again
        return json.loads((run / "eval.json").read_text())
    resume = bool(checkpoint.checkpoints(run / "checkpoints"))
    variant = config_mod.load(None, overrides, base=cfg.to_dict())
    trainer.train(variant, run, resume=resume)
    return json.loads((run / "eval.json").read_text())


def _infer(source: Path, overrides, out: Path) -> dict:
    if out.exists():
        return json.loads(out.read_text())
    cfg, segmentor, head = load_run(source, overrides)
    report = evaluation.evaluate(cfg, segmentor, head, build_dataset(cfg, "val"))
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write(out, json.dumps(report, indent=1).encode())
    return report


def finished(out: Path) -> dict:
    """{variant: {seed: its eval.json}} of every finished run in an ablation folder, whichever
    invocation (and --only) ran it: the report covers them all."""
    reports = {}
    for name in VARIANTS:
        for path in (out / name).glob("seed-*/eval.json"):
            seed = path.parent.name.removeprefix("seed-")
            if seed.isdigit():
                reports.setdefault(name, {})[int(seed)] = json.loads(path.read_text())
    return {name: dict(sorted(r.items())) for name, r in reports.items()}


def _records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _summary(reports: dict) -> dict:
    """Mean, min and max over seeds of the segmentor's and the head's mIoU and mBIoU, and of each
    collected step's, each part's (GSS's pixel branch) and the prior's round trip's mIoU."""
    def stats(values):
        return {"mean": round(statistics.fmean(values), 2), "min": min(values), "max": max(values)}

    runs = list(reports.values())
    heads = [evaluation.head_report(r)[1] for r in runs]
    # a head that trains the backbone (GSS's) has no segmentor baseline; a mask prior of its own, a bound
    out = {"segmentor_mIoU": stats([r["base"]["mIoU"] for r in runs]) if all("base" in r for r in runs) else None,
           "mIoU": stats([h["final"]["mIoU"] for h in heads]),
           "mBIoU": stats([h["final"]["mBIoU"] for h in heads]),
           "prior_mIoU": stats([r["prior"]["reconstruction"]["mIoU"] for r in runs]) if "prior" in runs[0] else None,
           "parts": {p: stats([h["parts"][p]["mIoU"] for h in heads])
                     for p in heads[0].get("parts", {}) if all(p in h.get("parts", {}) for h in heads)}}
    out["steps"] = {s: stats([h["steps"][s]["mIoU"] for h in heads]) for s in heads[0]["steps"]}
    return out


def findings(summary: dict) -> list[tuple[str, str]]:
    """The paper's three findings, and the mask prior against its control, each judged on the
    means, with the spread over seeds given beside them: (claim, verdict)."""
    def m(name, key="mIoU"):
        return summary[name][key]["mean"]

    def spread(*names):
        return max(summary[n]["mIoU"]["max"] - summary[n]["mIoU"]["min"] for n in names)

    out = []
    if "gt-noise" in summary:
        base, naive = m("gt-noise", "segmentor_mIoU"), m("gt-noise")
        out.append(("1. A naive integration (noising the ground truth) degrades the segmentor",
                    f"{'reproduced' if naive < base else 'not reproduced'}: {naive:.2f} mIoU with the head vs "
                    f"{base:.2f} for the segmentor alone (seed spread {spread('gt-noise'):.2f})"))
    kinds = [k for k in ("absorbing", "mask-and-replace") if k in summary]
    if "ddps" in summary and "gt-noise" in summary and kinds:
        source = abs(m("ddps") - m("gt-noise"))
        kind = max(abs(m("ddps") - m(k)) for k in kinds)
        out.append(("2. What the noise is added to matters more than the kind of noise",
                    f"{'reproduced' if source > kind else 'not reproduced'}: changing the source moves mIoU by "
                    f"{source:.2f}, changing the transition by at most {kind:.2f} (seed spread "
                    f"{spread('ddps', 'gt-noise', *kinds):.2f})"))
    if "renoise-g1" in summary and "posterior-g1" in summary:
        free, post = m("renoise-g1"), m("posterior-g1")
        out.append(("3. Free re-noising works as well as or better than posterior sampling",
                    f"{'reproduced' if free >= post - spread('renoise-g1', 'posterior-g1') else 'not reproduced'}: "
                    f"{free:.2f} vs {post:.2f} mIoU (both without guidance; seed spread "
                    f"{spread('renoise-g1', 'posterior-g1'):.2f})"))
    for name in ("gss", "gss-ftw", "gss-frozen"):
        if "ddps" in summary and name in summary:
            pixels = summary[name]["parts"].get("pixel branch")  # none in runs evaluated before parts existed
            out.append((f"GSS ({name}) against DDPS, from the same segmentor",
                        f"{m(name) - m('ddps'):+.2f} mIoU ({name} {m(name):.2f}, ddps {m('ddps'):.2f}; seed spread "
                        f"{spread('ddps', name):.2f}); its prior's round trip of the true masks scores "
                        f"{m(name, 'prior_mIoU'):.2f}" + (f", its pixel branch alone {pixels['mean']:.2f}"
                                                          if pixels else "")))
    if "ddps" in summary and "refine" in summary:
        gain = m("ddps") - m("refine")
        out.append(("The mask prior beyond its capacity (DDPS minus the refinement control)",
                    f"{gain:+.2f} mIoU (ddps {m('ddps'):.2f}, refine {m('refine'):.2f}; seed spread "
                    f"{spread('ddps', 'refine'):.2f})"))
    return out


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table's lines: every row with the header's cells (a '|' in a cell escaped)."""
    if any(len(row) != len(header) for row in rows):
        raise ValueError(f"a row's cells differ from the header's {len(header)}")
    line = lambda cells: "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"  # noqa: E731
    return [line(header), "|" + "---|" * len(header), *map(line, rows)]


def duration(seconds: float) -> str:
    """'42 s', '3.5 min' or '1.2 h'."""
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 1 else f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def markdown(result: dict) -> str:
    s = result["summary"]
    fmt = lambda x: "-" if x is None else f"{x['mean']:.2f} ({x['min']:.2f}-{x['max']:.2f})"  # noqa: E731
    steps = sorted({st for v in s.values() for st in v["steps"]}, key=int)
    done, runs = result["runs_done_before"], sum(len(v) for v in result["runs"].values())
    val = result["segmentor_val"]
    lines = ["# Ablations", "",
             f"`{result['command']}` on {result['machine']}.", "",
             f"Every finished run in the folder: {_count(runs, 'run')} of {_count(len(s), 'variant')}, seeds "
             f"{', '.join(map(str, result['seeds']))}; one segmentor for all (validation mIoU "
             f"{val[-1] if val else '-'} after {result['segmentor_steps']} steps). This invocation took "
             f"{duration(result['wall_s'])}"
             + (f"; {done} of the runs {'was' if done == 1 else 'were'} finished before it" if done else "")
             + ". Mean (min-max) over seeds; mIoU and boundary IoU in %, on the held-out split.", ""]
    header = ["variant", "what it changes", "seeds", "segmentor mIoU", "head mIoU", "head mBIoU",
              "prior's round trip mIoU", *(f"step {st} mIoU" for st in steps)]
    rows = [[name, result["variants"][name], len(result["runs"][name]), fmt(v["segmentor_mIoU"]), fmt(v["mIoU"]),
             fmt(v["mBIoU"]), fmt(v.get("prior_mIoU")), *(fmt(v["steps"][st]) if st in v["steps"] else "-"
                                                          for st in steps)]
            for name, v in s.items()]
    lines += table(header, rows)
    lines += ["", "## The findings", ""]
    lines += [f"- **{claim}**: {verdict}." for claim, verdict in result["findings"]]
    return "\n".join(lines) + "\n"


def check_variants(only) -> None:
    unknown = [v for v in only or () if v not in VARIANTS]
    if unknown:
        raise ValueError(f"--only {' '.join(unknown)}: not a variant; the variants are {', '.join(VARIANTS)}")


def run(cfg, out: Path, only=None, seeds=(0, 1), command: str = "ddps ablate", markdown_out: Path | None = None):
    check_variants(only)
    chosen = [v for v in VARIANTS if not only or v in only]
    start = time.perf_counter()
    _same_config(cfg, out)
    done = sum(map(len, finished(out).values()))  # the report covers every run in the folder, chosen or not
    weights = _segmentor(cfg, out)
    # every variant and seed: the same segmentor, and the same images (the seed varies the rest)
    images = cfg.seed if cfg.data.synthetic.seed is None else cfg.data.synthetic.seed
    shared = [f"segmentor.checkpoint={weights}", f"data.synthetic.seed={images}"]
    for name in chosen:
        for seed in seeds:
            if name in TRAINED:
                _train(cfg, [*shared, *TRAINED[name][1], f"seed={seed}"], out / name / f"seed-{seed}")
            else:  # its source's run of this seed, trained first if needed, evaluated otherwise
                _, trained, overrides = INFERRED[name]
                source = out / trained / f"seed-{seed}"
                _train(cfg, [*shared, *TRAINED[trained][1], f"seed={seed}"], source)
                _infer(source, overrides, out / name / f"seed-{seed}" / "eval.json")
    reports = finished(out)
    summary = {name: _summary(r) for name, r in reports.items()}
    # a resumed segmentor run logs the steps after its checkpoint again: the last record of a step counts
    records = _records(out / "segmentor")
    val = {r["step"]: r["val_mIoU"] for r in records if "val_mIoU" in r}
    steps = max((r["step"] for r in records if r.get("stage") == "segmentor"), default=0)
    result = {"command": command, "machine": machine_line(machine(torch.device(cfg.device))),
              "seeds": sorted({s for r in reports.values() for s in r}), "wall_s": time.perf_counter() - start,
              "runs_done_before": done,
              "segmentor_val": [val[step] for step in sorted(val)], "segmentor_steps": steps,
              "variants": {n: DESCRIPTIONS[n] for n in reports}, "summary": summary,
              "findings": findings(summary), "runs": {n: {str(s): r for s, r in v.items()} for n, v in reports.items()}}
    checkpoint.atomic_write(out / "ablation.json", json.dumps(result, indent=1).encode())
    text = markdown(result)
    checkpoint.atomic_write(out / "ablation.md", text.encode())
    if markdown_out is not None:
        markdown_out.parent.mkdir(parents=True, exist_ok=True)
        markdown_out.write_text(text)
    return result
