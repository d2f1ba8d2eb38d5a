"""The optional packages (matplotlib, pydicom, pandas, scipy, openvino), each imported here and
nowhere else. (tqdm is optional too: without it infer.py prints plain progress lines.)

An edge box installs requirements-edge.txt, and a user may install less (only openvino, numpy,
pillow and scikit-learn, say). Whatever is missing, the command that needs it ends in one line
naming the package and the pip command that installs it (MissingPackage is a DataError, so every
script's error handler prints it as `error: ...`), never in a traceback from deep inside.
Each function imports on first call (the packages are heavy, and optional) and returns the module.
"""
from common import DataError, one_line


class MissingPackage(DataError):
    """An optional package is not installed (or is broken): one line, with the pip command."""


def _require(module, package, purpose, pip=None):
    """`import module`, or MissingPackage naming `package` and `pip install ...`."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:  # also a package whose own dependency is missing or broken
        missing = getattr(e, "name", None)
        if not missing:  # a broken install: a library the package loads is missing
            because = f" ({one_line(e)})"
        elif missing.split(".")[0] != module.split(".")[0]:
            because = f" (its dependency {missing!r} is missing)"
        else:
            because = ""
        raise MissingPackage(f"{purpose} needs the {package} package{because}: "
                             f"pip install {pip or package}") from None


def pyplot(purpose="drawing figures"):
    """matplotlib.pyplot on the Agg back end (files only: no display needed)."""
    matplotlib = _require("matplotlib", "matplotlib", purpose)
    matplotlib.use("Agg")
    return _require("matplotlib.pyplot", "matplotlib", purpose)


def colormap(name, purpose="drawing heatmaps"):
    """A matplotlib colour map: (...) floats in [0, 1] -> (..., 4) RGBA floats."""
    return _require("matplotlib", "matplotlib", purpose).colormaps[name]


DICOM_PIP = "pydicom pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg"


def pydicom(purpose="reading DICOM"):
    """pydicom, with its pixel and value submodules loaded."""
    module = _require("pydicom", "pydicom", purpose, DICOM_PIP)
    for sub in ("pydicom.pixels", "pydicom.multival", "pydicom.errors"):
        _require(sub, "pydicom", purpose, DICOM_PIP)
    return module


def pandas(purpose="reading tables"):
    return _require("pandas", "pandas", purpose)


def ndimage(purpose="the heatmap regions"):
    """scipy.ndimage (scikit-learn installs scipy too)."""
    return _require("scipy.ndimage", "scipy", purpose)


def openvino(purpose="--mode fp32/int8"):
    return _require("openvino", "openvino", purpose)


def dicom_node():
    """What serve.py imports at its start beyond numpy, pillow and openvino
    (requirements-edge.txt), checked before: one line for the first one missing."""
    for module in ("pydicom", "pynetdicom", "highdicom"):
        _require(module, module, "the DICOM node (serve.py)", "-r requirements-edge.txt")


def heatmaps():
    """What the DICOM node's heatmaps need (cam.py, in its worker processes)."""
    for module, package in (("matplotlib", "matplotlib"), ("scipy.ndimage", "scipy"),
                            ("threadpoolctl", "threadpoolctl")):
        _require(module, package, "the DICOM node's heatmaps (or --no-heatmaps)",
                 "-r requirements-edge.txt")
