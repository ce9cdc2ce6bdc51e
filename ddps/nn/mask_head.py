"""The protocol every mask head in ``ddps.nn`` follows (``DDPSHead``, ``RefinementHead``,
``GSSHead``), so that one training loop and one evaluation drive any of them without knowing
which: the head says what it trains, what it averages, how its weights load and under which name
its metrics go."""
from __future__ import annotations

import torch
from torch import nn


class MaskHead(nn.Module):
    """A mask prior on a segmentor's features.

    - ``sample(cond, base=None)``: cond [B, C, h, w] (and the segmentor's own logits ``base``
      [B, K', h, w], or None) -> (class scores [B, K, s * h, s * w] at the features' resolution or
      a multiple s of it, {step: scores} for each step the head collects);
    - ``loss(cond, labels, base=None, ignore_index=255)``: the training loss for labels [B, H, W] at
      the image's resolution;
    - ``trainable_parameters()``: what the head's training updates (the rest stays frozen);
    - ``prior_parameters()``, ``prior_loss(labels, ignore_index)``: a mask prior trained on labels
      alone before the head (none here: a training recipe then skips that stage);
    - ``decoder_parameters()``, ``decoder_loss(cond, labels, base, ignore_index)``: a decoder
      trained after the head on its predictions (none here: a recipe then skips that stage);
    - ``takes_levels``: whether ``cond`` is the segmentor's levels (a list, ``Segmentor.levels``)
      rather than its features, and the head trains the segmentor's backbone with its loss;
    - ``reconstruct(labels, ignore_index)``: the prior's round trip of true labels [B, H, W], whose
      agreement with them bounds what the head can reach (None for a head without a prior);
    - ``parts(cond)``: {name: class scores} of parts of the head that predict labels on their own
      (GSS's pixel branch), which an evaluation scores beside the head ({} here);
    - ``averaged_state()`` / ``load_trained(state)``: the tensors a moving average of the training
      keeps, and such a state (or the head's own) loaded back;
    - ``size_multiple``: what h and w must be multiples of;
    - ``metrics_name``: the name an evaluation files the head's metrics under.
    """

    metrics_name: str
    takes_levels = False
    # Buffers computed from the constructor's arguments, not trained (DDPS's schedule): neither
    # averaged nor taken from trained weights, so one head's weights serve another schedule.
    derived_buffers: tuple[str, ...] = ()

    def prior_parameters(self) -> list:
        return []

    def prior_loss(self, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no mask prior of its own to train")

    def decoder_parameters(self) -> list:
        return []

    def decoder_loss(self, cond, labels: torch.Tensor, base: torch.Tensor | None = None,
                     ignore_index: int = 255) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no decoder trained after it")

    def reconstruct(self, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor | None:
        return None

    def parts(self, cond) -> dict:
        return {}

    def averaged_state(self) -> dict:
        # the frozen parts are averaged too (they stay constant), so the average is a whole head
        return {k: v for k, v in self.state_dict().items() if k not in self.derived_buffers}

    def load_trained(self, state: dict) -> None:
        """Weights as ``state_dict`` or ``averaged_state`` gives them; anything else missing,
        unexpected or of another shape is a ValueError."""
        weights = {k: v for k, v in state.items() if k not in self.derived_buffers}
        try:
            missing, unexpected = self.load_state_dict(weights, strict=False)
        except RuntimeError as e:  # torch reports shape mismatches as RuntimeError
            raise ValueError(f"head weights do not fit this head: {e}") from None
        missing = [k for k in missing if k not in self.derived_buffers]
        if missing or unexpected:
            raise ValueError(f"head weights do not fit this head: missing {missing[:3]}, unexpected {unexpected[:3]}")
