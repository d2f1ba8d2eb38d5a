"""Shared fixtures: the real NIH material beside the repository (../shared/data) and helpers
to run the scripts as a user would."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CHEXNET_SHARED_DATA", REPO.parent / "shared" / "data"))
sys.path.insert(0, str(REPO))

from dataset import read_label_table, write_list  # noqa: E402


def run_script(*args, env=None, timeout=600, cwd=REPO):
    """Run a repository script with this interpreter; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


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
    from dataset import patient_split
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


@pytest.fixture
def nih_data_dir(tmp_path, nih_images):
    """A small data directory of 30 full-size NIH images, RGBA ones included."""
    from PIL import Image
    image_dir, table = nih_images
    names = sorted(p.name for p in image_dir.iterdir())
    rgba = [n for n in names if Image.open(image_dir / n).mode == "RGBA"][:3]
    chosen = rgba + [n for n in names if n not in rgba][:27]
    return make_data_dir(tmp_path / "data", image_dir, table, chosen)
