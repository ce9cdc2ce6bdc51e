"""The training recipe (``ddps.app.stages``): the segmentor, then a head's own prior where it has
one, then the head on the frozen segmentor (or with its backbone), then a decoder trained on the
head's predictions where it has one; then the held-out split is evaluated.

Resumability: a checkpoint holds the segmentor, the head, its EMA and the stage's optimiser, plus
the stage and step. The data of a step is a function of (seed, step) (see ``ddps.app.data``) and
the global RNG is seeded from (seed, stage, step, rank) before every step, so the LR schedule, the
data and the random draws of a resumed run continue exactly where the checkpoint left them.
Ctrl-C (SIGINT) or SIGTERM finishes the current step, writes a checkpoint and exits with 130.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from . import checkpoint, evaluation, stages as stages_mod
from .data import build_dataset, mix_seed, rare_class_sampling, train_batches
from .model import build_head, build_segmentor, dataset_classes, save_run
from .stages import STAGES


class Interrupted(Exception):
    pass


class _Signals:
    """SIGINT/SIGTERM set a flag that the loop reads between steps."""

    def __init__(self):
        self.caught = None

    def __enter__(self):
        self._old = {s: signal.signal(s, self._catch) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _catch(self, signum, frame):
        if self.caught is not None:  # a second Ctrl-C while the checkpoint is written: keep going
            return
        self.caught = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)


class Trainer:
    def __init__(self, cfg, out: Path, resume: bool):
        self.cfg, self.out = cfg, Path(out)
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and dist.is_initialized():
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        self.train_set = build_dataset(cfg, "train")
        self.val_set = build_dataset(cfg, "val")
        self.rcs = rare_class_sampling(self.train_set, cfg.data)
        self.k, self.ignore = dataset_classes(cfg)
        torch.manual_seed(cfg.seed)  # initial weights
        self.segmentor = build_segmentor(cfg).to(self.device)
        if cfg.segmentor.checkpoint:
            state = checkpoint.unprefixed(checkpoint.load_weights(cfg.segmentor.checkpoint), "segmentor.")
            self.segmentor.load_state_dict(state)
        self.head = build_head(cfg, self.segmentor.feature_channels, True,
                               self.segmentor.level_channels).to(self.device)
        self.ema = self._fresh_ema()
        self.stages = stages_mod.build(self)
        self.index, self.step = 0, 0  # the stage running (len(stages): done) and its step
        self.val_history = []  # the segmentor's validation mIoUs (segmentor.eval_interval)
        self.resumed_from = None
        if resume:
            self._resume()

    @property
    def stage(self) -> stages_mod.Stage | None:
        return self.stages[self.index] if self.index < len(self.stages) else None

    @property
    def stage_name(self) -> str:
        return self.stage.name if self.stage is not None else "done"

    def _fresh_ema(self) -> dict:
        return {k: v.detach().clone() for k, v in self.head.averaged_state().items()}

    # -- state -------------------------------------------------------------------------------
    def save(self) -> None:
        if self.rank == 0:
            tensors = {**checkpoint.prefixed(self.segmentor.state_dict(), "segmentor."),
                       **checkpoint.prefixed(self.head.state_dict(), "head."), **checkpoint.prefixed(self.ema, "ema.")}
            # a finished run's checkpoint keeps its last stage's optimiser (which a resume never reads)
            optim_tensors, structure = checkpoint.optimizer_tensors((self.stage or self.stages[-1]).optimizer)
            tensors.update(optim_tensors)
            state = {"stage": self.stage_name, "optimizer": structure, "config": self.cfg.to_dict(),
                     "val_history": self.val_history, "stage_step": self.step}
            # the step number in the name orders checkpoints across stages
            ordinal = STAGES.index(self.stage_name) * 10**7 + self.step
            checkpoint.save_checkpoint(self.out / "checkpoints", ordinal, tensors, state, self.cfg.train.keep_last)
        if self.world > 1:
            dist.barrier()

    def _resume(self) -> None:
        records = checkpoint.checkpoints(self.out / "checkpoints")
        if not records:
            return
        tensors, state = checkpoint.load_checkpoint(records[-1])
        self.segmentor.load_state_dict(checkpoint.unprefixed(tensors, "segmentor."))
        self.head.load_state_dict(checkpoint.unprefixed(tensors, "head."))
        self.ema = {k: v.to(self.device) for k, v in checkpoint.unprefixed(tensors, "ema.").items()}
        names = [s.name for s in self.stages]
        self.index = names.index(state["stage"]) if state["stage"] in names else len(self.stages)
        self.step = state["stage_step"]
        self.val_history = state.get("val_history", [])
        if self.stage is not None:
            checkpoint.load_optimizer(self.stage.optimizer, tensors, state["optimizer"])
        self.resumed_from = (state["stage"], self.step, records[-1].name)

    def log(self, record: dict) -> None:
        if self.rank == 0:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    # -- loop --------------------------------------------------------------------------------
    def _run_stage(self, signals: _Signals) -> None:
        stage, cfg = self.stage, self.cfg
        if stage.finished():  # ended before an interruption
            return
        section = stage.section
        module = stage.start()
        if self.world > 1:
            module = nn.parallel.DistributedDataParallel(
                module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        accumulate = section.accumulate
        loader = train_batches(self.train_set, stage.data(cfg.data), mix_seed(cfg.seed, stage.stream), section.batch_size,
                               self.step * accumulate, section.iters * accumulate, self.rank, self.world, self.rcs)
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=stage.amp)
        progress = None
        if self.rank == 0 and cfg.train.progress:
            from tqdm import tqdm
            progress = tqdm(total=section.iters, initial=self.step, desc=f"{stage.name:9s}", dynamic_ncols=True)
        tick, seen, losses, micro = time.perf_counter(), 0, [], 0
        for host_images, labels in loader:
            images, labels = host_images.to(self.device), labels.to(self.device)
            torch.manual_seed(mix_seed(cfg.seed, stage.stream, self.step, micro, self.rank))
            last = micro == accumulate - 1
            sync = contextlib.nullcontext() if last or self.world == 1 else module.no_sync()
            inputs = stage.inputs(host_images, images, labels)
            with sync, amp:
                loss = module(*inputs)
                (loss / accumulate).backward()
            losses.append(loss.item())
            seen += len(images) * self.world
            micro += 1
            if not last:
                continue
            micro = 0
            lr = stages_mod.lr_at(self.step, section)
            for group in stage.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_mult", 1.0)
            stage.optimizer.step()
            stage.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            if self.step % cfg.train.log_interval == 0 or self.step == section.iters:
                self._log_interval(stage, losses, seen / (time.perf_counter() - tick), progress)
                tick, seen, losses = time.perf_counter(), 0, []
            if progress is not None:
                progress.update(1)
            stop = self._stop_everywhere(signals)
            ended = stage.after_step(self.step)
            if stop or ended or self.step % cfg.train.checkpoint_interval == 0:
                self.save()
            if stop:
                if progress is not None:
                    progress.close()
                raise Interrupted(f"{signals.caught or 'a signal on another rank'}: stopped in stage "
                                  f"{stage.name} at step {self.step}")
            if ended:
                break
        if progress is not None:
            progress.close()

    def _log_interval(self, stage, losses: list, samples_per_s: float, progress) -> None:
        record = {"stage": stage.name, "step": self.step, "loss": sum(losses) / len(losses),
                  "lr": stage.optimizer.param_groups[0]["lr"], "samples_per_s": samples_per_s, **stage.log()}
        self.log(record)
        if progress is not None:
            progress.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{samples_per_s:.1f}")

    def _stop_everywhere(self, signals: _Signals) -> bool:
        """Whether a signal stops the run; every rank stops at the same step when one is signalled."""
        stop = signals.caught is not None
        if self.world > 1:
            flag = torch.tensor([float(stop)], device=self.device)
            dist.all_reduce(flag)
            stop = flag.item() > 0
        return stop

    def run(self, until: str = "done") -> dict | None:
        """Train to the end and evaluate; ``until``: stop before that stage instead."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self.resumed_from and self.rank == 0:
            print(f"resumed from {self.resumed_from[2]}: stage {self.resumed_from[0]}, step {self.resumed_from[1]}")
        with _Signals() as signals:
            while self.stage is not None and STAGES.index(self.stage_name) < STAGES.index(until):
                self._run_stage(signals)
                self.index, self.step = self.index + 1, 0
                if self.stage is not None:
                    if self.stage.from_average:
                        self.head.load_trained(self.ema)
                    self.ema = self._fresh_ema()
                self.save()  # the stage boundary: a resumed run never repeats a finished stage
        if self.rank != 0 or until != "done":
            return None
        return self.evaluate()

    def evaluate(self) -> dict:
        """Write the run's model and evaluate its held-out split (OUT/eval.json, OUT/panels)."""
        cfg = self.cfg
        save_run(self.out, cfg, self.segmentor, self.head.state_dict(), self.ema)
        head = build_head(cfg, self.segmentor.feature_channels, False, self.segmentor.level_channels).to(self.device)
        head.load_trained(self.ema if cfg.eval.use_ema else self.head.state_dict())
        report = evaluation.evaluate(cfg, self.segmentor.eval(), head.eval(), self.val_set, self.out / "eval.json",
                                     self.out / "panels", cfg.eval.panels)
        print(evaluation.table(report, evaluation.data_name(cfg)))
        return report


def train(cfg, out: Path, resume: bool = False, until: str = "done") -> dict | None:
    """Run (or resume) the recipe; under torchrun, one process per rank (gloo on CPU, nccl on GPU).
    ``until="head"``: stop before the head stage (the checkpoint then holds the trained segmentor,
    and the prior of a head that has one)."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():
        backend = "nccl" if cfg.device == "cuda" else "gloo"
        dist.init_process_group(backend)
        if cfg.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    try:
        return Trainer(cfg, out, resume).run(until)
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()
