"""The two-stage recipe (SPEC §6): (1) train the segmentor (or load it), (2) freeze it and train the
DDPS head with diffusion on first prediction, then evaluate on the held-out split.

Resumability: a checkpoint holds the segmentor, the head, its EMA and the optimiser, plus the
stage and step. The data of a step is a function of (seed, step) (see ``ddps.data``) and the
global RNG is seeded from (seed, stage, step, rank) before every step, so the LR schedule, the
data and the random draws of a resumed run continue exactly where the checkpoint left them.
Ctrl-C (SIGINT) or SIGTERM finishes the current step, writes a checkpoint and exits with 130.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from . import checkpoint, evaluation
from .data import build_dataset, mix_seed, train_batches
from .model import build_head, dataset_classes, load_head_weights, save_run
from .nn.head import SCHEDULE_BUFFERS
from .segmentors import build_segmentor

STAGES = ("segmentor", "prior", "head", "done")
# Each stage's stream of data order and noise: fixed ids, so that a stage added to the recipe
# changes no other stage's draws.
STREAMS = {"segmentor": 0, "head": 1, "prior": 2}


class Interrupted(Exception):
    pass


def lr_at(step: int, base: float, warmup_iters: int, warmup_ratio: float, lr_steps, gamma: float) -> float:
    """Linear warmup from base * warmup_ratio, then a step schedule (mmcv's 'step' policy)."""
    lr = base * gamma ** sum(step >= s for s in lr_steps)
    if step < warmup_iters:
        lr *= 1 - (1 - step / warmup_iters) * (1 - warmup_ratio)
    return lr


class _HeadLoss(nn.Module):
    """The head's training loss as one module's forward, for DDP: ``head.loss`` (head stage) or
    ``head.prior_loss`` (prior stage, labels only)."""

    def __init__(self, head, ignore_index: int, prior: bool):
        super().__init__()
        self.head, self.ignore, self.prior = head, ignore_index, prior

    def forward(self, features, labels, base):
        if self.prior:
            return self.head.prior_loss(labels, self.ignore)
        return self.head.loss(features, labels, base, self.ignore)


class _SegmentorLoss(nn.Module):
    def __init__(self, segmentor, ignore_index: int):
        super().__init__()
        self.segmentor, self.ignore = segmentor, ignore_index

    def forward(self, images, labels):
        return self.segmentor.loss(images, labels, self.ignore)


class _FeatureCache:
    """The frozen segmentor's outputs per training image (train.cache_features), keyed by the
    image's bytes, so that an expensive segmentor (diffusion-features) runs once per image in the
    head stage. Each image's outputs are computed alone (a batch of one), so they are a function of
    the image, not of the batch it first came in: a resumed run, which starts with an empty cache,
    trains bitwise as the uninterrupted one. Takes the loader's images, on the CPU, so that keying
    them copies nothing back from the device; kept on the CPU."""

    def __init__(self, segmentor, device: torch.device):
        self.segmentor, self.device, self.store, self.hits, self.served = segmentor, device, {}, 0, 0

    def __call__(self, images: torch.Tensor):
        keys = [hashlib.blake2b(image.numpy().tobytes(), digest_size=16).digest() for image in images]
        self.served += len(keys)
        for image, key in zip(images, keys):
            if key in self.store:
                self.hits += 1
            else:
                features, base = self.segmentor(image[None].to(self.device))
                self.store[key] = (features[0].cpu(), None if base is None else base[0].cpu())
        features, base = zip(*(self.store[k] for k in keys))
        base = None if base[0] is None else torch.stack(base).to(self.device)
        return torch.stack(features).to(self.device), base


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
        self.k, self.ignore = dataset_classes(cfg)
        torch.manual_seed(cfg.seed)  # initial weights
        self.segmentor = build_segmentor(cfg, self.k).to(self.device)
        if cfg.segmentor.checkpoint:
            state = checkpoint.unprefixed(checkpoint.load_weights(cfg.segmentor.checkpoint), "segmentor.")
            self.segmentor.load_state_dict(state)
        self.head = build_head(cfg, self.segmentor.feature_channels, for_training=True).to(self.device)
        self.ema = {k: v.detach().clone() for k, v in self._ema_source().items()}
        trains_segmentor = cfg.segmentor.iters > 0 and not cfg.segmentor.checkpoint
        self.stage = "segmentor" if trains_segmentor else self._after("segmentor")
        self.step = 0
        self.val_history = []  # the segmentor's validation mIoUs (segmentor.eval_interval)
        self.optimizer = self._optimizer()
        self.resumed_from = None
        if resume:
            self._resume()

    # -- state -------------------------------------------------------------------------------
    def _ema_source(self) -> dict:
        # the frozen embedding is averaged too (it stays constant), so the EMA is a complete head
        return {k: v for k, v in self.head.state_dict().items() if k not in SCHEDULE_BUFFERS}

    def _after(self, stage: str) -> str:
        """The stage that follows ``stage``; the prior stage only for a head that has a prior to train."""
        following = STAGES[STAGES.index(stage) + 1]
        if following == "prior" and not (self.head.prior_parameters() and self.cfg.prior.iters > 0):
            return self._after(following)
        return following

    def _trainable(self):
        if self.stage == "segmentor":  # a frozen backbone (diffusion-features) never trains
            return [p for p in self.segmentor.parameters() if p.requires_grad]
        if self.stage == "prior":
            return self.head.prior_parameters()
        return self.head.trainable_parameters()

    def _optimizer(self):
        params = self._trainable()
        if self.stage == "segmentor":
            s = self.cfg.segmentor
            return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
        if self.stage == "prior":
            return torch.optim.AdamW(params, lr=self.cfg.prior.lr)
        t = self.cfg.train
        return torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)

    def _state_tensors(self) -> tuple[dict, dict]:
        optim_tensors, optim_structure = checkpoint.optimizer_tensors(self.optimizer)
        tensors = {**checkpoint.prefixed(self.segmentor.state_dict(), "segmentor."),
                   **checkpoint.prefixed(self.head.state_dict(), "head."),
                   **checkpoint.prefixed(self.ema, "ema."), **optim_tensors}
        return tensors, {"stage": self.stage, "optimizer": optim_structure, "config": self.cfg.to_dict(),
                         "val_history": self.val_history}

    def save(self) -> None:
        if self.rank == 0:
            tensors, state = self._state_tensors()
            # the step number in the name orders checkpoints across stages
            ordinal = STAGES.index(self.stage) * 10**7 + self.step
            checkpoint.save_checkpoint(self.out / "checkpoints", ordinal, tensors,
                                       {**state, "stage_step": self.step}, self.cfg.train.keep_last)
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
        self.stage, self.step = state["stage"], state["stage_step"]
        self.val_history = state.get("val_history", [])
        if self.stage != "done":
            self.optimizer = self._optimizer()
            checkpoint.load_optimizer(self.optimizer, tensors, state["optimizer"])
        self.resumed_from = (self.stage, self.step, records[-1].name)

    # -- loop --------------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        if self.rank == 0:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _run_stage(self, signals: _Signals) -> None:
        cfg = self.cfg
        if self.stage == "segmentor" and self._flat():  # converged before an interruption
            return
        if self.stage == "segmentor":
            s = cfg.segmentor
            iters, batch, accumulate = s.iters, s.batch_size, 1
            lr_args = (s.lr, min(50, s.iters // 10), 0.1, s.lr_steps, 0.1)
            module = _SegmentorLoss(self.segmentor, self.ignore)
            self.segmentor.train()
        else:
            if self.stage == "prior":
                p = cfg.prior
                iters, batch, accumulate = p.iters, p.batch_size, 1
                lr_args = (p.lr, min(50, p.iters // 10), 0.1, [], 0.1)
            else:
                t = cfg.train
                iters, batch, accumulate = t.iters, t.batch_size, t.accumulate
                lr_args = (t.lr, t.warmup_iters, t.warmup_ratio, t.lr_steps, t.lr_gamma)
            self.segmentor.eval().requires_grad_(False)
            self.head.train()
            trainable = {id(p) for p in self._trainable()}
            for p in self.head.parameters():
                p.requires_grad_(id(p) in trainable)
            module = _HeadLoss(self.head, self.ignore, prior=self.stage == "prior")
        if self.world > 1:
            module = nn.parallel.DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        stage_id = STREAMS[self.stage]
        loader = train_batches(self.train_set, cfg.data, mix_seed(cfg.seed, stage_id), batch,
                               self.step * accumulate, iters * accumulate, self.rank, self.world)
        # train.amp is the head stage's (as train.accumulate): the head's forward and backward run
        # under autocast, not the frozen segmentor's forward, nor the other stages.
        amp = torch.autocast(self.device.type, dtype=torch.bfloat16,
                             enabled=cfg.train.amp == "bf16" and self.stage == "head")
        progress = None
        if self.rank == 0 and cfg.train.progress:
            from tqdm import tqdm
            progress = tqdm(total=iters, initial=self.step, desc=f"{self.stage:9s}", dynamic_ncols=True)
        tick, seen, losses = time.perf_counter(), 0, []
        micro = 0
        cache = None
        if self.stage == "head" and cfg.train.cache_features:
            cache = _FeatureCache(self.segmentor, self.device)
        for host_images, labels in loader:
            images, labels = host_images.to(self.device), labels.to(self.device)
            torch.manual_seed(mix_seed(cfg.seed, stage_id, self.step, micro, self.rank))
            last = micro == accumulate - 1
            sync = contextlib.nullcontext() if last or self.world == 1 else module.no_sync()
            if self.stage == "head":
                with torch.no_grad():
                    features, base = cache(host_images) if cache is not None else self.segmentor(images)
            with sync, amp:
                if self.stage == "head":
                    loss = module(features, labels, base)
                elif self.stage == "prior":
                    loss = module(None, labels, None)
                else:
                    loss = module(images, labels)
                (loss / accumulate).backward()
            losses.append(loss.item())
            seen += len(images) * self.world
            micro += 1
            if not last:
                continue
            micro = 0
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(self.step, *lr_args)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            if self.stage == "head" and self.step % cfg.train.ema_interval == 0:
                m = cfg.train.ema_momentum
                with torch.no_grad():
                    for key, value in self._ema_source().items():
                        self.ema[key].mul_(1 - m).add_(value.detach(), alpha=m)
            if self.step % cfg.train.log_interval == 0 or self.step == iters:
                elapsed = time.perf_counter() - tick
                record = {"stage": self.stage, "step": self.step, "loss": sum(losses) / len(losses),
                          "lr": self.optimizer.param_groups[0]["lr"], "samples_per_s": seen / elapsed}
                # the share of images served from the cache since this process began the stage
                if cache is not None:
                    record["cache_hit_rate"] = cache.hits / cache.served
                self._log(record)
                tick, seen, losses = time.perf_counter(), 0, []
                if progress is not None:
                    progress.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.1f}")
            if progress is not None:
                progress.update(1)
            stop = signals.caught is not None
            if self.world > 1:  # every rank stops at the same step when one of them is signalled
                flag = torch.tensor([float(stop)], device=self.device)
                dist.all_reduce(flag)
                stop = flag.item() > 0
            converged = self.stage == "segmentor" and self._segmentor_converged()
            if stop or converged or self.step % cfg.train.checkpoint_interval == 0:
                self.save()
            if stop:
                if progress is not None:
                    progress.close()
                raise Interrupted(f"{signals.caught or 'a signal on another rank'}: stopped in stage "
                                  f"{self.stage} at step {self.step}")
            if converged:
                break
        if progress is not None:
            progress.close()

    def _segmentor_converged(self) -> bool:
        """Every segmentor.eval_interval steps: the validation mIoU, logged; True once the last
        segmentor.patience of them after the last of segmentor.lr_steps lie within segmentor.plateau
        points (every rank decides alike, from the same evaluation)."""
        s = self.cfg.segmentor
        if not s.eval_interval or self.step % s.eval_interval:
            return False
        report = evaluation.evaluate(self.cfg, self.segmentor.eval(), None, self.val_set)
        self.segmentor.train()
        self.val_history.append(report["base"]["mIoU"])
        self._log({"stage": "segmentor", "step": self.step, "val_mIoU": self.val_history[-1]})
        return self._flat()

    def _flat(self) -> bool:
        s = self.cfg.segmentor
        if not s.eval_interval:
            return False
        # A flat stretch before the last learning-rate drop is a pause, not convergence (the
        # drop still gains points): only the evaluations after it count.
        last = self.val_history[max(s.lr_steps, default=0) // s.eval_interval:][-s.patience:]
        return len(last) == s.patience and max(last) - min(last) <= s.plateau

    def run(self, until: str = "done") -> dict | None:
        self.out.mkdir(parents=True, exist_ok=True)
        if self.resumed_from and self.rank == 0:
            print(f"resumed from {self.resumed_from[2]}: stage {self.resumed_from[0]}, step {self.resumed_from[1]}")
        with _Signals() as signals:
            while self.stage != until:
                self._run_stage(signals)
                self.stage = self._after(self.stage)
                self.step = 0
                if self.stage != "done":
                    self.optimizer = self._optimizer()
                    self.ema = {k: v.detach().clone() for k, v in self._ema_source().items()}
                self.save()  # the stage boundary: a resumed run never repeats a finished stage
        if self.rank != 0 or until != "done":
            return None
        save_run(self.out, self.cfg, self.segmentor, self.head.state_dict(), self.ema)
        head = build_head(self.cfg, self.segmentor.feature_channels, for_training=False).to(self.device)
        load_head_weights(head, self.ema if self.cfg.eval.use_ema else self.head.state_dict())
        report = evaluation.evaluate(self.cfg, self.segmentor.eval(), head.eval(), self.val_set,
                                     self.out / "eval.json", self.out / "panels", self.cfg.eval.panels)
        print(evaluation.table(report, self.cfg.head.kind))
        return report


def train(cfg, out: Path, resume: bool = False, until: str = "done") -> dict | None:
    """Run (or resume) the recipe; under torchrun, one process per rank (gloo on CPU, nccl on GPU).
    ``until="head"``: stop after the segmentor stage (its checkpoint holds the trained segmentor)."""
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
