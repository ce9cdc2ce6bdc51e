"""The commands and code of the README and of docs/, run. Every line of their ``bash`` blocks must
be in COMMANDS, which says how a test runs it, so no page can show a command that no test runs:

- ``ddps``/``torchrun`` lines run as written, in a scratch directory, with the substitutions and
  extra arguments listed beside them that make them fit this machine and a test's time: fewer
  iterations and smaller sizes, a tiny ADE20K-layout folder for ``/data/ADEChallengeData2016``, a
  tiny local SegFormer for the hub model, 2 processes for 8 GPUs, the CPU for ``device: cuda``.
  ``--device cuda`` lines run where a GPU is (skipped, and reported so, without one).
- ``make`` and ``pip`` lines: ``make -n`` shows the recipe running the ``ddps`` command that a
  line here runs, or CI (``.ci/run``) runs the target, or (``gpu-check``) its script parses.
- ``python`` blocks run; ``>>>`` blocks run as doctests.
"""
from __future__ import annotations

import doctest
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.markdown import tables

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

SYNTHETIC_SHRUNK = ["segmentor.iters=2", "train.iters=2", "train.batch_size=2", "segmentor.batch_size=2",
                    "data.synthetic.num_train=8", "data.synthetic.num_val=2", "data.synthetic.size=64",
                    "data.scale=[64,64]", "data.crop_size=[64,64]", "head.dim=16", "head.dim_mults=[1,2]",
                    "train.checkpoint_interval=1", "eval.panels=1"]
ADE = "/data/ADEChallengeData2016"
# the ade20k config cut down: the data at 64x64, a small DDPS head, a tiny SegFormer, the CPU
ADE_SHRUNK = ["device=cpu", "data.scale=[64,64]", "data.crop_size=[64,64]", "data.workers=0", "head.dim=16",
              "head.dim_mults=[1,2]", "head.num_timesteps=10", "train.batch_size=2", "train.iters=2",
              "train.warmup_iters=1", "eval.panels=0"]
BENCH_SHRUNK = ["--size", "16", "--repeats", "1"]
# DIFF's default inversion and widths cut down for the tiny Stable-Diffusion folder
DIFF_SHRUNK = ["segmentor.diff.timesteps=[50,25,10]", "segmentor.diff.save_steps=[1,2]",
               "segmentor.diff.projection=[16,16,32]", "segmentor.diff.projection_x4=16"]
SD = "segmentor.pretrained=/models/stable-diffusion-2-1"

ADE_ROOT = "data.root=/data/ADEChallengeData2016"


def line(text, subs=None, extra=(), expect=()):
    """A README line, the whole words replaced in it, the arguments appended, the files (relative
    to the scratch directory) it must write."""
    return text, dict(subs or {}), list(extra), list(expect)


# Groups of README lines that run in order, each group in its own scratch directory
COMMANDS = {
    "synthetic": [
        line("ddps train --out runs/synthetic", extra=SYNTHETIC_SHRUNK,
             expect=["runs/synthetic/eval.json", "runs/synthetic/panels"]),
        line("ddps train --out runs/synthetic --resume"),
        line("ddps train --config synthetic-gss --out runs/gss", extra=[*SYNTHETIC_SHRUNK, "prior.iters=2"],
             expect=["runs/gss/eval.json"]),
        line("ddps train --config synthetic-diff --out runs/synthetic-diff",
             extra=[*SYNTHETIC_SHRUNK, "data.synthetic.max_shapes=2"], expect=["runs/synthetic-diff/eval.json"]),
        line("ddps train --config synthetic-diff --out runs/synthetic-compact segmentor.type=compact "
             "segmentor.iters=2000 segmentor.lr_steps=[1500]", {"segmentor.lr_steps=[1500]": "segmentor.lr_steps=[1]"},
             extra=SYNTHETIC_SHRUNK, expect=["runs/synthetic-compact/eval.json"]),
        line("ddps eval --run runs/synthetic eval.mode=ms-flip", extra=["--limit", "1", "eval.scales=[1.0]"]),
        line("ddps eval --run runs/synthetic 'eval.datasets=[{name: shifted, synthetic: {domain: 1}}]'",
             extra=["--limit", "1"], expect=["runs/synthetic/eval.json"]),
        line("ddps segment --run runs/synthetic --out masks/ --steps --labels photo1.jpg photo2.png "
             "eval.inference_steps=4", expect=["masks/photo1.png", "masks/photo2_segmentor.png",
                                               "masks/photo1_step0.png", "masks/photo2_labels.png", "masks/legend.png"]),
        line("ddps frontier --run runs/synthetic --markdown benchmarks/FRONTIER.md",
             extra=["--limit", "1", "--steps", "1", "2", "--stop-below", "0.5"],
             expect=["benchmarks/FRONTIER.md", "runs/synthetic/frontier.json"]),
        line("ddps ablate --out runs/ablation --markdown benchmarks/ABLATIONS.md",
             extra=[*SYNTHETIC_SHRUNK, "--seeds", "1", "--only", "ddps"],
             expect=["runs/ablation/ablation.json", "benchmarks/ABLATIONS.md"]),
    ],
    "ade20k": [
        line("ddps train --config ade20k --out runs/ade20k data.root=/data/ADEChallengeData2016 train.iters=80000",
             {ADE_ROOT: "data.root={ade}"}, [*ADE_SHRUNK, "segmentor.pretrained={segformer}"],
             ["runs/ade20k/eval.json"]),
        line("torchrun --nproc_per_node 8 -m ddps train --config ade20k --out runs/ade20k data.root=...",
             {"8": "2", "runs/ade20k": "runs/ade20k-ddp", "data.root=...": "data.root={ade}"},
             [*ADE_SHRUNK, "segmentor.pretrained={segformer}"], ["runs/ade20k-ddp/eval.json"]),
        line("ddps train --config ade20k --out runs/ade20k-diff data.root=/data/ADEChallengeData2016 "
             f"segmentor.type=diffusion-features {SD} segmentor.channels=256 segmentor.iters=40000 segmentor.lr=6e-5 "
             "segmentor.weight_decay=0.01 segmentor.head_lr_mult=10 segmentor.lr_policy=poly segmentor.warmup_iters=1500 "
             "segmentor.warmup_ratio=1e-6",
             {ADE_ROOT: "data.root={ade}", SD: "segmentor.pretrained={sd}", "segmentor.iters=40000": "segmentor.iters=2",
              "segmentor.warmup_iters=1500": "segmentor.warmup_iters=1"},
             [*ADE_SHRUNK, *DIFF_SHRUNK], ["runs/ade20k-diff/eval.json"]),
        line("ddps convert iter_160000.pth --config ade20k --out runs/ddps-ade20k", extra=ADE_SHRUNK,
             expect=["runs/ddps-ade20k/model.safetensors"]),
        line("ddps eval --run runs/ddps-ade20k data.root=/data/ADEChallengeData2016 device=cpu",
             {ADE_ROOT: "data.root={ade}"}, ["--limit", "1"], ["runs/ddps-ade20k/eval.json"]),
    ],
    "bench": [
        line("ddps bench", extra=["--cases", "q_sample", *BENCH_SHRUNK]),
        line("ddps bench --cases LinearAttention head.sample --json r.json --csv r.csv --plot r.png", extra=BENCH_SHRUNK,
             expect=["r.json", "r.csv", "r.png"]),
        line("ddps bench --markdown", extra=["--cases", "q_sample", *BENCH_SHRUNK], expect=["benchmarks/RESULTS.md"]),
        line("ddps bench --list"),
        line("python benchmarks/winograd_accuracy.py", {"benchmarks/winograd_accuracy.py": str(ROOT / "benchmarks" /
                                                                                            "winograd_accuracy.py")},
             ["--channels", "8", "--size", "8", "--seeds", "1"]),
        # make demo's recipe (the README shows make demo)
        line("ddps demo", extra=["--batch", "1", "--size", "16", "--dim", "16", "--repeats", "1"]),
    ],
    "gpu": [line("ddps bench --full --device cuda", extra=["--cases", "q_sample", *BENCH_SHRUNK])],
}
# make targets: the ddps command the recipe runs (run above), or how else a test or CI runs it
MAKE = {
    "bench": "-m ddps bench", "demo": "-m ddps demo", "train": "-m ddps train --out runs/synthetic",
    "test": "ci", "cuda-build-check": "ci", "gpu-compile-check": "ci", "gpu-check": "script", "mutate": "mutate",
}
# make mutate as docs/testing.md gives it: its recipe is dry-run here, its driver's parts are tested in
# tests/test_mutate.py (a real mutmut run takes minutes)
MUTATE = 'make mutate MODULES="ddps/app/schema.py ddps/app/preflight.py"'
PIP = {"pip install torch": 'pip install "torch==', 'pip install --no-build-isolation -e ".[dev]"':
       'pip install --no-build-isolation -e ".[dev]"'}


def blocks(language: str, path: Path | None = None) -> list[str]:
    """The ``language`` blocks of one page, or of all of them."""
    texts = [path.read_text()] if path else [p.read_text() for p in DOCS]
    return [b for text in texts for b in re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)]


def documented_commands() -> list[str]:
    lines = [text.split("  #")[0].strip() for block in blocks("bash") for text in block.splitlines()]
    return [text for text in lines if text]


@pytest.mark.parametrize("page", ["README.md", *(f"{d}/{p.name}" for d in ("docs", "benchmarks")
                                                   for p in sorted((ROOT / d).glob("*.md")))])
def test_markdown_tables_are_well_formed(page):
    # a row with more or fewer cells than its header renders as something else than was meant
    tables((ROOT / page).read_text())


def test_every_documented_command_is_run_here():
    documented = documented_commands()
    run = [text for group in COMMANDS.values() for text, *_ in group]
    known = {*run, *(f"make {t}" for t in MAKE if t != "mutate"), MUTATE, *PIP}
    assert [c for c in documented if c not in known] == [], "commands that no test runs: add them here"
    assert [c for c in known if c not in documented and c != "ddps demo"] == [], "gone from the README and docs/"


def _make_dry_run(target: str, *extra: str) -> str:
    # -o: the venv stamp counts as up to date, so only the target's own recipe is printed
    out = subprocess.run(["make", "-n", "-o", ".venv/.ddps-installed", *extra, target], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("target", sorted(MAKE))
def test_make_targets(target):
    how = MAKE[target]
    if how == "ci":
        assert f"make {target} || exit 1" in (ROOT / ".ci" / "run").read_text()
    elif how == "mutate":
        modules = MUTATE.split('MODULES="')[1].rstrip('"')
        assert f".ci/mutate.py {modules}" in _make_dry_run(target, f"MODULES={modules}")
    elif how == "script":
        assert ".ci/gpu_check.sh" in _make_dry_run(target)
        assert subprocess.run(["bash", "-n", str(ROOT / ".ci" / "gpu_check.sh")]).returncode == 0
    else:
        assert how in _make_dry_run(target)
        run = [text for group in COMMANDS.values() for text, *_ in group]
        assert f"ddps {how.removeprefix('-m ddps ')}" in run  # and that command runs below


def test_pip_commands_are_the_install_recipe():
    out = subprocess.run(["make", "-n", "-B", "install"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for line in PIP.values():
        assert line in out.stdout, line


def test_readme_python_block():
    (usage,) = blocks("python", ROOT / "README.md")
    namespace: dict = {}
    exec(compile(usage, "README.md", "exec"), namespace)
    assert set(namespace["collected"]) == {0, 10, 19} and namespace["final_logits"].shape == (1, 151, 64, 64)
    assert namespace["x_t"].shape == namespace["x_t_ref"].shape == (4, 128, 128)
    assert namespace["logits"].shape == (1, 151, 64, 64)
    assert namespace["out"].shape == (2, 64, 32, 32)


@pytest.mark.parametrize("page", [p for p in DOCS if p.name != "README.md" and blocks("python", p)], ids=lambda p: p.name)
def test_docs_python_blocks(page):
    for block in blocks("python", page):
        if block.startswith(">>>"):
            result = doctest.DocTestRunner().run(doctest.DocTestParser().get_doctest(block, {}, page.name, str(page), 0))
            assert result.attempted > 0 and result.failed == 0
        else:
            exec(compile(block, str(page), "exec"), {})


def scratch(d: Path) -> None:
    """What the commands read, in their directory: two photos, a tiny ADE20K-layout folder, a tiny
    local SegFormer, a tiny diffusers Stable-Diffusion folder and an original DDPS checkpoint
    (iter_160000.pth) at MiT-B0 size."""
    transformers = pytest.importorskip("transformers")
    from helpers.app import mmseg_b0_state

    from ddps.app import config
    from ddps.app.model import build_head

    rng = np.random.default_rng(0)
    for name in ("photo1.jpg", "photo2.png"):
        Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(d / name)
    for split in ("training", "validation"):
        for kind in ("images", "annotations"):
            (d / "ade" / kind / split).mkdir(parents=True)
        for i in range(2):
            image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(image).save(d / "ade" / "images" / split / f"ADE_{split}_{i}.jpg")
            mask = rng.integers(0, 151, (64, 64), dtype=np.uint8)
            Image.fromarray(mask).save(d / "ade" / "annotations" / split / f"ADE_{split}_{i}.png")
    tiny = transformers.SegformerConfig(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32],
                                        num_attention_heads=[1, 1, 1, 1], decoder_hidden_size=24, num_labels=150)
    transformers.SegformerForSemanticSegmentation(tiny).save_pretrained(d / "segformer")
    from helpers.app import pretrained_folder
    pretrained_folder(d / "sd")
    cfg = config.load(config.find("ade20k"), ADE_SHRUNK, reads_data=False)
    state = mmseg_b0_state(torch.Generator().manual_seed(0))
    state.update({"decode_head." + k: v for k, v in build_head(cfg, 16, for_training=True).state_dict().items()})
    torch.save({"state_dict": state}, d / "iter_160000.pth")


def _place(word: str, scratch_dir: Path) -> str:
    # the scratch folders in place of {ade}, {segformer}, {sd} (str.format would read YAML's braces)
    for name in ("ade", "segformer", "sd"):
        word = word.replace(f"{{{name}}}", str(scratch_dir / name))
    return word


@pytest.mark.parametrize("group", list(COMMANDS))
def test_documented_commands(group, tmp_path, monkeypatch):
    if group == "gpu" and not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    from ddps.app.cli import main

    scratch(tmp_path)
    monkeypatch.chdir(tmp_path)
    for text, subs, extra, expect in COMMANDS[group]:
        words = [_place(subs.get(w, w), tmp_path) for w in [*shlex.split(text), *extra]]
        if words[0] == "ddps":  # the command line's own entry, in this process (tests/app runs `python -m ddps`)
            assert main(words[1:]) == 0, " ".join(words)
        else:  # torchrun and python scripts: processes of their own
            runner = ["-m", "torch.distributed.run"] if words[0] == "torchrun" else []
            out = subprocess.run([sys.executable, *runner, *words[1:]], cwd=tmp_path,
                                 capture_output=True, text=True, timeout=600)
            assert out.returncode == 0, f"{' '.join(words)}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
        assert [f for f in expect if not (tmp_path / f).exists()] == [], text
