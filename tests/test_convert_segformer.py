import pickle

import pytest
import torch

from ddps import checkpoint, config
from ddps.cli import _config_path, main
from ddps.model import build_head
from ddps.segmentors import SegFormerSegmentor


def smoke_head():
    cfg = config.load(_config_path("synthetic-smoke"))
    return cfg, build_head(cfg, 16, for_training=True)


def mmseg_checkpoint(head) -> dict:
    state = {"backbone.patch_embed1.proj.weight": torch.randn(4, 3, 7, 7),
             "decode_head.convs.0.conv.weight": torch.randn(8, 4, 1, 1)}
    for key, value in head.state_dict().items():
        state["decode_head." + key] = value.clone()
        if key.startswith(("unet.", "conv_seg_new.")):
            state["decode_head.ema_" + key.replace(".", "_")] = value.clone() + 1
    return {"state_dict": state, "meta": {"mmseg_version": "0.30.0", "iter": 160000}}


def test_convert_original_checkpoint(tmp_path, capsys):
    _, head = smoke_head()
    torch.save(mmseg_checkpoint(head), tmp_path / "orig.pth")
    rc = main(["convert", str(tmp_path / "orig.pth"), "--config", "synthetic-smoke", "--cond-channels", "16",
               "--out", str(tmp_path / "head.safetensors")])
    assert rc == 0
    assert "2 keys of other modules left out" in capsys.readouterr().out
    tensors = checkpoint.load_weights(tmp_path / "head.safetensors")
    for key, value in head.state_dict().items():
        assert torch.equal(tensors["head." + key], value), key
        if key.startswith("unet."):
            assert torch.equal(tensors["ema." + key], value + 1), key


def test_convert_refuses_unsafe_and_wrong_files(tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (print, ("unpickled!",))
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"state_dict": {"x": Payload()}}))
    args = ["--config", "synthetic-smoke", "--cond-channels", "16", "--out", str(tmp_path / "o.safetensors")]
    assert main(["convert", str(tmp_path / "evil.pth"), *args]) == 2
    captured = capsys.readouterr()
    assert "not loadable with torch.load(weights_only=True)" in captured.err and "unpickled!" not in captured.out
    assert "weights_only=False" not in captured.err  # torch's advice, not for a CLI user
    (tmp_path / "random.pth").write_bytes(bytes(range(256)) * 4)
    assert main(["convert", str(tmp_path / "random.pth"), *args]) == 2
    err = capsys.readouterr().err
    assert "not loadable" in err and "weights_only=False" not in err and "Traceback" not in err
    _, head = smoke_head()
    ckpt = mmseg_checkpoint(head)
    del ckpt["state_dict"]["decode_head.unet.init_conv.weight"]
    torch.save(ckpt, tmp_path / "partial.pth")
    assert main(["convert", str(tmp_path / "partial.pth"), *args]) == 2
    assert "decode_head.unet.init_conv.weight" in capsys.readouterr().err
    # a head of other sizes: the shapes do not fit the config
    torch.save(mmseg_checkpoint(head), tmp_path / "orig.pth")
    assert main(["convert", str(tmp_path / "orig.pth"), *args, "head.dim=32"]) == 2
    assert "size mismatch" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "missing.pth"), *args]) == 2
    assert not (tmp_path / "o.safetensors").exists()


def tiny_segformer_config(num_labels):
    transformers = pytest.importorskip("transformers")
    return transformers.SegformerConfig(num_channels=3, num_encoder_blocks=4, depths=[1, 1, 1, 1],
                                        sr_ratios=[8, 4, 2, 1], hidden_sizes=[8, 16, 24, 32],
                                        num_attention_heads=[1, 1, 1, 1], decoder_hidden_size=24, num_labels=num_labels)


def test_segformer_adapter_gives_fused_features(tmp_path):
    seg = SegFormerSegmentor(5, config=tiny_segformer_config(5)).eval()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    features, logits = seg(images)
    assert features.shape == (2, 24, 16, 16) and logits.shape == (2, 5, 16, 16)
    assert (features >= 0).all()  # after the decode head's ReLU
    # the logits are the classifier applied to exactly these features
    torch.testing.assert_close(seg.model.decode_head.classifier(features), logits)
    # a checkpoint with one label fewer keeps its classifier; class 0 ("other") gets a low logit
    seg.model.save_pretrained(tmp_path / "sf")
    other = SegFormerSegmentor(6, pretrained=str(tmp_path / "sf")).eval()
    f2, l2 = other(images)
    assert l2.shape == (2, 6, 16, 16) and (l2[:, 0] == -1e4).all()
    torch.testing.assert_close(l2[:, 1:], logits)
    torch.testing.assert_close(f2, features)


def test_convert_reads_no_dataset(tmp_path, capsys):
    # The README's command: the ade20k config names no data.root, which convert never reads.
    assert main(["convert", str(tmp_path / "missing.pth"), "--config", "ade20k", "--out", str(tmp_path / "o.st")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "data.root" not in err
