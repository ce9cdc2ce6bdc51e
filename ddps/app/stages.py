"""The stages of the training recipe, each an object built once from the config: what it trains,
its optimiser (AdamW), its batch, accumulation and LR schedule (warm-up included) from its config
section (``segmentor``, ``prior``, ``train``), its loss on a batch, and what it does after a step.
The trainer (``ddps.app.trainer``) drives them without knowing which it drives.

1. ``segmentor``: trains the segmentor (skipped with segmentor.checkpoint or iters 0); with
   segmentor.eval_interval it ends once its validation mIoU is flat.
2. ``prior``: a head with a mask prior of its own (GSS) trains it on the labels alone; other heads
   skip it.
3. ``head``: the segmentor frozen, the head trains on its features (and its own logits), under
   train.amp, with an exponential moving average of the head's state; a head that takes the
   backbone's levels (GSS's) trains the backbone with it instead.
4. ``decoder``: a head with a decoder trained on its predictions (GSS-FT-W) trains it, the rest
   frozen, starting from the head's average where eval.use_ema; other heads skip it.
"""
from __future__ import annotations

import dataclasses
import hashlib

import torch
from torch import nn

from . import evaluation

# The checkpoints' names order the stages by these positions ("done": the recipe is over).
STAGES = ("segmentor", "prior", "head", "decoder", "done")


def lr_at(step: int, section) -> float:
    """The LR of ``step`` of a stage (of a parameter group without an ``lr_mult``): mmcv's linear
    warm-up from lr * warmup_ratio over warmup_iters (null: min(50, iters // 10)) of its policy's
    LR, 'step' (x lr_gamma at each of lr_steps) or 'poly' (x (1 - step / iters) ** lr_power)."""
    warmup = section.warmup_iters if section.warmup_iters is not None else min(50, section.iters // 10)
    if section.lr_policy == "poly":
        lr = section.lr * (1 - step / section.iters) ** section.lr_power
    else:
        lr = section.lr * section.lr_gamma ** sum(step >= s for s in section.lr_steps)
    if step < warmup:
        lr *= 1 - (1 - step / warmup) * (1 - section.warmup_ratio)
    return lr


class Stage:
    """One stage of the recipe on the trainer's model (``trainer.segmentor``, ``trainer.head``).
    ``stream``: the id of its data order and noise draws, fixed so that a stage added to the
    recipe changes no other stage's draws."""

    name: str
    stream: int
    amp = False  # the loss under train.amp's autocast
    from_average = False  # the head starts the stage from the previous stage's moving average

    def __init__(self, trainer, section):
        self.trainer, self.section = trainer, section
        self.optimizer = torch.optim.AdamW(self.param_groups(), lr=section.lr, betas=tuple(section.betas),
                                           weight_decay=section.weight_decay) if self.active else None

    @property
    def active(self) -> bool:
        """Whether the recipe runs this stage at all."""
        return self.section.iters > 0

    def parameters(self) -> list:
        raise NotImplementedError

    def param_groups(self) -> list[dict]:
        """The optimiser's groups; a group's ``lr_mult`` scales the schedule's LR for it."""
        return [{"params": self.parameters()}]

    def start(self) -> nn.Module:
        """Set the model up for the stage; the module whose forward is the loss (DDP wraps it)."""
        raise NotImplementedError

    def inputs(self, host_images, images, labels) -> tuple:
        """The loss module's arguments for a batch (outside autocast)."""
        raise NotImplementedError

    def data(self, data):
        """The data section its training batches are drawn with (the config's ``data``)."""
        return data

    def after_step(self, step: int) -> bool:
        """After optimiser step ``step``; True ends the stage there."""
        return False

    def finished(self) -> bool:
        """The stage ended early before (a resume after it converged)."""
        return False

    def log(self) -> dict:
        return {}


class _Loss(nn.Module):
    """A loss as a module's forward, for DistributedDataParallel."""

    def __init__(self, owner: nn.Module, loss):
        super().__init__()
        self.owner, self.loss = owner, loss

    def forward(self, *inputs):
        return self.loss(*inputs)


class SegmentorStage(Stage):
    name, stream = "segmentor", 0

    def __init__(self, trainer):
        super().__init__(trainer, trainer.cfg.segmentor)

    @property
    def active(self) -> bool:
        return super().active and not self.section.checkpoint

    def parameters(self) -> list:
        # a frozen backbone (diffusion-features) never trains
        return [p for p in self.trainer.segmentor.parameters() if p.requires_grad]

    def param_groups(self) -> list[dict]:
        """segmentor.head_lr_mult != 1: the decode head and classifier in a group of their own
        (mmseg's paramwise lr_mult; DIFF's 10)."""
        mult, segmentor = self.section.head_lr_mult, self.trainer.segmentor
        if mult == 1:
            return super().param_groups()
        named = [(n, p) for n, p in segmentor.named_parameters() if p.requires_grad]
        head = [p for n, p in named if n.startswith(segmentor.decode_head_prefixes)]
        return [{"params": [p for n, p in named if not n.startswith(segmentor.decode_head_prefixes)]},
                {"params": head, "lr_mult": mult}]

    def start(self) -> nn.Module:
        segmentor, ignore = self.trainer.segmentor, self.trainer.ignore
        segmentor.train()
        return _Loss(segmentor, lambda images, labels: segmentor.loss(images, labels, ignore))

    def inputs(self, host_images, images, labels) -> tuple:
        return images, labels

    def after_step(self, step: int) -> bool:
        """Every segmentor.eval_interval steps: the validation mIoU, logged; True once the last
        segmentor.patience of them after the last of segmentor.lr_steps lie within segmentor.plateau
        points (every rank decides alike, from the same evaluation)."""
        s, t = self.section, self.trainer
        if not s.eval_interval or step % s.eval_interval:
            return False
        report = evaluation.evaluate(t.cfg, t.segmentor.eval(), None, t.val_set, others=False)
        t.segmentor.train()
        t.val_history.append(report["base"]["mIoU"])
        t.log({"stage": self.name, "step": step, "val_mIoU": t.val_history[-1]})
        return self.finished()

    def finished(self) -> bool:
        s = self.section
        if not s.eval_interval:
            return False
        # A flat stretch before the last learning-rate drop is a pause, not convergence (the
        # drop still gains points): only the evaluations after it count.
        last = self.trainer.val_history[max(s.lr_steps, default=0) // s.eval_interval:][-s.patience:]
        return len(last) == s.patience and max(last) - min(last) <= s.plateau


class _HeadStages(Stage):
    """The stages that train the head (or its prior) on a frozen segmentor."""

    def start(self) -> nn.Module:
        t = self.trainer
        t.segmentor.eval().requires_grad_(False)
        t.head.train()
        trainable = {id(p) for p in self.parameters()}
        for p in t.head.parameters():
            p.requires_grad_(id(p) in trainable)
        return _Loss(t.head, self.loss)


class PriorStage(_HeadStages):
    name, stream = "prior", 2

    def __init__(self, trainer):
        super().__init__(trainer, trainer.cfg.prior)

    @property
    def active(self) -> bool:
        return super().active and bool(self.parameters())

    def parameters(self) -> list:
        return self.trainer.head.prior_parameters()

    def loss(self, labels):
        return self.trainer.head.prior_loss(labels, self.trainer.ignore)

    def inputs(self, host_images, images, labels) -> tuple:
        return (labels,)


class HeadStage(_HeadStages):
    name, stream = "head", 1

    def __init__(self, trainer):
        super().__init__(trainer, trainer.cfg.train)
        self.amp = self.section.amp == "bf16"
        self.cache = None

    def parameters(self) -> list:
        t = self.trainer
        backbone = t.segmentor.backbone_parameters() if t.head.takes_levels else []
        return [*t.head.trainable_parameters(), *backbone]

    def start(self) -> nn.Module:
        t = self.trainer
        if self.section.cache_features:
            self.cache = FeatureCache(t.segmentor, t.device)
        module = super().start()
        if not t.head.takes_levels:
            return module
        t.segmentor.train()
        for p in t.segmentor.backbone_parameters():
            p.requires_grad_(True)
        return _Loss(nn.ModuleList([t.segmentor, t.head]), self.loss_end_to_end)

    def data(self, data):
        """With train.cache_features, the images without augmentation, so that they repeat (one
        output per image); the segmentor stage keeps data's augmentation."""
        if not self.section.cache_features:
            return data
        return dataclasses.replace(data, ratio_range=[1.0, 1.0], flip_prob=0.0, photometric=False)

    def loss(self, features, labels, base):
        return self.trainer.head.loss(features, labels, base, self.trainer.ignore)

    def loss_end_to_end(self, images, labels):
        t = self.trainer
        return t.head.loss(t.segmentor.levels(images), labels, None, t.ignore)

    def inputs(self, host_images, images, labels) -> tuple:
        if self.trainer.head.takes_levels:
            return images, labels
        with torch.no_grad():
            features, base = self.cache(host_images) if self.cache is not None else self.trainer.segmentor(images)
        return features, labels, base

    def after_step(self, step: int) -> bool:
        _average(self.trainer, step)
        return False

    def log(self) -> dict:
        # the share of images served from the cache since this process began the stage
        return {} if self.cache is None else {"cache_hit_rate": self.cache.hits / self.cache.served}


class DecoderStage(_HeadStages):
    name, stream = "decoder", 3

    def __init__(self, trainer):
        super().__init__(trainer, trainer.cfg.decoder)
        self.from_average = trainer.cfg.eval.use_ema

    @property
    def active(self) -> bool:
        return super().active and bool(self.parameters())

    def parameters(self) -> list:
        return self.trainer.head.decoder_parameters()

    def loss(self, cond, labels):
        return self.trainer.head.decoder_loss(cond, labels, None, self.trainer.ignore)

    def inputs(self, host_images, images, labels) -> tuple:
        t = self.trainer
        with torch.no_grad():
            cond = t.segmentor.levels(images) if t.head.takes_levels else t.segmentor(images)[0]
        return cond, labels

    def after_step(self, step: int) -> bool:
        _average(self.trainer, step)
        return False


def _average(trainer, step: int) -> None:
    """The head's exponential moving average, every train.ema_interval steps."""
    t = trainer.cfg.train
    if step % t.ema_interval == 0:
        with torch.no_grad():
            for key, value in trainer.head.averaged_state().items():
                if value.dtype.is_floating_point:
                    trainer.ema[key].mul_(1 - t.ema_momentum).add_(value.detach(), alpha=t.ema_momentum)
                else:  # a count (BatchNorm's batches seen): the latest
                    trainer.ema[key].copy_(value)


class FeatureCache:
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


def build(trainer) -> list[Stage]:
    """The stages the recipe runs for the trainer's config and model, in order."""
    stages = (SegmentorStage(trainer), PriorStage(trainer), HeadStage(trainer), DecoderStage(trainer))
    return [s for s in stages if s.active]
