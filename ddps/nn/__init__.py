"""Drop-in modules of the DDPS denoiser and head (original state-dict keys)."""
from .head import DDPSHead, RefinementHead, inference_timesteps
from .unet import Attention, LinearAttention, UNet

__all__ = ["Attention", "DDPSHead", "LinearAttention", "RefinementHead", "UNet", "inference_timesteps"]
