"""Fused DDPS ops. Each takes ``backend=None`` (see ``ddps.backends()``); the samplers also take
``generator=None`` (the Philox seed is drawn from it: same generator state, same samples, on
every backend and for any thread count)."""
from .attention import attention
from .channel_layer_norm import channel_layer_norm
from .conv3x3 import conv3x3
from .group_norm_film_silu import group_norm_film_silu
from .linear_attention import linear_attention
from .maskige_decode import maskige_decode
from .p_posterior_sample import p_posterior_sample
from .posterior_log_probs import posterior_log_probs
from .q_posterior_sample import q_posterior_sample
from .q_sample import q_sample
from .qkv import attention_qkv, linear_attention_qkv
from .renoise import renoise

__all__ = ["attention", "attention_qkv", "channel_layer_norm", "conv3x3", "group_norm_film_silu", "linear_attention",
           "linear_attention_qkv", "maskige_decode", "p_posterior_sample", "posterior_log_probs", "q_posterior_sample",
           "q_sample", "renoise"]
