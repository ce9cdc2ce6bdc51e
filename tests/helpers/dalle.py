"""DALL-E's dVAE in tests: a small one with random weights, and its weights saved the way the
released encoder.pkl and decoder.pkl are (pickled dall_e modules), without the dall_e package."""
import sys
import types

import torch
from torch import nn

from ddps.nn import dvae


def small_dvae(seed: int = 0) -> dvae.DalleDVAE:
    torch.manual_seed(seed)
    model = dvae.DalleDVAE(codes=16, hidden=8, blocks_per_group=1, decoder_input=4)
    for p in model.parameters():  # nonzero biases, so a dropped bias changes results
        p.data.normal_(0, 0.3)
    return model.eval()


def released_pickles(model, tmp_path, monkeypatch):
    """The small model saved as DALL-E's files are: pickled dall_e modules whose convolutions hold
    their weights as ``w`` and ``b``."""
    package = {name: types.ModuleType(name) for name in ("dall_e", "dall_e.utils", "dall_e.encoder", "dall_e.decoder")}

    def make(module_name, name):
        cls = type(name, (nn.Module,), {"__module__": module_name})
        setattr(package[module_name], name, cls)
        return cls
    Conv = make("dall_e.utils", "Conv2d")
    kinds = {"encoder": (make("dall_e.encoder", "Encoder"), make("dall_e.encoder", "EncoderBlock")),
             "decoder": (make("dall_e.decoder", "Decoder"), make("dall_e.decoder", "DecoderBlock"))}
    for name, module in package.items():
        monkeypatch.setitem(sys.modules, name, module)

    def released(module, block_cls):
        if isinstance(module, nn.Conv2d):
            conv = Conv()
            conv.w, conv.b = nn.Parameter(module.weight.detach().clone()), nn.Parameter(module.bias.detach().clone())
            conv.kw = module.kernel_size[0]
            return conv
        copy = block_cls() if isinstance(module, dvae._Block) else type(module).__new__(type(module))
        if not isinstance(module, dvae._Block):
            copy.__dict__.update({k: v for k, v in module.__dict__.items() if k != "_modules"})
            copy._modules = {}
        else:
            copy.post_gain = module.post_gain
        for child_name, child in module.named_children():
            copy.add_module(child_name, released(child, block_cls))
        return copy
    paths = []
    for part in ("encoder", "decoder"):
        top_cls, block_cls = kinds[part]
        top = top_cls()
        top.blocks = released(getattr(model, part).blocks, block_cls)
        paths.append(tmp_path / f"{part}.pkl")
        torch.save(top, paths[-1])
    for name in package:
        monkeypatch.delitem(sys.modules, name)  # reading them back needs no dall_e package
    return paths
