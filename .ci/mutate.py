"""make mutate: mutation testing (mutmut) of the modules given, against the tests of their area.

    python .ci/mutate.py ddps/app/schema.py ddps/app/preflight.py [--tests tests/app/test_schema.py ...]

mutmut runs in a copy of the checkout (build/mutate/: the files git tracks or would add, and the
compiled ddps/_C*.so), never in the checkout itself. Its settings go into that copy's
pyproject.toml: the package to copy, only the given modules mutated, the given tests (by
default, tests/<the module's package>/: tests/app/ for ddps/app/..., as the tests mirror the
package), run under its fork server (torch is not fork-safe). The report: how many mutants each
module had, how many the tests killed and how many survived, and each survivor's diff, which is
what a person reads to decide whether the mutant changes a result (a missing test) or not (a
harmless mutant)."""
from __future__ import annotations

import argparse
import collections
import fnmatch
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "build" / "mutate"


def default_tests(module: Path) -> Path:
    """The tests of a module's area: tests/ mirrors ddps/ (ddps/app/x.py -> tests/app/)."""
    parts = module.with_suffix("").parts[1:-1]  # ddps/app/data/files.py -> (app, data)
    for depth in range(len(parts), 0, -1):
        folder = Path("tests", *parts[:depth])
        if (ROOT / folder).is_dir():
            return folder
    return Path("tests")


# setup.py's PACKAGE_DIR: the packages installed from folders outside ddps/
INSTALLED_AS = {"kernels": "ddps/kernels", "configs": "ddps/configs"}


def copy_checkout() -> None:
    """The checkout's files into WORK, with the compiled extension, and the folders that install
    into the package (kernels/, configs/) inside ddps/ as installed: mutmut imports the package
    from its own copy of ddps/, where the editable install's mapping does not reach."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    files += [str(p.relative_to(ROOT)) for p in (ROOT / "ddps").glob("_C*.so")]
    shutil.rmtree(WORK, ignore_errors=True)
    for name in filter(None, files):
        source = ROOT / name
        if not source.is_file():
            continue
        top, _, rest = name.partition("/")
        for target in {WORK / name, *([WORK / INSTALLED_AS[top] / rest] if top in INSTALLED_AS else [])}:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def settings(modules: list[Path], tests: list[Path], rest: list[str]) -> str:
    """mutmut's settings; ``rest``: the checkout's other top-level entries, which it copies beside
    the package (the tests read README.md, configs/, ... from the folder above tests/)."""
    quoted = lambda items: "[" + ", ".join(f'"{item}"' for item in items) + "]"  # noqa: E731
    return ("\n[tool.mutmut]\n"
            'source_paths = ["ddps/"]\n'
            f"also_copy = {quoted(rest)}\n"
            f"only_mutate = {quoted(modules)}\n"
            f"pytest_add_cli_args_test_selection = {quoted(tests)}\n"
            'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q"]\n'
            'process_isolation = "forkserver"\n'
            "use_git_change_detection = false\n")


def mutmut(*args: str, check: bool = True) -> str:
    # its console script: under python -m its module would be imported twice (mutmut warns so)
    result = subprocess.run([str(Path(sys.executable).parent / "mutmut"), *args], cwd=WORK, capture_output=True,
                            text=True)
    if check and result.returncode != 0:
        sys.exit(f"mutmut {' '.join(args)} failed ({result.returncode}):\n{result.stdout[-4000:]}{result.stderr[-4000:]}")
    return result.stdout


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="+", type=Path, help="modules to mutate (paths under ddps/)")
    parser.add_argument("--tests", nargs="+", type=Path, help="the tests to run (default: each module's area)")
    parser.add_argument("--only", nargs="+", metavar="PATTERN", default=[],
                        help="only the mutants whose names match (fnmatch), e.g. 'ddps.app.ablation.x_markdown*'")
    parser.add_argument("--max-children", type=int, help="parallel mutants (default: the CPU count)")
    args = parser.parse_args(argv)
    bad = [str(m) for m in args.modules if m.parts[:1] != ("ddps",) or not (ROOT / m).is_file()]
    if bad:
        parser.error(f"not a module under ddps/: {' '.join(bad)}")
    tests = args.tests or sorted({default_tests(m) for m in args.modules})
    copy_checkout()
    with open(WORK / "pyproject.toml", "a") as f:
        f.write(settings(args.modules, tests, sorted(p.name for p in WORK.iterdir() if p.name != "ddps")))
    print(f"mutating {' '.join(map(str, args.modules))} against {' '.join(map(str, tests))} in {WORK}", flush=True)
    mutmut("run", *(["--max-children", str(args.max_children)] if args.max_children else []), *args.only)
    return report(mutmut("results", "--all", "true"), args.only)


def report(results: str, only=()) -> int:
    statuses = {key: status for key, status in re.findall(r"^\s+(\S+): (.+)$", results, re.M)
                if not only or any(fnmatch.fnmatch(key, pattern) for pattern in only)}
    by_module = collections.defaultdict(collections.Counter)
    for key, status in statuses.items():
        by_module[re.sub(r"\.x[_ǁ].*", "", key)][status] += 1
    print(f"\n{'module':40s} {'mutants':>8s} {'killed':>7s} {'survived':>9s}  other")
    for module, counts in sorted(by_module.items()):
        other = ", ".join(f"{n} {s}" for s, n in counts.items() if s not in ("killed", "survived")) or "-"
        print(f"{module:40s} {sum(counts.values()):8d} {counts['killed']:7d} {counts['survived']:9d}  {other}")
    survivors = [key for key, status in statuses.items() if status != "killed"]
    for key in survivors:
        print("\n" + mutmut("show", key, check=False).rstrip())
    print(f"\n{len(statuses)} mutants, {len(statuses) - len(survivors)} killed, {len(survivors)} not killed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
