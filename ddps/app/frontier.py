"""``ddps frontier``: what each sampling setting of a trained DDPS run gains and costs. Every
setting (inference steps x guidance on and off x early stop) is an evaluation of the run's
held-out split as ``ddps eval`` with those overrides computes it, from the same random state, with
the head's sampling timed per image beside its mIoU."""
from __future__ import annotations

import time

import torch

from ..bench.measure import sync, machine, machine_line
from . import evaluation
from .ablation import duration, table
from .data import build_dataset
from .model import load_run, run_config

STEPS = (1, 2, 3, 5, 10, 20)  # eval.inference_steps
STOPS = (0.01, 0.005)  # eval.stop_below, beside 0 (never)


class _Timed:
    """A head whose ``sample`` is timed and counted; every other attribute is the head's."""

    def __init__(self, head):
        self.head, self.seconds, self.steps = head, 0.0, 0

    def __getattr__(self, name):
        return getattr(self.head, name)

    def sample(self, cond, base=None):
        sync(cond.device)
        start = time.perf_counter()
        out = self.head.sample(cond, base)
        sync(cond.device)
        self.seconds += time.perf_counter() - start
        self.steps += int(self.head.steps_run.sum())
        return out


def settings(cfg, steps=STEPS, stops=STOPS) -> list[dict]:
    """Every setting swept: guidance as the run's and off (1.0; once where the run's is 1) x
    ``steps`` x early stop (never, then each of ``stops``)."""
    guidance = dict.fromkeys([cfg.eval.guidance_scale, 1.0])
    return [{"inference_steps": n, "guidance_scale": g, "stop_below": s}
            for g in guidance for n in steps for s in (0.0, *stops)]


def overrides(setting: dict) -> list[str]:
    """``ddps eval``'s overrides that give ``setting`` (no steps collected, no other datasets)."""
    return [f"eval.{key}={value}" for key, value in setting.items()] + ["eval.collect_timesteps=[]",
                                                                         "eval.datasets=[]"]


def sweep(run, user_overrides=(), steps=STEPS, stops=STOPS, limit: int | None = None, weights: str | None = None,
          progress=print) -> dict:
    """Evaluates every setting of ``settings`` on ``run`` (a ``ddps train`` directory of a DDPS
    head; its weights, or ``weights``): its final mIoU / mBIoU, the steps its sampling ran per image and the head's seconds per
    image, with the machine they were measured on."""
    cfg = run_config(run, user_overrides)
    if cfg.head.kind != "ddps":
        raise ValueError(f"ddps frontier sweeps DDPS's sampling steps: {run}'s head is {cfg.head.kind!r}")
    dataset = build_dataset(cfg, "val")
    images = len(dataset) if limit is None else min(limit, len(dataset))
    _, segmentor, head = load_run(run, weights=weights, cfg=cfg)
    evaluation.evaluate(cfg, segmentor, head, dataset, limit=1, others=False)  # warm-up: first-call costs
    rows, base, start = [], None, time.perf_counter()
    for setting in settings(cfg, steps, stops):
        scfg = run_config(run, [*user_overrides, *overrides(setting)])
        _, segmentor, head = load_run(run, weights=weights, cfg=scfg)
        timed = _Timed(head)
        report = evaluation.evaluate(scfg, segmentor, timed, dataset, limit=limit, others=False)
        base = report.get("base", base)
        final = report[head.metrics_name]["final"]
        calls = 1 if setting["guidance_scale"] == 1 else 2  # a guided step calls the denoiser twice
        rows.append({**setting, "mIoU": final["mIoU"], "mBIoU": final["mBIoU"],
                     "steps_per_image": timed.steps / images,
                     "denoiser_calls_per_image": calls * timed.steps / images,
                     "head_ms_per_image": 1000 * timed.seconds / images})
        progress(_row(rows[-1]))
    own = {"inference_steps": cfg.eval.inference_steps, "guidance_scale": cfg.eval.guidance_scale,
           "stop_below": cfg.eval.stop_below}
    return {"run": str(run), "machine": machine_line(machine(torch.device(cfg.device))), "images": images,
            "num_timesteps": cfg.eval.num_timesteps, "mode": cfg.eval.mode, "dtype": cfg.eval.dtype, "own": own,
            "base": base, "wall_s": time.perf_counter() - start, "rows": rows}


def _row(row: dict) -> str:
    return (f"steps {row['inference_steps']:2d}  guidance {row['guidance_scale']:g}  stop below {row['stop_below']:g}:"
            f"  mIoU {row['mIoU']:.2f}  {row['steps_per_image']:.2f} steps/image  {row['head_ms_per_image']:.1f} ms/image")


def markdown(result: dict, command: str) -> str:
    """The sweep as a markdown page: the machine, the run, and a row per setting with its time
    against the run's own setting."""
    own = next((r for r in result["rows"] if all(r[k] == v for k, v in result["own"].items())), None)
    header = ["inference steps", "guidance", "stop below", "mIoU", "mBIoU", "steps run per image",
              "denoiser calls per image", "head ms per image", "time / the run's setting"]
    body = [[r["inference_steps"], "off" if r["guidance_scale"] == 1 else f"{r['guidance_scale']:g}",
             "never" if r["stop_below"] == 0 else f"{r['stop_below']:g}", f"{r['mIoU']:.2f}", f"{r['mBIoU']:.2f}",
             f"{r['steps_per_image']:.2f}", f"{r['denoiser_calls_per_image']:.2f}", f"{r['head_ms_per_image']:.1f}",
             "-" if own is None else f"{r['head_ms_per_image'] / own['head_ms_per_image']:.2f}x"]
            for r in result["rows"]]
    segmentor = "" if result["base"] is None else (f"; the segmentor alone scores {result['base']['mIoU']:.2f} mIoU / "
                                                   f"{result['base']['mBIoU']:.2f} mBIoU")
    setting = result["own"]
    return "\n".join([
        "# What each sampling setting gains and costs", "",
        f"`{command}` on {result['machine']}.", "",
        f"Run `{result['run']}`: its setting is {setting['inference_steps']} inference steps of "
        f"T = {result['num_timesteps']}, guidance {setting['guidance_scale']:g}, stop below "
        f"{setting['stop_below']:g}. {result['images']} held-out images, eval.mode {result['mode']}, "
        f"eval.dtype {result['dtype']}{segmentor}. The head's time is its sampling alone (the segmentor's "
        f"forward excluded), per image; wall time of the sweep {duration(result['wall_s'])}.", "",
        *table(header, body), ""])
