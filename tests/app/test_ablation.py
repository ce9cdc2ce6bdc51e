"""ddps ablate end to end on the smoke config: one segmentor (stopped at its validation plateau),
every variant and seed from it, the summary and findings, and resuming that trains nothing
finished."""
import json

import pytest
import yaml

from ddps.app import ablation, checkpoint, trainer
from ddps.app.cli import main
from helpers.markdown import tables

SMOKE = ["--config", "synthetic-smoke"]
# a plateau of 100 points is reached at the second evaluation: the segmentor stops at step 4 of 10
FAST = ["segmentor.eval_interval=2", "segmentor.patience=2", "segmentor.plateau=100", "train.iters=2", "prior.iters=2",
        "decoder.iters=2", "data.synthetic.num_val=2", "eval.panels=0"]


@pytest.fixture(scope="module")
def ablated(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablate") / "out"
    assert main(["ablate", *SMOKE, "--out", str(out), "--markdown", str(out.parent / "ABLATIONS.md"), *FAST]) == 0
    return out


def test_every_variant_from_one_segmentor(ablated):
    result = json.loads((ablated / "ablation.json").read_text())
    assert list(result["summary"]) == list(ablation.VARIANTS) and result["seeds"] == [0, 1]
    # the table's order names every variant once (one left out would never run)
    assert sorted(ablation.VARIANTS) == sorted({**ablation.TRAINED, **ablation.INFERRED})
    # the segmentor stopped where its validation mIoU was flat
    assert result["segmentor_steps"] == 4 and len(result["segmentor_val"]) == 2
    segmentor = checkpoint.load_weights(ablated / "segmentor" / "segmentor.safetensors")
    for name, overrides in ablation.TRAINED.items():
        for seed in (0, 1):
            run = ablated / name / f"seed-{seed}"
            cfg = yaml.safe_load((run / "config.yaml").read_text())
            assert cfg["seed"] == seed and cfg["train"]["iters"] == 2
            for override in overrides[1]:  # the variant's own setting, and nothing else differs
                key, value = override.split("=")
                node = cfg
                for part in key.split("."):
                    node = node[part]
                assert node == yaml.safe_load(value)
            weights = checkpoint.load_weights(run / "model.safetensors")
            # the same segmentor: frozen, or (GSS's conditioning) the start of its backbone's training
            end_to_end = cfg["head"]["kind"] == "gss" and cfg["head"]["gss"]["conditioning"] == "gss"
            kept = [k for k in segmentor if not (end_to_end and k.startswith("segmentor.features."))]
            assert all((weights[k] == segmentor[k]).all() for k in kept)
            assert end_to_end == any(not (weights[k] == v).all() for k, v in segmentor.items())
    for name, (_, source, _) in ablation.INFERRED.items():
        for seed in (0, 1):
            report = json.loads((ablated / name / f"seed-{seed}" / "eval.json").read_text())
            trained = json.loads((ablated / source / f"seed-{seed}" / "eval.json").read_text())
            assert set(report) == set(trained)
            if source == "gss-ftw":  # the same model: the same prior, evaluated once more
                assert report["prior"] == trained["prior"] and "base" not in report
            else:
                assert {"base", "ddps"} <= set(report) and report["base"] == trained["base"]
    refine = result["runs"]["refine"]["0"]
    assert refine["refine"]["steps"] == {} and "ddps" not in refine  # one refinement step, no diffusion steps
    for name in ("gss", "gss-ftw", "gss-frozen"):
        gss = result["runs"][name]["0"]
        assert gss["gss"]["steps"] == {} and 0 <= gss["prior"]["reconstruction"]["mIoU"] <= 100
        assert ("base" in gss) == (name == "gss-frozen")  # an end-to-end backbone leaves no baseline
        assert result["summary"][name]["prior_mIoU"]["mean"] == pytest.approx(
            sum(r["prior"]["reconstruction"]["mIoU"] for r in result["runs"][name].values()) / 2, abs=0.01)
        pixels = [r["gss"]["parts"]["pixel branch"]["mIoU"] for r in result["runs"][name].values()]
        assert result["summary"][name]["parts"] == {"pixel branch": {"mean": pytest.approx(sum(pixels) / 2, abs=0.01),
                                                                     "min": min(pixels), "max": max(pixels)}}
        (finding,) = [v for claim, v in result["findings"] if f"({name})" in claim]
        assert f"its pixel branch alone {sum(pixels) / 2:.2f}" in finding
    assert result["summary"]["gss"]["segmentor_mIoU"] is None and result["summary"]["ddps"]["prior_mIoU"] is None
    assert result["summary"]["ddps"]["parts"] == {}
    claims = [claim for claim, _ in result["findings"]]
    assert len(claims) == 7 and all(v.startswith(("reproduced", "not reproduced", "+", "-"))
                                    for _, v in result["findings"])
    table = (ablated.parent / "ABLATIONS.md").read_text()
    assert table == (ablated / "ablation.md").read_text()
    (rows,) = tables(table)
    assert rows[0][:3] == ["variant", "what it changes", "seeds"]
    assert [row[0] for row in rows[1:]] == list(ablation.VARIANTS) and {row[2] for row in rows[1:]} == {"2"}
    assert "## The findings" in table and "seeds 0, 1;" in table


def test_one_run_reads_in_the_singular(ablated):
    result = json.loads((ablated / "ablation.json").read_text())
    result["runs"] = {"ddps": {"1": result["runs"]["ddps"]["1"]}}
    result["summary"] = {"ddps": ablation._summary(result["runs"]["ddps"])}
    result.update(seeds=[1], wall_s=0.04, runs_done_before=1, variants={"ddps": ablation.DESCRIPTIONS["ddps"]})
    text = ablation.markdown(result)
    assert "1 run of 1 variant, seeds 1;" in text and "This invocation took 0.0 s; 1 of the runs was finished" in text
    (rows,) = tables(text)
    assert rows[1][:3] == ["ddps", ablation.DESCRIPTIONS["ddps"], "1"]


def test_gss_runs_evaluated_before_parts_existed_still_summarise(ablated):
    # a folder may hold GSS runs whose eval.json has no "parts": the summary keeps only the parts
    # every seed has, and the finding leaves the pixel branch out instead of failing
    result = json.loads((ablated / "ablation.json").read_text())
    runs = {"ddps": result["runs"]["ddps"], "gss": json.loads(json.dumps(result["runs"]["gss"]))}
    del runs["gss"]["0"]["gss"]["parts"]
    summary = {name: ablation._summary(r) for name, r in runs.items()}
    assert summary["gss"]["parts"] == {}
    (finding,) = [v for claim, v in ablation.findings(summary) if "(gss)" in claim]
    assert finding.endswith(f"round trip of the true masks scores {summary['gss']['prior_mIoU']['mean']:.2f}")
    del runs["gss"]["1"]["gss"]["parts"]
    assert ablation._summary(runs["gss"])["parts"] == {}


@pytest.mark.parametrize("seconds,text", [(0.04, "0.0 s"), (0.4, "0.4 s"), (42.4, "42 s"), (210, "3.5 min"),
                                          (4320, "1.2 h")])
def test_durations_read_as_written(seconds, text):
    assert ablation.duration(seconds) == text


def test_table_cells_match_the_header():
    lines = ablation.table(["a", "b"], [["x|y", 1]])
    assert tables("\n".join(lines)) == [[["a", "b"], ["x\\|y", "1"]]]
    with pytest.raises(ValueError, match="differ from the header's 2"):
        ablation.table(["a", "b"], [["x"]])


def test_rerun_trains_nothing_finished(ablated, monkeypatch, capsys):
    calls = []
    real = trainer.train
    monkeypatch.setattr(trainer, "train", lambda cfg, out, **kw: calls.append(out) or real(cfg, out, **kw))
    assert main(["ablate", *SMOKE, "--out", str(ablated), *FAST]) == 0
    assert calls == []
    (ablated / "absorbing" / "seed-1" / "eval.json").unlink()
    assert main(["ablate", *SMOKE, "--out", str(ablated), "--only", "absorbing", *FAST]) == 0
    assert calls == [ablated / "absorbing" / "seed-1"]
    # the report still covers every finished run in the folder, not only --only's, and says that
    # every run but the one trained was finished before
    result = json.loads((ablated / "ablation.json").read_text())
    n = len(ablation.VARIANTS)
    assert list(result["summary"]) == list(ablation.VARIANTS) and result["runs_done_before"] == 2 * n - 1
    assert all(len(runs) == 2 for runs in result["runs"].values())
    out = capsys.readouterr().out
    assert f"{2 * n - 1} of the runs were finished before it" in out and f"{2 * n} runs of {n} variants" in out
    (rows,) = tables((ablated / "ablation.md").read_text())
    assert len(rows) == 1 + len(ablation.VARIANTS)


def test_gss_is_the_gss_ftw_model_decoded_by_nearest_colour(ablated, monkeypatch):
    # the gss row evaluates gss-ftw's runs without FT-W's decoder (this smoke model's labels are
    # the same either way, so the head evaluated is what tells); nothing is trained for it
    loaded, trained = [], []
    real = ablation.load_run
    monkeypatch.setattr(ablation, "load_run", lambda run, overrides: loaded.append((run, real(run, overrides))) or
                        loaded[-1][1])
    monkeypatch.setattr(trainer, "train", lambda cfg, out, **kw: trained.append(out))
    (ablated / "gss" / "seed-1" / "eval.json").unlink()
    assert main(["ablate", *SMOKE, "--out", str(ablated), "--only", "gss", *FAST]) == 0
    ((run, (cfg, _, head)),) = loaded
    assert run == ablated / "gss-ftw" / "seed-1" and trained == []
    assert cfg.head.gss.decoder == "nearest" and head.decoder is None
    assert json.loads((ablated / "gss" / "seed-1" / "eval.json").read_text())["prior"] == json.loads(
        (run / "eval.json").read_text())["prior"]


def test_bad_input_is_named(ablated, tmp_path, capsys):
    assert main(["ablate", *SMOKE, "--out", str(tmp_path / "a"), "--only", "ddps", "nope", *FAST]) == 2
    assert "--only nope: not a variant" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit:
        main(["ablate", *SMOKE, "--out", str(tmp_path / "a"), "--seeds", "0"])
    assert exit.value.code == 2 and "argument --seeds: must be >= 1, got 0" in capsys.readouterr().err
    # a rerun with other settings would mix variants trained differently
    assert main(["ablate", *SMOKE, "--out", str(ablated), *FAST, "train.iters=3"]) == 2
    assert "train.iters: 2 -> 3" in capsys.readouterr().err
