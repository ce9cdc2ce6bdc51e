"""make mutate's driver (.ci/mutate.py): which tests a module's mutants run against, mutmut's
settings, and the report read back from mutmut's results."""
import importlib.util

import pytest

from helpers import ROOT

spec = importlib.util.spec_from_file_location("mutate", ROOT / ".ci" / "mutate.py")
mutate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mutate)


@pytest.mark.parametrize("module,tests", [("ddps/app/schema.py", "tests/app"), ("ddps/app/data/files.py", "tests/app"),
                                          ("ddps/nn/gss.py", "tests/nn"), ("ddps/maskige.py", "tests")])
def test_a_modules_tests_are_its_areas(module, tests):
    assert str(mutate.default_tests(mutate.Path(module))) == tests


def test_settings_mutate_only_the_modules_given():
    text = mutate.settings([mutate.Path("ddps/app/schema.py")], [mutate.Path("tests/app/test_schema.py")],
                           ["README.md", "configs"])
    assert 'only_mutate = ["ddps/app/schema.py"]' in text
    assert 'pytest_add_cli_args_test_selection = ["tests/app/test_schema.py"]' in text
    assert 'process_isolation = "forkserver"' in text and 'also_copy = ["README.md", "configs"]' in text


def test_report_counts_each_module(capsys, monkeypatch):
    monkeypatch.setattr(mutate, "mutmut", lambda *args, check=True: f"--- diff of {args[1]}")
    results = ("    ddps.app.schema.x_option__mutmut_1: killed\n    ddps.app.schema.x_option__mutmut_2: survived\n"
               "    ddps.app.runlock.x__read__mutmut_1: no tests\n")
    assert mutate.report(results) == 0
    out = capsys.readouterr().out
    assert "ddps.app.schema" in out and "--- diff of ddps.app.schema.x_option__mutmut_2" in out
    lines = {line.split()[0]: line.split()[1:4] for line in out.splitlines() if line.startswith("ddps.app.")}
    assert lines == {"ddps.app.schema": ["2", "1", "1"], "ddps.app.runlock": ["1", "0", "0"]}
    assert out.rstrip().endswith("3 mutants, 1 killed, 2 not killed")
    assert mutate.report(results, ["ddps.app.runlock.*"]) == 0  # --only: those mutants alone
    assert capsys.readouterr().out.rstrip().endswith("1 mutants, 0 killed, 1 not killed")


def test_only_modules_of_the_package(capsys):
    with pytest.raises(SystemExit):
        mutate.main(["setup.py"])
    assert "not a module under ddps/: setup.py" in capsys.readouterr().err
