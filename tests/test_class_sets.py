"""Class sets are first-class: a model of any class count (here 5 and 1) goes through every
path a 14-class one does: training, resume, export (FP32, INT8 with accuracy control, the
INT8-vs-FP32 comparison), the three evaluation modes, --image, --calibrated, --cam, the report,
report.py compare and localization over the box findings it shares with NIH. And the
project's modules import each other without a cycle."""
import ast
import csv
import gzip
import json
import os

import numpy as np
import pytest

from conftest import REPO, TINY, run_script
from labels import NIH_CLASSES, write_list
from tables import read_label_table

FIVE = ["Atelectasis", "Cardiomegaly", "Effusion", "Mass", "Nodule"]  # all have NIH boxes
ONE = ["Cardiomegaly"]


def _boxed_names(shared):
    with gzip.open(shared / "BBox_List_2017.csv.gz", "rt") as f:
        return {row[0] for row in csv.reader(f)}


def class_subset_dir(root, shared, nih_images, classes):
    """NIH images with lists that label only `classes` (a `# classes:` header), the images
    NIH boxed split between val and test."""
    image_dir, table = nih_images
    root.mkdir(parents=True)
    os.symlink(image_dir, root / "images")
    (root / "Data_Entry_2017_v2020.csv").write_bytes(table.read_bytes())
    names, _, labels = read_label_table(table)
    columns = [NIH_CLASSES.index(c) for c in classes]
    boxed = [i for i, n in enumerate(names) if n in _boxed_names(shared)]
    rest = [i for i in range(len(names)) if i not in set(boxed)]
    parts = {"train": rest[:48], "val": rest[48:88] + boxed[::2],
             "test": rest[88:128] + boxed[1::2]}
    header = {"classes": classes, "images": "images"}
    for split, rows in parts.items():
        write_list(root / f"{split}_list.txt", [names[i] for i in rows],
                   labels[rows][:, columns].astype(np.float32), header)
    return root


def _ok(proc):
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def _header(path):
    return path.read_text().splitlines()[0].split(",")[1:]


@pytest.mark.integration
@pytest.mark.parametrize("classes", [FIVE, ONE], ids=["5-classes", "1-class"])
def test_a_model_of_any_class_count_goes_through_every_path(classes, tmp_path, shared,
                                                              nih_images):
    data = class_subset_dir(tmp_path / "data", shared, nih_images, classes)
    run, models = tmp_path / "run", tmp_path / "models"
    tiny = [str(a) for a in TINY]
    tiny[tiny.index("--data-dir") + 1] = str(data)
    # training, then resume for one more epoch
    _ok(run_script("main.py", *tiny, "--epochs", "1", "--out-dir", run))
    resumed = _ok(run_script("main.py", *tiny, "--epochs", "2", "--out-dir", run))
    assert "resuming from" in resumed.stdout
    import torch
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["class_names"] == classes and ckpt["epoch"] == 2
    assert ckpt["model"]["classifier.weight"].shape[0] == len(classes)
    # export: FP32, INT8 (accuracy-controlled for the 5 classes), the INT8-vs-FP32 check
    extra = ["--max-auc-drop", "0.5"] if len(classes) == 5 else []
    exported = _ok(run_script("infer.py", "--export", "--checkpoint", run / "best.pt",
                              "--model-dir", models, "--calibration-size", "20",
                              "--validation-size", "20", *extra))
    assert "INT8 vs FP32 on" in exported.stdout
    meta = json.loads((models / "chexnet.json").read_text())
    assert meta["class_names"] == classes
    # the three evaluation modes; val first (operating points), then test, then calibrated
    for mode in ("fp32", "int8"):
        _ok(run_script("infer.py", "--mode", mode, "--part", "val", "--model-dir", models,
                       "--n-boot", "100", "--no-figures"))
    for mode in ("fp32", "int8", "torch"):
        evaluated = _ok(run_script("infer.py", "--mode", mode, "--model-dir", models,
                                   "--n-boot", "100", *(["--no-figures"] if mode != "fp32" else [])))
        assert _header(models / f"predictions_{mode}.csv") == classes
        report = json.loads((models / f"predictions_{mode}_report.json").read_text())
        assert list(report["diseases"]) == classes, evaluated.stdout
    assert (models / "predictions_fp32_roc.png").is_file()
    calibrated = _ok(run_script("infer.py", "--mode", "int8", "--calibrated", "--model-dir",
                                models, "--out-csv", tmp_path / "calibrated.csv", "--n-boot",
                                "100", "--no-figures"))
    assert _header(tmp_path / "calibrated.csv") == classes, calibrated.stdout
    # --image with heatmaps, in an OpenVINO mode and in torch
    image = data / "images" / (data / "test_list.txt").read_text().splitlines()[3].split()[0]
    for mode in ("int8", "torch"):
        shown = _ok(run_script("infer.py", "--mode", mode, "--model-dir", models, "--image",
                               image, "--cam", tmp_path / f"cams-{mode}"))
        assert all(c in shown.stdout for c in classes)
        assert len(list((tmp_path / f"cams-{mode}").glob("*.png"))) >= 2
    # the report of a predictions file, and the paired comparison
    _ok(run_script("report.py", models / "predictions_fp32.csv", "--data-dir", data,
                   "--n-boot", "100", "--no-figures"))
    compared = _ok(run_script("report.py", "compare", models / "predictions_fp32.csv",
                              models / "predictions_int8.csv", "--data-dir", data,
                              "--n-boot", "100"))
    assert all(c in compared.stdout for c in classes)
    # localization over the box findings the model shares with NIH
    _ok(run_script("infer.py", "--mode", "fp32", "--model-dir", models, "--localize",
                   "--localize-tau", "0.5"))
    result = json.loads((models / "localization_fp32.json").read_text())
    scored = set(result["methods"]["model"]["test"]) - {"overall"}
    assert scored and scored <= set(classes), result["methods"]["model"]["test"]


def _project_modules():
    """{module name: path}: the flat modules and the node package's (node.core, ...)."""
    modules = {p.stem: p for p in REPO.glob("*.py")}
    modules.update({f"node.{p.stem}": p for p in (REPO / "node").glob("*.py")
                    if p.stem != "__init__"})
    return modules


def _all_imports():
    """{module: the project modules it imports}, with the imports inside functions too: a
    cycle hidden there is still a cycle."""
    modules = _project_modules()

    def named(module):  # "node.core" is node/core.py; "images" (or "images.x") images.py
        return module if module in modules else module.split(".")[0]
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {named(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(named(node.module))
                if node.module == "node":  # from node import spool
                    found |= {f"node.{a.name}" for a in node.names}
        graph[name] = sorted(found & set(modules) - {name})
    return graph


def _cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle_among_the_project_modules():
    graph = _all_imports()
    assert set(graph) >= {"main", "infer", "dataset", "model", "labels", "checkpoint"}
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert _cycle({"a": ["b"], "b": []}) is None


def test_no_private_helper_is_imported_from_another_module():
    for path in _project_modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports {private} from {node.module}"


def test_nih_classes_are_never_a_default():
    """No function of the project defaults its class names to NIH's list."""
    for path in REPO.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                defaults = node.args.defaults + [d for d in node.args.kw_defaults if d]
                names = {n.id for d in defaults for n in ast.walk(d) if isinstance(n, ast.Name)}
                assert "NIH_CLASSES" not in names, f"{path.name}:{node.lineno} {node.name}"


def test_the_readme_code_map_names_every_module():
    readme = (REPO / "README.md").read_text()
    start = readme.index("## Code map")
    section = readme[start:readme.index("\n## ", start + 1)]
    for path in sorted(REPO.glob("*.py")) + sorted(REPO.glob("*.sh")):
        assert f"`{path.name}`" in section, f"{path.name} missing from the README's code map"
    for path in sorted((REPO / "node").glob("*.py")):
        if path.stem != "__init__":
            assert f"`node/{path.name}`" in section, f"node/{path.name} missing from the map"
    import re
    mentioned = {m for m in re.findall(r"`([\w.-]+\.(?:py|sh))`", section)}
    assert mentioned <= {p.name for p in REPO.glob("*")}, mentioned - {p.name for p in REPO.glob("*")}
