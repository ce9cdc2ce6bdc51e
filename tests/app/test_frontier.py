"""ddps frontier: each row is ddps eval with that row's overrides, with the head's time and steps."""
import json
import shutil

import pytest
import yaml

from ddps.app.cli import main
from ddps.nn import inference_timesteps
from helpers.app import run_cli

SMOKE = ["--config", "synthetic-smoke"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("frontier") / "run"
    assert main(["train", *SMOKE, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def swept(smoke_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("swept")
    json_out, md = folder / "frontier.json", folder / "FRONTIER.md"
    assert main(["frontier", "--run", str(smoke_run), "--steps", "1", "3", "--stop-below", "0.3", "--limit", "3",
                 "--json", str(json_out), "--markdown", str(md)]) == 0
    return json.loads(json_out.read_text()), md.read_text()


def test_every_setting_is_swept(swept):
    result, _ = swept
    settings = [(r["guidance_scale"], r["inference_steps"], r["stop_below"]) for r in result["rows"]]
    assert settings == [(g, n, s) for g in (0.4, 1.0) for n in (1, 3) for s in (0.0, 0.3)]
    assert result["images"] == 3 and result["num_timesteps"] == 10
    assert result["own"] == {"inference_steps": 2, "guidance_scale": 0.4, "stop_below": 0.0}
    for r in result["rows"]:
        schedule = len(inference_timesteps(10, r["inference_steps"]))
        if r["stop_below"] == 0:
            assert r["steps_per_image"] == schedule
        else:  # the first step has none before it to compare with: at least two run
            assert 2 <= r["steps_per_image"] <= schedule
        assert r["denoiser_calls_per_image"] == r["steps_per_image"] * (1 if r["guidance_scale"] == 1 else 2)
        assert r["head_ms_per_image"] > 0


@pytest.mark.parametrize("index", [2, 3, 5])
def test_a_row_is_what_ddps_eval_reports_with_its_overrides(smoke_run, swept, tmp_path, index):
    row = swept[0]["rows"][index]
    out = tmp_path / "eval.json"
    assert main(["eval", "--run", str(smoke_run), "--limit", "3", "--json", str(out), "eval.collect_timesteps=[]",
                 f"eval.inference_steps={row['inference_steps']}", f"eval.guidance_scale={row['guidance_scale']}",
                 f"eval.stop_below={row['stop_below']}"]) == 0
    final = json.loads(out.read_text())["ddps"]["final"]
    assert (row["mIoU"], row["mBIoU"]) == (final["mIoU"], final["mBIoU"])


def test_the_table(swept):
    result, md = swept
    lines = md.splitlines()
    assert lines[:2] == ["# What each sampling setting gains and costs", ""] and lines[3] == ""
    assert lines[2].startswith("`ddps frontier --run ") and " on device: " in lines[2]
    assert lines[4].startswith("Run `") and lines[5] == ""
    assert "its setting is 2 inference steps of T = 10, guidance 0.4, stop below 0. 3 held-out images" in md
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| inference")]
    assert len(rows) == len(result["rows"]) == 8
    assert ("| inference steps | guidance | stop below | mIoU | mBIoU | steps run per image | denoiser calls per image "
            "| head ms per image | time / the run's setting |") in lines
    assert all(row.endswith("| - |") for row in rows)  # the run's own setting (2 steps) was not swept
    first = result["rows"][4]
    assert rows[4] == (f"| 1 | off | never | {first['mIoU']:.2f} | {first['mBIoU']:.2f} | 2.00 | 2.00 | "
                       f"{first['head_ms_per_image']:.1f} | - |")
    assert [row.split(" | ")[1:3] for row in rows] == [[g, s] for g in ("0.4", "off") for _ in (1, 3)
                                                       for s in ("never", "0.3")]


def test_without_a_limit_every_held_out_image_is_evaluated(smoke_run, tmp_path):
    out = tmp_path / "f.json"
    assert main(["frontier", "--run", str(smoke_run), "--steps", "1", "--stop-below", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["images"] == 4 and len(result["rows"]) == 2  # synthetic-smoke's num_val
    assert all(r["steps_per_image"] == 2 for r in result["rows"])


def test_times_are_against_the_runs_own_setting(smoke_run, tmp_path):
    md = tmp_path / "f.md"
    assert main(["frontier", "--run", str(smoke_run), "--steps", "2", "5", "--stop-below", "--limit", "1",
                 "--json", str(tmp_path / "f.json"), "--markdown", str(md)]) == 0
    result = json.loads((tmp_path / "f.json").read_text())
    own = result["rows"][0]
    assert (own["inference_steps"], own["guidance_scale"], own["stop_below"]) == (2, 0.4, 0.0)
    rows = [line for line in md.read_text().splitlines() if line.startswith("| ") and not line.startswith("| inf")]
    assert rows[0].endswith("| 1.00x |")
    ratio = result["rows"][1]["head_ms_per_image"] / own["head_ms_per_image"]
    assert rows[1].endswith(f"| {ratio:.2f}x |")


@pytest.mark.parametrize("args,message", [
    (["--stop-below", "0"], "--stop-below: must lie in (0, 1], got 0.0"),
    (["--stop-below", "1.5"], "--stop-below: must lie in (0, 1], got 1.5"),
    (["--steps", "0"], "--steps: must be >= 1, got 0"),
    (["eval.stop_below=2"], "eval.stop_below"),
    (["head.dim=8"], "head.dim"),
])
def test_bad_input_is_named(capsys, smoke_run, args, message):
    try:
        code = main(["frontier", "--run", str(smoke_run), *args])
    except SystemExit as e:  # argparse's errors
        code = e.code
    assert code == 2 and message in capsys.readouterr().err


def test_a_run_of_another_head_is_refused(capsys, smoke_run, tmp_path):
    run = tmp_path / "refine"
    shutil.copytree(smoke_run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["head"]["kind"] = "refine"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    result = run_cli(capsys, "frontier", "--run", run, "--limit", "1")
    assert result.returncode == 2 and "sweeps DDPS's sampling steps: " in result.stderr and "'refine'" in result.stderr


def test_the_head_time_sums_every_sampling_call(monkeypatch):
    # The sweep's time and steps are the sums over the evaluation's sampling calls, of sample alone
    import torch

    from ddps.app import frontier

    clock = [100.0]
    monkeypatch.setattr(frontier.time, "perf_counter", lambda: clock[0])

    class Head:
        steps_run = torch.tensor([3, 1])
        name = "stub"

        def sample(self, cond, base=None):
            clock[0] += 2.5
            return cond

    timed = frontier._Timed(Head())
    cond = torch.zeros(2, 1)
    assert timed.sample(cond) is cond and timed.sample(cond) is cond
    assert timed.seconds == 5.0 and timed.steps == 8 and timed.name == "stub"
