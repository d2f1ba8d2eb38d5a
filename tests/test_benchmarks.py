"""The accelerator benchmark's tiny CPU run: the command that a lent GPU or Gaudi runs for
minutes must not have rotted in between."""
import ast
import importlib
import importlib.util
import sys

import pytest

from conftest import REPO, run_script


@pytest.mark.integration
def test_gpu_benchmark_runs_tiny_on_a_cpu(tmp_path, shared):
    out = tmp_path / "table.md"
    proc = run_script("benchmarks/gpu.py", "--device", "cpu", "--n", "4",
                      "--images", shared / "nih_sample" / "images", "--out", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = out.read_text()
    assert table in proc.stdout
    assert "TINY run" in table and "Device: **" in table
    rows = [ln for ln in table.splitlines() if ln.startswith("| ")][2:]
    labels = [ln.split(" | ")[0][2:] for ln in rows]
    assert labels == ["train, fp32", "train, AMP bf16", "train, AMP bf16 + channels_last",
                      "train, AMP bf16 + channels_last + torch.compile",
                      "loader, PNG (4 workers)", "loader, store 512 (4 workers)",
                      "ten-crop eval, --mode torch --amp --channels-last (4 workers)"]
    for row in rows[:3] + rows[4:]:
        assert float(row.split(" | ")[2]) > 0, row
    assert rows[3].split(" | ")[1:3] == ["-", "-"]  # compiling takes minutes: not in a tiny run
    assert "torch.compile: left out, a tiny run" in table
    # main.py's default here against fp32: on a CPU without native bf16, fp32 itself
    default = next(ln for ln in table.splitlines() if ln.startswith("- main.py's default here: "))
    assert "fp32 itself, nothing to gain" in default or "x fp32's images/s" in default, default
    assert (REPO / "docs" / "benchmarks.md").read_text().count(
        "| measurement | batch | images/s | peak memory GiB |") == 1


def test_every_benchmark_imports_names_that_exist(monkeypatch):
    """A benchmark is run by hand, months apart: the project names it imports (at the top or
    inside functions, from the scripts, the other benchmarks or the tests' helpers) must still
    exist after the code moved."""
    folders = (REPO, REPO / "benchmarks", REPO / "tests")
    project = {p.stem for folder in folders for p in folder.glob("*.py")}
    # last on the path: benchmarks/subgroups.py must not hide the project's subgroups.py
    monkeypatch.syspath_prepend(str(REPO))
    sys.path.append(str(REPO / "benchmarks"))
    missing = []
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in project and not node.level:
                module = importlib.import_module(node.module)
                missing += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                            if not hasattr(module, a.name)]
            elif isinstance(node, ast.Import):
                missing += [f"{path.name}: import {a.name}" for a in node.names
                            if a.name.split(".")[0] in project
                            and importlib.util.find_spec(a.name) is None]
    sys.path.remove(str(REPO / "benchmarks"))
    assert not missing, missing
