"""Drop-in modules: the DDPS denoiser and the mask heads (original state-dict keys), on the
protocol of ``MaskHead``."""
from .gss import GSSHead
from .head import DDPSHead, RefinementHead, inference_timesteps
from .mask_head import MaskHead
from .unet import Attention, LinearAttention, UNet
from .vq import MaskigeVQ

__all__ = ["Attention", "DDPSHead", "GSSHead", "LinearAttention", "MaskHead", "MaskigeVQ", "RefinementHead", "UNet",
           "inference_timesteps"]
