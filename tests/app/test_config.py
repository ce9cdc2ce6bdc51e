import argparse
import re
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from ddps.app import cli, config
from helpers import ROOT

SHIPPED = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_validate(name):
    cfg = config.load(config.find(name), ["data.root=/data"])
    assert cfg.eval.collect_timesteps[-1] == cfg.eval.num_timesteps - 1


def test_train_help_lists_every_shipped_config():
    text = " ".join(cli.build_parser()._subparsers._group_actions[0].choices["train"].format_help().split())
    assert len(SHIPPED) >= 7 and [n for n in SHIPPED if f" {n}" not in text] == []


def test_a_folder_named_like_a_shipped_config_is_not_one(tmp_path, monkeypatch):
    # ddps train --out synthetic-bf16 ... from a folder that holds the run directory "synthetic"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "synthetic").mkdir()
    assert config.find("synthetic") == config.find("synthetic.yaml") != Path("synthetic")
    assert config.find("synthetic").is_file()
    (tmp_path / "mine.yaml").write_text("seed: 3\n")
    assert config.load(config.find("mine.yaml")).seed == 3  # a file in the working folder still is


def test_original_settings_in_ade20k_config():
    cfg = config.load(config.find("ade20k"), ["data.root=/data"])
    assert (cfg.head.num_timesteps, cfg.eval.num_timesteps, cfg.eval.inference_steps, cfg.eval.guidance_scale) == (100, 20, 2, 0.4)
    assert (cfg.train.lr, cfg.train.betas, cfg.train.weight_decay) == (1.5e-4, [0.9, 0.96], 0.045)
    assert (cfg.train.ema_momentum, cfg.train.ema_interval, cfg.head.dim, cfg.head.dim_mults) == (0.01, 25, 256, [1, 1, 1])


def test_overrides_are_typed():
    cfg = config.load(config.find("synthetic"), ["train.lr=1e-3", "head.dim_mults=[1, 2]", "train.amp=bf16",
                                                   "data.synthetic.num_val=3"])
    assert cfg.train.lr == 1e-3 and cfg.head.dim_mults == [1, 2] and cfg.train.amp == "bf16"
    assert cfg.data.synthetic.num_val == 3
    assert config.load(None, ["train.lr=1"]).train.lr == 1.0  # an int where a float is expected


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown config key train.lrr"),
    ("data.synthetic.sizes=3", "unknown config key data.synthetic.sizes"),
    ("nope.x=1", "unknown config key nope"),
    ("train.iters=abc", "train.iters: expected int, got str"),
    ("train.iters=true", "train.iters: expected int, got bool"),
    ("train.iters=0", "train.iters: must be >= 1"),
    ("head.dim_mults=3", "head.dim_mults: expected a list"),
    ("head.dim_mults=[1, x]", "head.dim_mults[1]: expected int"),
    ("eval.mode=fast", "eval.mode: 'fast' is not one of"),
    ("data.crop_size=[1, 2, 3]", "data.crop_size: expected 2 values"),
    ("data.dataset=folder", "data.root: dataset 'folder' needs its directory"),
    # DDPSHead's own rules, under the keys that give its arguments
    ("eval.collect_timesteps=[25]", "eval.collect_timesteps: collect_timesteps [25] are outside [0, num_timesteps=20)"),
    # synthetic: T = 20, steps 0, 10, 19 collected; with 3 inference steps 0, 6, 12, 18, 19 run.
    ("eval.inference_steps=3", "eval.collect_timesteps: collect_timesteps [10] are never visited: with "
                               "num_timesteps=20 and inference_steps=3 the steps that run are [0, 6, 12, 18, 19]"),
    ("eval.sampling=posterior", "eval.guidance_scale: guidance_scale=0.4 needs mode='renoise'"),
    ("head.dropout_ratio=1.5", "head.dropout_ratio: dropout_ratio=1.5 must lie in [0, 1)"),
    ("segmentor.warmup_iters=-1", "segmentor.warmup_iters: must be >= 0, got -1"),
    ("prior.betas=[0.9]", "prior.betas: expected 2 values"),
    ("head.kind=diffusion", "head.kind: 'diffusion' is not one of"),
    ("head.transition=gaussian", "head.transition: 'gaussian' is not one of"),
    ("head.noise_source=gt", "head.noise_source: 'gt' is not one of"),
    ("segmentor.type=segformer-mmseg", "segmentor.iters: a segformer-mmseg segmentor without a classifier"),
    ("segmentor.patience=0", "segmentor.patience: must be >= 1"),
    ("head.gss.palette=jitter", "head.gss.palette: 'jitter' is not one of"),
    ("head.gss.decoder=mlp", "head.gss.decoder: 'mlp' is not one of"),
    ("head.gss.depth=2", "unknown config key head.gss.depth"),
    ("prior.batch_size=0", "prior.batch_size: must be >= 1"),
    ("train", "is not key=value"),
    ("train=3", "train: expected a mapping"),
    # eval.datasets: each entry's keys named by its index
    ("eval.datasets=[3]", "eval.datasets[0]: expected dict, got int 3"),
    ("eval.datasets=[{name: ''}]", "eval.datasets[0].name: expected a non-empty string, got ''"),
    ("eval.datasets=[{bogus: 1}]", "unknown config key eval.datasets[0].bogus (known keys of eval.datasets[0]:"),
    ("eval.datasets=[{}, {synthetic: {domain: 2}}]", "eval.datasets[1].synthetic.domain: 2 is not one of (0, 1)"),
    ("eval.datasets=[{scale: [0, 8]}]", "eval.datasets[0].scale[0]: must be >= 1, got 0"),
    ("eval.datasets=[{dataset: gta5}]", "eval.datasets[0].root: dataset 'gta5' needs its directory"),
    ("eval.datasets=[{dataset: folder, root: x}]", "eval.datasets[0].num_classes: the folder dataset needs its number"),
    ("eval.datasets=[{dataset: bdd100k, root: x}]", "eval.datasets[0]: 'bdd100k' has 20 classes with ignore value 0, "
                                                    "the run's data 6 with 255"),
    ("eval.datasets=[{dataset: folder, root: x, num_classes: 6, ignore_index: 0}]",
     "eval.datasets[0]: 'folder' has 6 classes with ignore value 0, the run's data 6 with 255"),
    ("eval.datasets=[{name: a}, {name: a, synthetic: {domain: 1}}]", "eval.datasets[1].name: 'a' names another"),
])
def test_bad_config_names_the_key(override, message):
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        config.load(config.find("synthetic"), [override])


def test_eval_datasets_must_have_the_run_s_classes(tmp_path):
    run = ["data.dataset=folder", f"data.root={tmp_path}", "data.num_classes=3"]
    other = lambda keys: f"eval.datasets=[{{dataset: folder, root: {tmp_path}, {keys}}}]"  # noqa: E731
    cfg = config.load(None, [*run, other("num_classes: 3")])
    assert [(name, sub.data.num_classes) for name, sub in config.eval_datasets(cfg)] == [("folder", 3)]
    with pytest.raises(config.ConfigError) as e:
        config.load(None, [*run, other("num_classes: 4")])
    assert e.value.problems == ["eval.datasets[0]: 'folder' has 4 classes with ignore value 255, the run's data 3 "
                                "with 255: a model predicts the classes it was trained on"]
    with pytest.raises(config.ConfigError) as e:  # its own problem alone, not a class count of None besides
        config.load(None, [*run, other("num_classes: null")])
    assert e.value.problems == ["eval.datasets[0].num_classes: the folder dataset needs its number of classes"]


@pytest.mark.parametrize("overrides,message", [
    (["data.crop_size=[100, 100]"], "data.crop_size: [100, 100]: the gss head's VQ autoencoder trains on multiples of 8"),
    (["head.gss.codes=1"], "head.gss.codes: a codebook needs at least 2 codes, got 1"),
    (["prior.iters=-1"], "prior.iters: must be >= 0, got -1"),
    (["head.gss.prior=dalle"], "head.gss.dalle_weights: the dalle prior needs its weights"),
    (["head.gss.dalle_weights=w.safetensors"], "head.gss.dalle_weights: 'w.safetensors' is read only with "
                                               "head.gss.prior=dalle"),
    (["eval.use_ema=true"], "eval.use_ema: head.gss.conditioning=gss trains the backbone with the head"),
    (["train.cache_features=true", "data.photometric=false", "data.flip_prob=0"],
     "train.cache_features: head.gss.conditioning=gss trains the backbone"),
    (["segmentor.type=segformer-mmseg"], "head.gss.conditioning: gss fuses the backbone's levels, which "
                                         "segmentor.type segformer-mmseg does not give"),
    (["head.gss.swin=[3,2,7]"], "head.gss.swin: 3 heads do not divide the fused width 128"),
    (["head.gss.decoder_swin=[128,3,1,7]"], "head.gss.decoder_swin: 3 heads do not divide the width 128"),
    (["head.gss.palette=gss-cityscapes"], "head.gss.palette: the gss-cityscapes palette is for 19 classes, not 6 "
                                          "(dataset synthetic-shapes)"),
])
def test_bad_gss_config_names_the_key(overrides, message):
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        config.load(config.find("synthetic-gss"), overrides)


def test_bad_yaml_file(tmp_path):
    (tmp_path / "a.yaml").write_text("train:\n  iters: [\n")
    with pytest.raises(config.ConfigError, match="a.yaml is not valid YAML"):
        config.load(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("train:\n  warmup: 3\n")
    with pytest.raises(config.ConfigError, match="unknown config key train.warmup"):
        config.load(tmp_path / "b.yaml")
    with pytest.raises(config.ConfigError, match="cannot read config"):
        config.load(tmp_path / "missing.yaml")


@pytest.mark.parametrize("command", ["bench", "train", "eval", "frontier", "segment", "convert", "ablate", "demo"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main([command, "--help"])
    assert exit.value.code == 0 and f"usage: ddps {command}" in capsys.readouterr().out


def test_the_console_script_is_the_command_line():
    # `ddps` as pip installs it (beside this Python); `python -m ddps` is test_cli_config_error_exit_code's
    script = Path(sys.executable).parent / "ddps"
    out = subprocess.run([str(script), "train", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage: ddps train" in out.stdout, out.stderr


def test_help_is_plain_text():
    # The top-level description is the module docstring, written in reST; --help shows no markup.
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == {"bench", "train", "eval", "frontier", "segment", "convert", "ablate", "demo"}
    for p in (parser, *commands.values()):
        assert "``" not in p.format_help()


def test_reuse_freed_memory_leaves_user_settings(monkeypatch):
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "DDPS_REUSE_MEMORY"):
        monkeypatch.delenv(name, raising=False)
    assert cli.reuse_freed_memory() == (platform.libc_ver()[0] == "glibc")
    for name, value in (("DDPS_REUSE_MEMORY", "0"), ("MALLOC_MMAP_THRESHOLD_", "65536"), ("MALLOC_TRIM_THRESHOLD_", "1")):
        with monkeypatch.context() as m:
            m.setenv(name, value)
            assert not cli.reuse_freed_memory()


def test_commands_but_bench_reuse_freed_memory(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(cli, "reuse_freed_memory", lambda: calls.append(True))
    assert cli.main(["eval", "--run", str(tmp_path / "missing")]) == 2
    assert calls == [True]
    assert cli.main(["bench", "--cases", "no-such-case"]) == 2
    assert calls == [True]


def test_cli_config_error_exit_code(tmp_path):
    out = subprocess.run([sys.executable, "-m", "ddps", "train", "--config", "synthetic-smoke", "--out",
                          str(tmp_path / "r"), "train.bogus=1"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "unknown config key train.bogus" in out.stderr


def test_docs_cite_nothing_that_does_not_ship():
    # The SPEC they cited lives outside the repository; the checkpoint names are step-<stage * 10^7 + step>.
    from ddps.app.stages import STAGES
    pages = [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    assert [p.name for p in pages if "SPEC §" in p.read_text()] == []
    assert f"step-{STAGES.index('head') * 10**7 + 500:08d}" == "step-20000500"
    assert "`step-20000500` is step 500 of the head" in (ROOT / "docs" / "training.md").read_text()


def test_demo_names_a_mask_size_its_unet_cannot_halve(capsys):
    assert cli.main(["demo", "--size", "15"]) == 2
    assert "--size 15: the demo head's UNet halves the mask twice" in capsys.readouterr().err


def test_weights_without_a_segmentor_are_named(tmp_path):
    import yaml
    from ddps.app import checkpoint
    from ddps.app.model import load_run
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config.load(config.find("synthetic-smoke")).to_dict()))
    checkpoint.save_weights(tmp_path / "head.safetensors", {"head.x": __import__("torch").zeros(1)})
    with pytest.raises(ValueError, match=r"holds \['head'\] weights, not a run's whole model .* a head-only file"):
        load_run(tmp_path, weights=str(tmp_path / "head.safetensors"))
