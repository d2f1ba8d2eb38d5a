"""What every script shares: the one-line error, files written as a unit, locks, flag checks,
progress lines.

Needs only the standard library, so the torch-free edge path (infer.py --mode fp32/int8) and
stats.py import it at no cost.
"""
import argparse
import errno
import fcntl
import math
import os
import re
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

# The repository's own files (the shipped split, NIH's tables and boxes) are found from here.
REPO_DIR = Path(__file__).resolve().parent


class DataError(Exception):
    """Bad input: the message is one line naming the file (and line) or flag at fault."""


class SetupError(Exception):
    """A device or distribution problem; one line."""


def one_line(exc):
    """The last line of an error message: DataLoader workers re-raise errors with the worker's
    traceback folded into the message, and the user needs only the original line."""
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else type(exc).__name__
    # The worker's traceback ends with "dataset.DataError: <message>".
    return re.sub(rf"^([\w.]*\.)?{type(exc).__name__}: ", "", last)


def os_reason(exc):
    """'No space left on device' rather than '[Errno 28] No space left on device: path'."""
    return exc.strerror or one_line(exc) if isinstance(exc, OSError) else one_line(exc)


# ---------------------------------------------------------------------------------------------
# Files written as a unit: a temp file with a unique name beside the target, then a rename.
# A kill leaves the old file or the new one, never half of one; a failed write (disk full,
# file-size limit) removes its temp file and says so in one line.

@contextmanager
def atomic_path(path, what="file"):
    """Yields a unique temp path beside `path`; renamed onto `path` if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as e:
        raise DataError(f"{path}: cannot write {what} ({os_reason(e)})") from None
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide results from the rest of the team
        os.replace(tmp, path)
    except OSError as e:
        _unlink(tmp)
        raise DataError(f"{path}: cannot write {what} ({os_reason(e)}); "
                        "the previous version, if any, is untouched") from None
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def atomic_write_text(path, text, what="file"):
    with atomic_path(path, what) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:  # not the locale's: what hashes read back
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def atomic_copy(src, dst, what="file"):
    with atomic_path(dst, what) as tmp:
        shutil.copyfile(src, tmp)


# ---------------------------------------------------------------------------------------------
# Locks: one writer per directory. A POSIX record lock (fcntl.lockf) belongs to the process
# that took it: the kernel releases it when that process dies, and a fork()ed child (a
# DataLoader worker, a multiprocessing pool) does not inherit it, so a killed run never leaves
# the lock held by an orphaned worker. (flock locks belong to the open file description, which
# fork shares: a surviving worker kept them.) The descriptor is close-on-exec as well.

@contextmanager
def exclusive_lock(lock_path, what, hint):
    """Hold an exclusive lock on lock_path for the block, or stop with one line if another
    process holds it. `what` names the user of the directory, `hint` the way out."""
    lock_path = Path(lock_path)
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise DataError(f"{lock_path.parent}: cannot lock for {what} ({os_reason(e)})") from None
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise DataError(f"{lock_path.parent}: cannot lock for {what} ({os_reason(e)})"
                                ) from None
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            raise DataError(f"{lock_path.parent}: in use by {what} (pid {owner}); wait for it to "
                            f"finish or {hint}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def check_writable_dir(path, flag, need_bytes=0):
    """Before any long work: `path` is (or can be made) a writable directory with room for
    need_bytes. One line naming the flag otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DataError(f"{flag} {path}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise DataError(f"{flag} {path}: not a writable directory ({os_reason(e)})") from None
    free = shutil.disk_usage(path).free
    if need_bytes and free < need_bytes:
        raise DataError(f"{flag} {path}: {free / 1e9:.2f} GB free, {need_bytes / 1e9:.2f} GB needed")


def check_writable_file(path, flag):
    """An output file's directory must be writable and the path must not be a directory."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{flag} {path}: is a directory")
    check_writable_dir(path.parent, flag)


def strict_json(value):
    """value with every non-finite float as None: JSON that strict readers accept."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def is_disk_full(exc):
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


# ---------------------------------------------------------------------------------------------
# Command lines: every bad flag is one line, before any work

class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: `error: argument --batch-size: ...`, no usage block; the
    description given as a module docstring is its first paragraph, whole."""

    def __init__(self, *args, description=None, **kwargs):
        if description:
            description = " ".join(description.split("\n\n")[0].split())
        super().__init__(*args, description=description, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def add_split_args(parser, laterals_help="CheXpert, MIMIC-CXR: keep lateral views (default: "
                   "frontal only)", recorded=False):
    """--data-dir, --split, --split-seed, --keep-laterals: which data and which split, the same
    in every script. recorded: unset flags are None, for what a record says (report.py reads
    the predictions' own), and --no-keep-laterals can say no to a recorded yes."""
    first = "what the predictions' record says, else " if recorded else ""
    parser.add_argument("--data-dir", default=None if recorded else "data",
                        help="ChestX-ray14 (images/ and the label table), CheXpert (train.csv, "
                             f"valid.csv) or MIMIC-CXR-JPG directory (default: {first}data)")
    parser.add_argument("--split", default=None if recorded else "auto",
                        help="auto | chexnet | random | official | DIR with the three list files "
                             f"(default: {first}auto: the data dir's own lists, else the CheXNet "
                             "split)")
    parser.add_argument("--split-seed", type=seed, default=None if recorded else 0,
                        help=f"seed of the random/official patient-level split (default: {first}0)")
    parser.add_argument("--keep-laterals", default=None if recorded else False,
                        action=argparse.BooleanOptionalAction if recorded else "store_true",
                        help=laterals_help)


def add_device_args(parser, what=""):
    """--device and --hpu (main.py, and infer.py's --mode torch). --hpu means --device hpu
    wherever it stands among the flags: the parsed device is final."""
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "hpu"],
                        action=_Device,
                        help=f"{what}where to run (auto: a GPU or Gaudi if there is one)")
    parser.add_argument("--hpu", action=_Hpu, help="shorthand for --device hpu (Intel Gaudi)")


class _Device(argparse.Action):
    """--device, unless --hpu came before it."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, "hpu" if namespace.hpu else values)


class _Hpu(argparse.Action):
    """--hpu: True, and the device hpu."""

    def __init__(self, option_strings, dest, default=False, required=False, help=None):
        super().__init__(option_strings, dest, nargs=0, const=True, default=default,
                         required=required, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True)
        namespace.device = "hpu"


def positive_int(text):
    return _number(text, int, lambda v: v >= 1, "a positive integer")


def nonnegative_int(text):
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def seed(text):
    """A random seed: what torch.manual_seed takes (0 <= seed < 2**63)."""
    return _number(text, int, lambda v: 0 <= v < 2 ** 63, "an integer in [0, 2**63)")


def positive_float(text):
    return _number(text, float, lambda v: v > 0, "a positive number")


def nonnegative_float(text):
    return _number(text, float, lambda v: v >= 0, "a number >= 0")


def fraction(text):
    return _number(text, float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def _number(text, kind, ok, what):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if (kind is float and not math.isfinite(value)) or not ok(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def ae_title(text):
    """An AE title as a flag gives it (argparse type: serve.py, retrieve.py)."""
    if not 0 < len(text) <= 16 or "\\" in text or not text.isprintable() or text.strip() != text:
        raise argparse.ArgumentTypeError(f"{text!r}: an AE title is 1-16 printable characters, "
                                         "no backslash, no leading or trailing space")
    return text


def dicom_address(text):
    """'AE@HOST:PORT' -> (AE, HOST, PORT) (argparse type: serve.py, retrieve.py)."""
    match = re.fullmatch(r"([^@]{1,16})@([^:@\s]+):(\d{1,5})", text)
    if not match or not 0 < int(match.group(3)) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: expected AE@HOST:PORT, e.g. "
                                         "PACS@10.0.0.5:104")
    ae_title(match.group(1))
    return match.group(1), match.group(2), int(match.group(3))


def fail(message, code=1):
    """Print the one-line error and exit."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


# ---------------------------------------------------------------------------------------------
# Progress of a long loop (infer.py's evaluation, main.py's training epochs)

class Progress:
    """A tqdm bar (images/s, ETA) on a terminal; a plain line on stderr every `every` seconds
    otherwise (the log of a batch job), and at the end when final_line. update(n, details):
    details, if given, is a function returning more text for the line (training's loss and
    loader wait); it is called only when a line is printed, every `every` seconds at most."""

    def __init__(self, total, initial, enabled, every=30.0, label="predicted", final_line=True,
                 leave=True):
        self.total, self.count, self.label, self.every = total, initial, label, every
        self.enabled, self.start, self.first = enabled, time.perf_counter(), initial
        self.final_line = final_line
        self.last = self.start
        self.bar = None
        if enabled and sys.stderr.isatty():
            try:  # an edge box may not have tqdm: plain lines then
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=initial, unit="img", desc=label, leave=leave)
            except ImportError:
                pass

    def update(self, n, details=None):
        self.count += n
        if not self.enabled:
            return
        now = time.perf_counter()
        due = now - self.last >= self.every
        if self.bar is not None:
            self.bar.update(n)
            if due and details is not None:
                self.last = now
                self.bar.set_postfix_str(details(), refresh=False)
        elif due or (self.final_line and self.count >= self.total):
            self.last = now
            rate = (self.count - self.first) / max(now - self.start, 1e-9)
            eta = (self.total - self.count) / rate if rate > 0 else float("nan")
            extra = f"  {details()}" if details is not None else ""
            print(f"{self.label} {self.count}/{self.total} images  {rate:.1f} images/s  "
                  f"ETA {duration(eta)}{extra}", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def duration(seconds):
    """H:MM:SS, or ? for an unknown time."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


SAMPLE_NOTICE = ("note: a model trained on the bundled 200-image sample: these numbers mean "
                 "nothing clinically")


def trained_on_sample(data_dir):
    """Whether `data_dir` (a model's training data, as its checkpoint or export records it) is
    the repository's bundled sample/, wherever the clone was when it was trained."""
    if not data_dir or not isinstance(data_dir, (str, Path)):  # a damaged record: no claim
        return False
    path = Path(data_dir)
    if path.name != "sample":
        return False
    for where in ([path] if path.is_absolute() else [path, REPO_DIR / path]):
        try:
            if where.resolve() == (REPO_DIR / "sample").resolve():
                return True
            # another clone's sample: its README says what it is
            with open(where / "README.md", encoding="utf-8") as f:
                if f.read(100).startswith("# Bundled ChestX-ray14 sample"):
                    return True
        except (OSError, UnicodeDecodeError):
            pass
    return not path.exists()  # the clone it was trained in is gone: trust the name
