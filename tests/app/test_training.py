"""The two-stage recipe end to end on the smoke config: outputs, resume after Ctrl-C and after
SIGKILL (bitwise the uninterrupted run), atomic checkpoints, data-parallel training, convert,
segment and eval."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddps.app import checkpoint, config, evaluation, model, trainer
from ddps.app.checkpoint import load_weights
from ddps.app.cli import main
from ddps.app.data import build_dataset
from ddps.app.stages import STAGES
from helpers.app import run_cli, start

SMOKE = ["--config", "synthetic-smoke"]
# enough steps to interrupt the head stage part-way
LONGER = ["train.iters=24", "train.checkpoint_interval=4", "train.log_interval=1"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(["train", *SMOKE, "--out", str(out), *LONGER]) == 0
    return out


def test_run_directory(straight):
    for name in ("config.yaml", "model.safetensors", "metrics.jsonl", "eval.json"):
        assert (straight / name).is_file(), name
    report = json.loads((straight / "eval.json").read_text())
    assert set(report) == {"base", "ddps"} and set(report["ddps"]) == {"final", "steps"}
    assert list(report["ddps"]["steps"]) == ["0", "5", "9"]
    for r in [report["base"], report["ddps"]["final"], *report["ddps"]["steps"].values()]:
        assert {"mIoU", "mBIoU", "aAcc"} <= set(r) and 0 <= r["mIoU"] <= 100
    assert report["ddps"]["final"] == report["ddps"]["steps"]["9"]  # the last step is the final one
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["stage"] == "head"] == list(range(1, 25))
    assert all(np.isfinite(r["loss"]) and r["samples_per_s"] > 0 for r in records)
    panels = sorted((straight / "panels").glob("*.png"))
    assert len(panels) == 2
    with Image.open(panels[0]) as im:
        assert im.size == (64 * 7, 18 + 64)  # titles over image | segmentor | 3 steps | final | truth
    assert len(checkpoint.checkpoints(straight / "checkpoints")) == 2  # keep_last


def test_refuses_to_overwrite_a_run(capsys, straight):
    result = run_cli(capsys, "train", *SMOKE, "--out", str(straight))
    assert result.returncode == 2 and "already holds a run: pass --resume" in result.stderr


def _wait_for(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def _head_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum('"stage": "head"' in line for line in path.read_text().splitlines())


def _same_weights(a: Path, b: Path):
    wa, wb = load_weights(a / "model.safetensors"), load_weights(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.mark.parametrize("how", ["ctrl-c", "sigkill"])
def test_interrupt_then_resume_is_exact(straight, tmp_path, capsys, how):
    """Ctrl-C writes a checkpoint at the step it stops at; after SIGKILL the last checkpoint is at
    most one interval (4 steps) old. Either way --resume ends with the uninterrupted run's weights."""
    out = tmp_path / "run"
    proc = start("train", *SMOKE, "--out", str(out), *LONGER)
    _wait_for(lambda: _head_steps(out) >= 6, proc)
    if how == "ctrl-c":
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 130, stderr
        assert f"checkpoint written. Resume with: ddps train --out {out} --resume" in stderr
    else:
        proc.kill()
        proc.communicate()
    stopped_at = _head_steps(out)
    records = checkpoint.checkpoints(out / "checkpoints")
    _, state = checkpoint.load_checkpoint(records[-1])  # complete, never half-written
    assert state["stage"] == "head" and 6 <= stopped_at < 24
    lost = stopped_at - state["stage_step"]
    assert lost == 0 if how == "ctrl-c" else 0 <= lost <= 4
    result = run_cli(capsys, "train", "--out", str(out), "--resume")  # as the hint says: the run's own config
    assert result.returncode == 0, result.stderr
    assert f"stage head, step {state['stage_step']}" in result.stdout
    _same_weights(out, straight)


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    d = tmp_path / "ck"
    first = checkpoint.save_checkpoint(d, 1, {"w": torch.ones(3)}, {"stage": "head"}, keep_last=2)

    def fail(*args):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(d, 2, {"w": torch.zeros(3)}, {"stage": "head"}, keep_last=2)
    monkeypatch.undo()
    assert checkpoint.checkpoints(d) == [first]
    assert sorted(p.name for p in d.iterdir()) == ["step-00000001.json", "step-00000001.safetensors"]
    tensors, _ = checkpoint.load_checkpoint(first)
    assert torch.equal(tensors["w"], torch.ones(3))
    # a record whose weights file was cut short is refused, not read
    weights = d / "step-00000001.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    with pytest.raises(ValueError, match="missing or incomplete"):
        checkpoint.load_checkpoint(first)


def test_keep_last_and_order(tmp_path):
    d = tmp_path / "ck"
    for step in (3, 12, 7, 100):
        checkpoint.save_checkpoint(d, step, {"w": torch.full((1,), float(step))}, {}, keep_last=2)
    assert [p.name for p in checkpoint.checkpoints(d)] == ["step-00000012.json", "step-00000100.json"]
    assert len(list(d.glob("*.safetensors"))) == 2


def test_optimizer_state_round_trip():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.9, 0.96))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, structure = checkpoint.optimizer_tensors(opt)
    structure = json.loads(json.dumps(structure))
    opt2 = torch.optim.AdamW(model.parameters(), lr=0.1)
    checkpoint.load_optimizer(opt2, tensors, structure)
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        for name in a["state"][i]:
            assert torch.equal(a["state"][i][name], b["state"][i][name])


def test_bf16_and_accumulation(capsys, tmp_path):
    result = run_cli(capsys, "train", *SMOKE, "--out", str(tmp_path / "r"), "train.amp=bf16", "train.accumulate=2",
                 "segmentor.iters=2", "train.iters=3", "eval.panels=0")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in records)


def test_bad_dataset_input_names_the_file(capsys, tmp_path):
    root = tmp_path / "data"
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(root / "images" / split / "x.png")
        Image.fromarray(np.full((64, 64), 9, np.uint8)).save(root / "masks" / split / "x.png")
    result = run_cli(capsys, "train", *SMOKE, "--out", str(tmp_path / "r"), "data.dataset=folder",
                     f"data.root={root}", "data.num_classes=3")
    assert result.returncode == 2
    assert f"{root}/masks/training/x.png: label values [9]" in result.stderr
    result = run_cli(capsys, "train", *SMOKE, "--out", str(tmp_path / "r"), "data.dataset=folder",
                 f"data.root={tmp_path}/missing", "data.num_classes=3")
    assert result.returncode == 2 and f"{tmp_path}/missing/images/training does not exist" in result.stderr


def test_data_parallel_matches_one_process(tmp_path):
    """torchrun with two gloo processes, each with half of every batch, against one process with
    the whole batch. The segmentor stage is deterministic: after one AdamW step its weights must
    agree. That step moves each weight by lr * sign(gradient), so a weight whose gradient is at
    rounding level may move the other way: such weights must be rare (under 1 %; a rank training
    on its half batch alone moves a large share of them the other way). The head stage draws its noise per rank, so there the processes are only checked to finish."""
    # no padding (ratio >= 1): every rank then averages its loss over as many pixels as the other
    common = [*SMOKE, "segmentor.iters=1", "train.iters=2", "eval.panels=0", "data.synthetic.num_val=1",
              "data.ratio_range=[1.0, 1.5]"]
    assert main(["train", "--out", str(tmp_path / "one"), *common]) == 0
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "ddps", "train", "--out", str(tmp_path / "two"), *common],
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one_w, two_w = load_weights(tmp_path / "one" / "model.safetensors"), load_weights(tmp_path / "two" / "model.safetensors")
    seg = [k for k in one_w if k.startswith("segmentor.") and one_w[k].is_floating_point()]
    differ = sum(int(((two_w[k] - one_w[k]).abs() > 1e-5).sum()) for k in seg)
    total = sum(one_w[k].numel() for k in seg)
    assert differ <= total // 100, f"{differ} of {total} segmentor weights differ"
    assert all(torch.isfinite(two_w[k]).all() for k in two_w if k.startswith(("head.unet.", "ema.unet.")))


def test_eval_modes_and_segment(capsys, straight, tmp_path):
    for mode in ("slide", "ms-flip"):
        out = tmp_path / f"{mode}.json"
        result = run_cli(capsys, "eval", "--run", str(straight), "--json", str(out), "--limit", "2",
                         f"eval.mode={mode}")
        assert result.returncode == 0, result.stderr
        report = json.loads(out.read_text())
        assert list(report["ddps"]["steps"]) == ["0", "5", "9"]
    images = []
    for i, size in enumerate(((64, 64), (50, 70))):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
        images.append(str(path))
    result = run_cli(capsys, "segment", "--run", str(straight), "--out", str(tmp_path / "masks"), "--steps", *images)
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in (tmp_path / "masks").iterdir())
    assert names == sorted(["legend.png", *(f"img{i}{s}.png" for i in range(2)
                                            for s in ("", "_segmentor", "_step0", "_step5", "_step9"))])
    with Image.open(tmp_path / "masks" / "img1.png") as im:
        assert im.size == (70, 50)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    result = run_cli(capsys, "segment", "--run", str(straight), "--out", str(tmp_path / "m2"), str(bad))
    assert result.returncode == 2 and f"{bad}: cannot read image" in result.stderr


def _stopped_run(tmp_path, stage="head"):
    """A run directory whose last checkpoint is of ``stage`` (its tensors are not read before the
    config is settled)."""
    out = tmp_path / "run"
    cfg = config.load(config.find("synthetic-smoke")).to_dict()
    checkpoint.save_checkpoint(out / "checkpoints", 10**7 + 3, {"w": torch.zeros(1)},
                               {"stage": stage, "stage_step": 3, "optimizer": {}, "config": cfg}, keep_last=2)
    return out


@pytest.mark.parametrize("stage,args,message", [
    (None, [], "no checkpoint to resume from"),
    ("head", ["head.dim=32"], "would change what the run in .* trains: head.dim: 16 -> 32. Resume without"),
    ("head", ["train.iters=30"], r"train.iters: 10 -> 30.*or add --extend if only train.iters should grow"),
    ("head", ["--extend", "segmentor.iters=30"], "segmentor.iters: 10 -> 30"),  # stage 1 is over
    ("done", ["train.iters=20"], "is finished .* a resume trains nothing, so train.iters: 10 -> 20 would only"),
])
def test_resume_refuses_what_would_change_the_run(tmp_path, capsys, stage, args, message):
    import re

    out = _stopped_run(tmp_path, stage) if stage else tmp_path / "empty"
    before = sorted(p.name for p in out.rglob("*")) if out.exists() else []
    assert main(["train", "--out", str(out), "--resume", *args]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert (sorted(p.name for p in out.rglob("*")) if out.exists() else []) == before  # nothing written


def test_extend_needs_resume(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), "--extend"]) == 2
    assert "--extend goes with --resume" in capsys.readouterr().err


def test_segment_takes_overrides_and_refuses_colliding_names(capsys, straight, tmp_path):
    images = []
    for folder, ext in (("a", "png"), ("b", "jpg")):
        (tmp_path / folder).mkdir()
        path = tmp_path / folder / f"photo.{ext}"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
        images.append(str(path))
    result = run_cli(capsys, "segment", "--run", str(straight), "--out", str(tmp_path / "m"), *images)
    assert result.returncode == 2 and "would both be written as" in result.stderr and not (tmp_path / "m").exists()
    # overrides among the images: 4 inference steps of 10 visit 0, 2, 4, 6, 8, 9, so step 5 cannot be collected
    result = run_cli(capsys, "segment", "--run", str(straight), "--out", str(tmp_path / "m"), images[0],
                     "eval.inference_steps=4")
    assert result.returncode == 2 and "eval.collect_timesteps: collect_timesteps [5] are never visited" in result.stderr
    result = run_cli(capsys, "segment", "--run", str(straight), "--out", str(tmp_path / "m"), "--steps", images[0],
                 "eval.inference_steps=4", "eval.collect_timesteps=[0,4,9]")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "legend.png", "photo.png", "photo_segmentor.png", "photo_step0.png", "photo_step4.png", "photo_step9.png"]


def test_segment_labels_and_legend(capsys, straight, tmp_path):
    from ddps.app.evaluation import colourise
    from ddps.app.model import dataset_classes, load_run
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
    result = run_cli(capsys, "segment", "--run", str(straight), "--out", str(tmp_path / "m"), "--labels", str(path))
    assert result.returncode == 0, result.stderr
    k, ignore = dataset_classes(load_run(straight)[0])
    for name in ("photo", "photo_segmentor"):
        with Image.open(tmp_path / "m" / f"{name}_labels.png") as ids, Image.open(tmp_path / "m" / f"{name}.png") as rgb:
            labels = np.asarray(ids)
            assert ids.mode == "L" and labels.shape == (40, 48) and labels.max() < k
            assert np.array_equal(colourise(torch.from_numpy(labels.astype(np.int64)), k, ignore), np.asarray(rgb))
    with Image.open(tmp_path / "m" / "legend.png") as legend:
        assert legend.size == (64 * -(-k // 32), 16 * min(32, k))


def test_a_plateau_counts_only_after_the_last_lr_drop(tmp_path):
    
    # flat at every evaluation (a plateau of 100 points), but the evaluations at steps 2 and 4 come
    # before the drop at step 4: the stage ends at step 8, its second evaluation after the drop
    cfg = config.load(config.find("synthetic-smoke"), ["segmentor.eval_interval=2", "segmentor.patience=2",
                                                         "segmentor.plateau=100", "segmentor.lr_steps=[4]",
                                                         "data.synthetic.num_val=2"])
    trainer.train(cfg, tmp_path / "run", until="head")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_mIoU" in r] == [2, 4, 6, 8]
    assert max(r["step"] for r in records) == 8


def test_segmentor_stage_ends_at_its_plateau_and_stays_ended(tmp_path):
    
    # a plateau of 100 points: flat at the second evaluation, step 4 of at most 10
    cfg = config.load(config.find("synthetic-smoke"), ["segmentor.eval_interval=2", "segmentor.patience=2",
                                                         "segmentor.plateau=100", "data.synthetic.num_val=2"])
    trainer.train(cfg, tmp_path / "run", until="head")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_mIoU" in r] == [2, 4]
    stopped = checkpoint.checkpoints(tmp_path / "run" / "checkpoints")
    state = json.loads(stopped[0].read_text())
    assert (state["stage"], state["stage_step"], len(state["val_history"])) == ("segmentor", 4, 2)
    # interrupted right after the converged step's checkpoint: a resume ends the stage, no more steps
    for later in stopped[1:]:
        later.unlink()
    resumed = trainer.Trainer(cfg, tmp_path / "run", resume=True)
    assert (resumed.stage_name, resumed.step) == ("segmentor", 4)
    resumed._run_stage(trainer._Signals())
    assert resumed.step == 4


GSS = ["head.kind=gss", "eval.use_ema=false", "head.gss.fusion_channels=[8,16,32]", "head.gss.swin=[2,2,3]"]


def _cut_after(run: Path, stage: str, step: int) -> None:
    """Drop the checkpoints after (stage, step): as if the run had been killed there."""
    for record in checkpoint.checkpoints(run / "checkpoints"):
        _, state = checkpoint.load_checkpoint(record)
        if (STAGES.index(state["stage"]), state["stage_step"]) > (STAGES.index(stage), step):
            record.unlink()


def test_gss_recipe_trains_prior_head_with_backbone_then_decoder_and_resumes_exactly(tmp_path):
    cfg = config.load(config.find("synthetic-smoke"), [*GSS, "head.gss.decoder=learned", "prior.iters=6",
                                                        "prior.batch_size=2", "decoder.iters=6", "decoder.batch_size=2",
                                                        "train.checkpoint_interval=3", "train.keep_last=20",
                                                        "train.log_interval=1", "eval.panels=1"])
    straight = tmp_path / "straight"
    report = trainer.train(cfg, straight)
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    for stage, steps in (("prior", 6), ("head", 10), ("decoder", 6)):
        assert [r["step"] for r in records if r["stage"] == stage] == list(range(1, steps + 1))
    # the backbone trained with the head: its classifier's prediction is no baseline any more
    assert set(report) == {"gss", "prior"} and report["gss"]["steps"] == {}
    assert 0 <= report["prior"]["reconstruction"]["mIoU"] <= 100
    assert json.loads((straight / "eval.json").read_text()) == report
    states = {}
    for record in checkpoint.checkpoints(straight / "checkpoints"):
        tensors, state = checkpoint.load_checkpoint(record)
        states[(state["stage"], state["stage_step"])] = tensors
    segmentor_end, head_end = states[("head", 0)], states[("decoder", 0)]  # the stage boundaries' checkpoints
    final = load_weights(straight / "model.safetensors")
    backbone = [k for k in final if k.startswith("segmentor.features.")]
    assert backbone and not all(torch.equal(segmentor_end[k], head_end[k]) for k in backbone)  # trained end to end
    assert all(torch.equal(segmentor_end[k], head_end[k]) for k in final if k.startswith("segmentor.classifier."))
    # the decoder stage changes the decoder alone
    decoder = [k for k in final if k.startswith("head.decoder.")]
    assert decoder and not all(torch.equal(head_end[k], final[k]) for k in decoder if "running" not in k)
    # (the moving average, unused with eval.use_ema=false, follows on)
    assert all(torch.equal(head_end[k], final[k]) for k in final
               if k.startswith(("segmentor.", "head.")) and not k.startswith("head.decoder."))
    # its evaluation as the run wrote it; the stale classifier is no baseline to evaluate alone
    assert main(["eval", "--run", str(straight), "--json", str(tmp_path / "again.json")]) == 0
    assert json.loads((tmp_path / "again.json").read_text()) == report
    # decoded by nearest colour, it is the model the head stage ended with (GSS-FF): evaluated here
    # from that checkpoint's weights, in a nearest-colour run of the same config
    assert main(["eval", "--run", str(straight), "head.gss.decoder=nearest", "--json", str(tmp_path / "ff.json")]) == 0
    nearest = config.load(None, ["head.gss.decoder=nearest"], base=cfg.to_dict())
    segmentor = model.build_segmentor(nearest)
    segmentor.load_state_dict(checkpoint.unprefixed(head_end, "segmentor."))
    head = model.build_head(nearest, segmentor.feature_channels, False, segmentor.level_channels)
    head.load_state_dict({k: v for k, v in checkpoint.unprefixed(head_end, "head.").items() if not k.startswith("decoder.")})
    expected = evaluation.evaluate(nearest, segmentor.eval(), head.eval(), build_dataset(nearest, "val"))
    assert json.loads((tmp_path / "ff.json").read_text()) == json.loads(json.dumps(expected))
    assert expected["prior"] == report["prior"]
    # (this smoke model's labels are the same either way: its scores are not)
    (_, _, ff), (_, segmentor, ftw) = model.load_run(straight, ["head.gss.decoder=nearest"]), model.load_run(straight)
    levels = segmentor.levels(torch.rand(1, 3, 64, 64))
    with torch.no_grad():
        one_hot, logits = ff.sample(levels)[0], ftw.sample(levels)[0]
    assert ff.decoder is None and set(one_hot.unique().tolist()) == {0.0, 1.0}
    assert one_hot.shape == logits.shape and not torch.equal(one_hot, logits)
    assert main(["eval", "--run", str(straight), "--base-only"]) == 2
    # killed in the head stage, then in the decoder stage: resumed, the same weights
    for stage in ("head", "decoder"):
        run = tmp_path / stage
        trainer.train(cfg, run)
        _cut_after(run, stage, 3)
        resumed = trainer.Trainer(cfg, run, resume=True)
        assert (resumed.stage_name, resumed.step) == (stage, 3)
        resumed.run()
        _same_weights(run, straight)


def test_ddps_runs_skip_the_prior_stage(straight):
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in records} == {"segmentor", "head"}
    stages = {json.loads(r.read_text())["stage"] for r in checkpoint.checkpoints(straight / "checkpoints")}
    assert "prior" not in stages


def test_gss_on_frozen_features_keeps_the_segmentor_and_decodes_from_the_average(tmp_path):
    cfg = config.load(config.find("synthetic-smoke"), ["head.kind=gss", "head.gss.conditioning=frozen-features",
                                                        "head.gss.decoder=learned", "prior.iters=3",
                                                        "prior.batch_size=2", "train.iters=3", "decoder.iters=2",
                                                        "decoder.batch_size=2", "eval.panels=0",
                                                        "train.checkpoint_interval=1", "train.keep_last=20"])
    report = trainer.train(cfg, tmp_path / "run")
    assert set(report) == {"base", "gss", "prior"}
    assert 0 <= report["gss"]["final"]["mIoU"] <= 100 and 0 <= report["prior"]["reconstruction"]["mIoU"] <= 100
    states = {}
    for record in checkpoint.checkpoints(tmp_path / "run" / "checkpoints"):
        tensors, state = checkpoint.load_checkpoint(record)
        states[(state["stage"], state["stage_step"])] = tensors
    # with eval.use_ema, the decoder learns from the averaged conditioning network, the one evaluated
    head_end, decoder_start = states[("head", 3)], states[("decoder", 0)]
    keys = [k for k in head_end if k.startswith("ema.conditioning.")]
    assert keys and not all(torch.equal(head_end[k], head_end["head." + k[4:]]) for k in keys)
    assert all(torch.equal(head_end[k], decoder_start["head." + k[4:]]) for k in keys)
