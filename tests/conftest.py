"""Shared fixtures: the real NIH material beside the repository (../shared/data) and helpers
to run the scripts as a user would."""
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CHEXNET_SHARED_DATA", REPO.parent / "shared" / "data"))
sys.path.insert(0, str(REPO))

from labels import write_list  # noqa: E402
from tables import read_label_table  # noqa: E402

# The tiny configuration: the real code on the bundled sample, 64x64 images, 56x56 crops,
# random initial weights, no loader workers (seconds per epoch on a CPU).
TINY = ["--data-dir", REPO / "sample", "--pretrained", "none", "--resize", "64",
        "--train-size", "64", "--crop-size", "56", "--batch-size", "8", "--workers", "0"]


# Three tiers, by what a test needs (README, Tests): `unit` (no model, no process, no script
# run), `integration` (scripts run in this process or as one process, on the tiny models trained
# once per pytest run), `system` (torchrun, kill -9, Orthanc and DCMTK, the edge environment,
# run.sh, the node's worker processes). A test without a tier mark is a unit test, and the guard
# below fails it if it starts a process or runs a script; a test that is not `system` fails if
# it starts what only system tests may. multiprocessing's workers are not seen by the guard:
# tests that start them are marked `system` by hand.
TIERS = ("unit", "integration", "system")
SYSTEM_PROGRAMS = ("torchrun", "torch.distributed.run", "Orthanc", "storescu", "storescp",
                   "findscu", "movescu", "dsrdump", "dciodvfy", "run.sh", ".venv-edge")


def pytest_configure(config):
    config.addinivalue_line("markers", "unit: no model, no process (the default tier)")
    config.addinivalue_line("markers", "integration: runs scripts on the shared tiny models")
    config.addinivalue_line("markers", "system: torchrun, kill -9, Orthanc, the edge venv")


def pytest_collection_modifyitems(config, items):
    for item in items:
        marked = [t for t in TIERS if item.get_closest_marker(t)]
        if len(marked) > 1:
            raise pytest.UsageError(f"{item.nodeid}: marked {' and '.join(marked)}: one tier")
        if not marked:
            item.add_marker(pytest.mark.unit)
    # unit first, then integration, then system: a broken function fails in the first minute
    items.sort(key=lambda item: TIERS.index(tier_of(item)))


def tier_of(item):
    return next(t for t in TIERS if item.get_closest_marker(t))


TIER_SECONDS = {}  # tier: [tests, seconds of setup + call + teardown]


def pytest_runtest_logreport(report):
    if report.when == "setup":
        TIER_SECONDS.setdefault(report.tier, [0, 0.0])[0] += 1
    TIER_SECONDS[report.tier][1] += report.duration


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    outcome.get_result().tier = tier_of(item)


def pytest_terminal_summary(terminalreporter):
    if TIER_SECONDS:
        terminalreporter.write_sep("=", "time per tier (a shared model counts where first used)")
        for name in TIERS:
            if name in TIER_SECONDS:
                count, seconds = TIER_SECONDS[name]
                terminalreporter.write_line(f"{name:<12} {count:4d} tests {seconds / 60:6.1f} min")


@pytest.fixture(autouse=True)
def _tier_guard(request, monkeypatch):
    """A unit test that starts a process, or a test below `system` that starts torchrun,
    Orthanc, DCMTK, the edge python or run.sh, fails saying which tier it belongs to."""
    this = tier_of(request.node)
    if this == "system":
        return
    popen_init = subprocess.Popen.__init__

    def guarded(self, args, *a, **k):
        command = " ".join(map(str, args)) if isinstance(args, (list, tuple)) else str(args)
        if this == "unit":
            pytest.fail(f"a unit test starts a process ({command[:80]}): mark it integration")
        if any(p in command for p in SYSTEM_PROGRAMS):
            pytest.fail(f"an integration test starts {command[:80]}: mark it system")
        popen_init(self, args, *a, **k)
    monkeypatch.setattr(subprocess.Popen, "__init__", guarded)
    monkeypatch.setattr(sys.modules[__name__], "UNIT", this == "unit")


UNIT = False  # True while a unit test runs: run_main refuses (a script run is integration)


def run_script(*args, env=None, timeout=600, cwd=REPO):
    """Run a repository script with this interpreter; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def run_main(capsys, *argv, module="main"):
    """A script's main() in this process (no interpreter start-up, ~5 s here with torch):
    returns returncode/stdout/stderr like run_script, and the value main() returned."""
    import importlib
    if UNIT:
        pytest.fail(f"a unit test runs {module}.main(): mark it integration")
    script = importlib.import_module(module)
    capsys.readouterr()
    try:
        value, code = script.main([str(a) for a in argv]), 0
    except SystemExit as e:
        value, code = None, e.code if isinstance(e.code, int) else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err, value=value)


def assert_clean_error(proc, *fragments):
    """A bad input ends the script with a one-line error naming the culprit, no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="session")
def shared():
    if not SHARED.is_dir():
        pytest.skip(f"real NIH material not found at {SHARED} (set CHEXNET_SHARED_DATA)")
    return SHARED


@pytest.fixture(scope="session")
def nih_images(shared):
    """All 480 original 1024x1024 NIH images (474 grayscale, 6 RGBA) and their table rows."""
    return shared / "nih_sample" / "images", shared / "nih_sample" / "Data_Entry_2017_v2020_sample.csv"


def make_data_dir(root, image_dir, table, names=None, splits=(0.6, 0.2, 0.2)):
    """A data directory as NIH ships it (images/ + label table) with its own list files."""
    from splitting import patient_split
    root = Path(root)
    (root / "images").mkdir(parents=True)
    all_names, patients, labels = read_label_table(table)
    keep = [i for i, n in enumerate(all_names) if names is None or n in set(names)]
    for i in keep:
        shutil.copy(Path(image_dir) / all_names[i], root / "images" / all_names[i])
    shutil.copy(table, root / "Data_Entry_2017_v2020.csv")
    import numpy as np
    keep = np.array(keep)
    for split, idx in patient_split(patients[keep], splits, seed=0).items():
        write_list(root / f"{split}_list.txt", [all_names[i] for i in keep[idx]], labels[keep[idx]])
    return root


@pytest.fixture(scope="session")
def nih_dir(tmp_path_factory, nih_images):
    """The 480 full-size NIH images (linked, not copied), one per patient: 40 train, 100 val,
    340 test."""
    image_dir, table = nih_images
    root = tmp_path_factory.mktemp("nih")
    os.symlink(image_dir, root / "images")
    names, _, labels = read_label_table(table)
    (root / "Data_Entry_2017_v2020.csv").write_bytes(table.read_bytes())
    for split, part in (("train", slice(0, 40)), ("val", slice(40, 140)), ("test", slice(140, None))):
        write_list(root / f"{split}_list.txt", names[part], labels[part])
    return root


@pytest.fixture(scope="session")
def small_model(tmp_path_factory, nih_dir):
    """A small model trained briefly on 56x56 crops of the sample, exported by infer.sh."""
    work = tmp_path_factory.mktemp("small")
    proc = run_script("main.py", *TINY, "--epochs", "2", "--out-dir", work / "run")
    assert proc.returncode == 0, proc.stderr
    export = subprocess.run(
        ["bash", "infer.sh", work / "run" / "best.pt", "--model-dir", work / "models",
         "--data-dir", nih_dir, "--calibration-size", "60", "--validation-size", "40"],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "VENV": sys.prefix})
    assert export.returncode == 0, export.stdout + export.stderr
    return work, export


@pytest.fixture(scope="session")
def full_size_model(tmp_path_factory, nih_dir):
    """A random DenseNet-121 at the real 224x224, exported (calibrated on 4 val images)."""
    import torch
    from model import build_model
    work = tmp_path_factory.mktemp("full")
    torch.manual_seed(0)
    torch.save(build_model(pretrained="none").state_dict(), work / "random.pt")
    proc = run_script("infer.py", "--export", "--checkpoint", work / "random.pt", "--model-dir",
                      work / "models", "--data-dir", nih_dir, "--calibration-size", "4",
                      "--validation-size", "2")
    assert proc.returncode == 0, proc.stderr
    return work


# `python -c CODE infer.py ARGS`: `import torch` made to fail, then infer.py run as a script.
BLOCK_TORCH = """
import runpy, sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision"):
            raise ImportError(f"No module named {name!r} (blocked by the test)")
sys.meta_path.insert(0, NoTorch())
sys.argv = sys.argv[1:]
runpy.run_path("infer.py", run_name="__main__")
assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "nncf")]
"""


@pytest.fixture
def nih_data_dir(tmp_path, nih_images):
    """A small data directory of 30 full-size NIH images, RGBA ones included."""
    from PIL import Image
    image_dir, table = nih_images
    names = sorted(p.name for p in image_dir.iterdir())
    rgba = [n for n in names if Image.open(image_dir / n).mode == "RGBA"][:3]
    chosen = rgba + [n for n in names if n not in rgba][:27]
    return make_data_dir(tmp_path / "data", image_dir, table, chosen)


def pre_041_state(model, prefix=""):
    """A state dict as PyTorch < 0.4.1 wrote it (torchvision's densenet121-a639ec97.pth, the
    original CheXNet checkpoints): old DenseNet key names and no num_batches_tracked."""
    old = {}
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        for layer in ("norm", "relu", "conv"):
            for i in ("1", "2"):
                key = key.replace(f".{layer}{i}.", f".{layer}.{i}.")
        old[prefix + key] = value
    return old
