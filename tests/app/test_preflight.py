"""Everything a command needs is checked before it works: config values against what they mean,
the device, pretrained sources, every file of the splits it reads and every path it writes. Each
problem is one line naming the key or the file, exit status 2, no traceback, nothing written; a
run folder belongs to one process (ddps.app.runlock)."""
import fcntl
import json
import os
import re
import threading

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ddps.app import config, evaluation, model, preflight, trainer
from ddps.app.cli import main
from ddps.app.runlock import RunLock
from helpers.app import run_cli, start

SMOKE = ["--config", "synthetic-smoke"]
TINY = ["segmentor.iters=2", "train.iters=2", "eval.panels=0"]
# a device this machine does not have
ABSENT = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("preflight") / "run"
    assert main(["train", *SMOKE, "--out", str(out), *TINY]) == 0
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(out.parent / "image.png")
    return out


@pytest.fixture
def nothing_works(monkeypatch):
    """Training or evaluating at all is a failure of the test: the checks come first."""
    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the input was checked")
    monkeypatch.setattr(trainer, "train", forbidden)
    monkeypatch.setattr(evaluation, "evaluate", forbidden)


def _refused(result, *messages):
    """Exit status 2, each message on a line of its own, and no traceback."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert "Traceback" not in result.stderr
    for message in messages:
        assert any(message in line for line in lines), (message, result.stderr)
    return lines


@pytest.mark.parametrize("override,message", [
    ("train.lr=-1", "train.lr: must be > 0, got -1.0"),
    ("train.lr=.nan", "train.lr: must be a finite number, got nan"),
    ("train.betas=[2,3]", "train.betas[0]: must be in [0, 1), got 2.0"),
    ("segmentor.lr=-1", "segmentor.lr: must be > 0, got -1.0"),
    ("prior.weight_decay=-0.1", "prior.weight_decay: must be >= 0, got -0.1"),
    ("train.ema_momentum=5", "train.ema_momentum: must be in [0, 1], got 5.0"),
    ("train.warmup_iters=-3", "train.warmup_iters: must be >= 0, got -3"),
    ("train.warmup_ratio=2", "train.warmup_ratio: must be in [0, 1], got 2.0"),
    ("train.lr_gamma=0", "train.lr_gamma: must be > 0, got 0.0"),
    ("data.flip_prob=3", "data.flip_prob: must be in [0, 1], got 3.0"),
    ("data.ratio_range=[2,1]", "data.ratio_range: [low, high] with low <= high, got [2.0, 1.0]"),
    ("eval.scales=[0,1]", "eval.scales[0]: must be > 0, got 0.0"),
    ("eval.guidance_scale=.inf", "eval.guidance_scale: must be a finite number, got inf"),
])
def test_a_bad_value_is_refused_before_any_work(capsys, tmp_path, nothing_works, override, message):
    _refused(run_cli(capsys, "train", *SMOKE, "--out", tmp_path / "r", override), f"ddps train: error: {message}")
    assert not (tmp_path / "r").exists()


def test_every_bad_value_at_once(capsys, tmp_path, nothing_works):
    lines = _refused(run_cli(capsys, "train", *SMOKE, "--out", tmp_path / "r", "train.lr=-1", "segmentor.lr=-1",
                             "train.ema_momentum=5"))
    assert lines == ["ddps train: error: segmentor.lr: must be > 0, got -1.0",
                     "ddps train: error: train.lr: must be > 0, got -1.0",
                     "ddps train: error: train.ema_momentum: must be in [0, 1], got 5.0"]


@pytest.mark.parametrize("device,message", [(ABSENT, f"device: '{ABSENT}', but"),
                                            ("tpu", "device: 'tpu' is not a torch device")])
def test_an_absent_device_is_one_line(capsys, tmp_path, run, nothing_works, device, message):
    for command in (["train", *SMOKE, "--out", tmp_path / "r"], ["eval", "--run", run],
                    ["segment", "--run", run, "--out", tmp_path / "s", run.parent / "image.png"]):
        lines = _refused(run_cli(capsys, *command, f"device={device}"), message)
        assert len(lines) == 1, lines
    assert not (tmp_path / "r").exists() and not (tmp_path / "s").exists()


def test_unreachable_pretrained_sources(capsys, tmp_path, monkeypatch, nothing_works):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as a machine without a connection
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    empty = tmp_path / "empty"
    empty.mkdir()
    for kind in ("segformer", "diffusion-features"):
        for source, message in [(tmp_path / "missing" / "model", f"the folder {tmp_path}/missing/model does not exist"),
                                (empty, f"{empty} is not a model folder (no "),
                                ("someone/no-such-model", "no folder someone/no-such-model, and the Hugging Face hub")]:
            lines = _refused(run_cli(capsys, "train", *SMOKE, "--out", tmp_path / "r", f"segmentor.type={kind}",
                                     f"segmentor.pretrained={source}"), f"segmentor.pretrained: {message}")
            assert len(lines) == 1, lines
    weights = tmp_path / "w.safetensors"
    _refused(run_cli(capsys, "train", *SMOKE, "--out", tmp_path / "r", f"segmentor.checkpoint={weights}"),
             f"segmentor.checkpoint: {weights} does not exist")
    weights.write_bytes(b"not safetensors")
    _refused(run_cli(capsys, "train", *SMOKE, "--out", tmp_path / "r", f"segmentor.checkpoint={weights}"),
             f"segmentor.checkpoint: {weights} is not a safetensors file")
    _refused(run_cli(capsys, "train", "--config", "synthetic-gss", "--out", tmp_path / "r", "head.gss.prior=dalle",
                     f"head.gss.dalle_weights={tmp_path}/dvae.safetensors"),
             f"head.gss.dalle_weights: {tmp_path}/dvae.safetensors does not exist")


def _folder_dataset(root):
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for name in ("a", "b"):
            Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(root / "images" / split / f"{name}.png")
            Image.fromarray(np.ones((64, 64), np.uint8)).save(root / "masks" / split / f"{name}.png")
    return [f"data.root={root}", "data.dataset=folder", "data.num_classes=3"]


def test_every_file_of_every_split_is_checked_first(capsys, tmp_path, nothing_works):
    data = _folder_dataset(tmp_path / "data")
    masks = tmp_path / "data" / "masks"
    whole = (masks / "validation" / "b.png").read_bytes()
    (masks / "validation" / "b.png").write_bytes(whole[: len(whole) // 2])  # truncated: the header still reads
    (masks / "validation" / "a.png").write_bytes(b"garbage")
    Image.fromarray(np.ones((32, 64), np.uint8)).save(masks / "training" / "a.png")
    Image.fromarray(np.ones((64, 64, 3), np.uint8)).save(masks / "training" / "b.png")
    lines = _refused(run_cli(capsys, "train", *SMOKE, "--out", tmp_path / "r", *data),
                     f"{masks}/validation/a.png: cannot read mask", f"{masks}/validation/b.png: cannot read mask",
                     f"{masks}/training/a.png: mask size 64x32 differs from image",
                     f"{masks}/training/b.png: a mask must be a single-channel or palette image, got mode RGB")
    assert len(lines) == 4 and not (tmp_path / "r").exists()


def test_eval_datasets_files_are_checked_and_each_reported(capsys, tmp_path, run):
    _folder_dataset(tmp_path / "data")
    (tmp_path / "data" / "masks" / "validation" / "b.png").write_bytes(b"garbage")
    bad = f"eval.datasets[0] (folder): {tmp_path}/data/masks/validation/b.png: cannot read mask"
    other = lambda k: f"eval.datasets=[{{dataset: folder, root: {tmp_path / 'data'}, num_classes: {k}}}]"  # noqa: E731
    _refused(run_cli(capsys, "eval", "--run", run, other(6)), bad)
    # with the run's own files' problems: all of them
    own = _folder_dataset(tmp_path / "own")
    (tmp_path / "own" / "masks" / "validation" / "a.png").write_bytes(b"garbage")
    lines = _refused(run_cli(capsys, "train", *SMOKE, "--out", tmp_path / "r", *TINY, *own, other(3)), bad,
                     f"{tmp_path}/own/masks/validation/a.png: cannot read mask")
    assert len(lines) == 2 and not (tmp_path / "r").exists()
    # a run trained without them, evaluated on another domain as well: a row each, and in eval.json
    out = tmp_path / "eval.json"
    result = run_cli(capsys, "eval", "--run", run, "--json", out, "--limit", "1",
                     "eval.datasets=[{name: shifted, synthetic: {domain: 1}}]")
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert set(report["datasets"]) == {"shifted"} and report["datasets"]["shifted"]["ddps"]["final"]["mIoU"] >= 0
    rows = result.stdout.split("mIoU / mBIoU")[1].splitlines()[1:3]
    assert [row.split()[0] for row in rows] == ["synthetic-shapes", "shifted"]
    assert rows[1].split()[1] == f"{report['datasets']['shifted']['base']['mIoU']:.2f}"


def test_output_paths_are_checked_first(capsys, tmp_path, run, nothing_works):
    afile = tmp_path / "afile"
    afile.write_text("")
    for command in (["train", *SMOKE, "--out"], ["segment", "--run", run, run.parent / "image.png", "--out"],
                    ["ablate", *SMOKE, "--out"]):
        _refused(run_cli(capsys, *command, afile / "sub"), f"{afile} is a file, so nothing can be created under it")
        _refused(run_cli(capsys, *command, afile), f"--out {afile}: a file is there, not a directory")
    _refused(run_cli(capsys, "eval", "--run", run, "--json", tmp_path), f"--json {tmp_path}: is a directory")
    _refused(run_cli(capsys, "eval", "--run", run, "--panels", afile), f"--panels {afile}: a file is there")
    _refused(run_cli(capsys, "eval", "--run", tmp_path), f"{tmp_path} is not a ddps run directory")


def test_an_output_folder_must_be_writable(tmp_path, monkeypatch):
    # (root may write anywhere, so the machine's answer is replaced by a read-only one)
    monkeypatch.setattr(preflight.os, "access", lambda path, mode: mode != os.W_OK | os.X_OK)
    assert preflight.output_problems(tmp_path / "new" / "run", "--out", "dir") == [
        f"--out {tmp_path}/new/run: {tmp_path} is not writable"]
    assert preflight.output_problems(tmp_path / "eval.json", "--json", "file") == [
        f"--json {tmp_path}/eval.json: {tmp_path} is not writable"]


def test_eval_json_in_a_new_folder_keeps_the_results(capsys, tmp_path, run):
    out = tmp_path / "new" / "folder" / "eval.json"
    assert run_cli(capsys, "eval", "--run", run, "--json", out, "--limit", "1").returncode == 0
    assert "mIoU" in out.read_text()


def test_a_trained_run_keeps_what_shaped_it(capsys, tmp_path, run, nothing_works):
    lines = _refused(run_cli(capsys, "eval", "--run", run, "head.dim=64"),
                     f"head.dim: 16 -> 64: {run} was trained with the old value")
    assert len(lines) == 1  # not a state dict's size mismatches
    _refused(run_cli(capsys, "segment", "--run", run, "--out", tmp_path / "s", run.parent / "image.png",
                     "head.dim_mults=[1]"), "head.dim_mults: [1, 2] -> [1]")
    _refused(run_cli(capsys, "eval", "--run", run, "train.lr=0.1"), "train.lr: 0.0005 -> 0.1")


def test_a_gss_ftw_run_may_be_decoded_by_nearest_colour_and_nothing_else(tmp_path):
    def stored(decoder):
        run = tmp_path / decoder
        run.mkdir()
        cfg = config.load(config.find("synthetic-smoke"), ["head.kind=gss", f"head.gss.decoder={decoder}",
                                                            "eval.use_ema=false"])
        (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
        return run

    learned, nearest = stored("learned"), stored("nearest")
    assert model.run_config(learned, ["head.gss.decoder=nearest"]).head.gss.decoder == "nearest"
    with pytest.raises(config.ConfigError, match=f"head.gss.decoder: 'nearest' -> 'learned': {nearest} was trained"):
        model.run_config(nearest, ["head.gss.decoder=learned"])
    with pytest.raises(config.ConfigError, match="head.gss.codes: 256 -> 16: .* and head.gss.decoder from learned to "
                                                 "nearest"):
        model.run_config(learned, ["head.gss.decoder=nearest", "head.gss.codes=16"])


def test_segment_reads_every_image_before_writing(capsys, tmp_path, run):
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(good.read_bytes()[:60])
    lines = _refused(run_cli(capsys, "segment", "--run", run, "--out", tmp_path / "s", good, bad, tmp_path / "no.png"),
                     f"{bad}: cannot read image", f"{tmp_path}/no.png: cannot read image")
    assert len(lines) == 2 and not (tmp_path / "s").exists()


def test_demo_refuses_one_class(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["demo", "--classes", "1"])
    assert exit.value.code == 2 and "argument --classes: must be >= 2, got 1" in capsys.readouterr().err


def test_a_run_folder_belongs_to_one_process(capsys, tmp_path, run, nothing_works):
    out = tmp_path / "r"
    with RunLock(out, "the test"):
        _refused(run_cli(capsys, "train", *SMOKE, "--out", out), f"{out} is in use by the test (pid {os.getpid()}")
        _refused(run_cli(capsys, "ablate", *SMOKE, "--out", out), f"{out} is in use by the test")
    assert (out / ".lock").read_text() == ""  # released: empty
    with RunLock(run, "the test"):  # eval writes eval.json into the run
        _refused(run_cli(capsys, "eval", "--run", run), f"{run} is in use by the test")


def test_a_killed_holder_is_named_and_its_folder_taken_over(capsys, tmp_path, run):
    (run / ".lock").write_text("ddps train (pid 999999 on elsewhere, since then)")
    result = run_cli(capsys, "eval", "--run", run, "--limit", "1")
    assert result.returncode == 0
    assert f"{run}/.lock names ddps train (pid 999999 on elsewhere, since then), which no longer holds it" \
        in result.stderr
    assert (run / ".lock").read_text() == ""


def test_a_holder_is_named_though_it_had_not_written_its_line_yet(tmp_path):
    # Two commands started together: the second can find the lock taken before the first has
    # written its line into it.
    tmp_path.joinpath("r").mkdir()
    fd = os.open(tmp_path / "r" / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        threading.Timer(0.2, os.pwrite, (fd, b"ddps train (pid 1 on here, since now)", 0)).start()
        with pytest.raises(config.ConfigError, match=r"r is in use by ddps train \(pid 1 on here"):
            RunLock(tmp_path / "r", "ddps eval").__enter__()
    finally:
        os.close(fd)


def test_two_trainings_started_together_into_one_folder(tmp_path):
    out = tmp_path / "r"
    procs = [start("train", *SMOKE, "--out", out, *TINY, "train.progress=false") for _ in range(2)]
    results = sorted((p.wait(), p.stderr.read()) for p in procs)
    (ok, _), (refused, message) = results
    assert (ok, refused) == (0, 2), results
    assert f"ddps train: error: {out} is in use by ddps train" in message or "already holds a run" in message
    stages = [line for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(stages) == len(set(stages))  # one run's records, not two interleaved


@pytest.mark.parametrize("cuda_build,gpus,device,problem", [
    ("12.8", 1, "cuda", None),
    ("12.8", 1, "cuda:0", None),
    ("12.8", 1, "cuda:1", "device: 'cuda:1', but only 1 cuda device(s) are visible (indices 0..0)"),
    ("12.8", 0, "cuda", "device: 'cuda', but no cuda device is available; run on the CPU with device=cpu"),
    (None, 0, "cuda", "device: 'cuda', but this torch ("),
    (None, 0, "cpu", None),
    (None, 0, "meta", "device: 'meta', but no meta device is available"),
])
def test_the_device_against_what_torch_has(monkeypatch, cuda_build, gpus, device, problem):
    # the machines this one is not: a CUDA build with and without GPUs
    monkeypatch.setattr(torch.version, "cuda", cuda_build)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    problems = preflight.device_problems(device)
    assert problems == ([] if problem is None else problems[:1]) and len(problems) == (problem is not None)
    if problem:
        assert problems[0].startswith(problem)


def test_every_source_problem_at_once_and_only_for_what_reads_it(tmp_path):
    from ddps.app import config

    cfg = config.load(config.find("synthetic-smoke"), ["segmentor.type=segformer", "segmentor.pretrained=./no-model",
                                                       f"segmentor.checkpoint={tmp_path}/w.safetensors"])
    assert preflight.source_problems(cfg, training=True) == [
        "segmentor.pretrained: the folder ./no-model does not exist",
        f"segmentor.checkpoint: {tmp_path}/w.safetensors does not exist"]
    # evaluating or segmenting a run reads its own weights, not the checkpoint it started from
    assert preflight.source_problems(cfg, training=False) == ["segmentor.pretrained: the folder ./no-model does not exist"]
    with pytest.raises(config.ConfigError) as error:
        preflight.check(cfg)  # what ddps eval and segment call
    assert error.value.problems == ["segmentor.pretrained: the folder ./no-model does not exist"]
    for source in ("~/no-model", "some/where/model", "/no-model"):  # only "name" or "owner/name" can be a hub id
        assert preflight._pretrained_problems(source, "config.json") == [
            f"segmentor.pretrained: the folder {source} does not exist"]
    # a segmentor that loads nothing pretrained ignores the key
    compact = config.load(config.find("synthetic-smoke"), ["segmentor.pretrained=./no-model"])
    assert preflight.source_problems(compact, training=True) == []


def test_weights_that_are_not_a_file(capsys, tmp_path, run):
    _refused(run_cli(capsys, "eval", "--run", run, "--weights", tmp_path), f"--weights: {tmp_path} is not a file")
    _refused(run_cli(capsys, "segment", "--run", run, "--out", tmp_path / "s", "--weights", tmp_path / "w.safetensors",
                     run.parent / "image.png"), f"--weights: {tmp_path}/w.safetensors does not exist")


def test_the_lock_names_its_holder_and_makes_the_folders(tmp_path):
    out = tmp_path / "a" / "b" / "run"
    with RunLock(out, "ddps train"):
        text = (out / ".lock").read_text()
        assert re.fullmatch(rf"ddps train \(pid {os.getpid()} on \S+, since \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\)", text)
    assert (out / ".lock").stat().st_mode & 0o777 == 0o644 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
