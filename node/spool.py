"""The spool: SPOOL/inbox/ (accepted images), outbox/ (results waiting for the destination),
done/ (finished), quarantine/ (malformed objects and why); every file in it written durably
(fsync, atomic rename) before the node counts on it."""
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from common import DataError, atomic_path, one_line, os_reason
from node.dicom import UID_RE, ResultsError, SpoolError

# Durable files

def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_write(path, data):
    """`data` at `path`, on disk before this returns: written aside, fsynced, renamed, the
    directory fsynced. Never half-written, even after kill -9 or a power cut; SpoolError where
    it cannot be written."""
    try:
        with atomic_path(path, "spool file") as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        fsync_dir(Path(path).parent)
    except (OSError, DataError) as e:
        raise SpoolError(one_line(e) if isinstance(e, DataError) else
                         f"{path}: cannot write ({os_reason(e)})") from None


class Spool:
    """SPOOL/inbox/UID.dcm (accepted, not yet finished), outbox/UID/ (results the destination
    has not accepted yet), done/UID.json (finished: the results, or quarantined), quarantine/
    (malformed objects and why)."""

    def __init__(self, root):
        self.root = Path(root)
        self.inbox, self.outbox = self.root / "inbox", self.root / "outbox"
        self.done, self.quarantine = self.root / "done", self.root / "quarantine"
        for d in (self.inbox, self.outbox, self.done, self.quarantine):
            d.mkdir(parents=True, exist_ok=True)
        self._quarantine_lock = threading.Lock()

    def image(self, uid):
        return self.inbox / f"{uid}.dcm"

    def is_done(self, uid):
        return (self.done / f"{uid}.json").is_file()

    def finish(self, uid, record=None):
        """Done: recorded (record) or quarantined (None: its quarantine entry is written
        already; a resend is tried again), and out of the inbox. The image leaves the inbox
        only after its record is on disk: SpoolError, and it stays, where it cannot be."""
        if record is not None:
            durable_write(self.done / f"{uid}.json",
                          (json.dumps(record, indent=1) + "\n").encode())
        try:
            os.unlink(self.image(uid))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise SpoolError(f"{self.image(uid)}: cannot remove ({os_reason(e)})") from None
        try:
            fsync_dir(self.inbox)
        except OSError as e:
            raise SpoolError(f"{self.inbox}: {os_reason(e)}") from None

    def clean_leftovers(self):
        """Temp files of writes a kill interrupted (never renamed into place)."""
        for d in (self.inbox, self.done, self.outbox, self.quarantine):
            for p in d.iterdir():
                if p.name.startswith("."):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()

    def prune_done(self, days):
        """Delete the done/ records older than `days` (an image sent again after that is
        classified again, under the same result UIDs): how many went. A record whose results
        still wait in the outbox stays (a resend would rewrite what is being sent)."""
        cutoff, pruned = time.time() - days * 86400, 0
        for p in self.done.glob("*.json"):
            try:
                if p.stat().st_mtime < cutoff and not (self.outbox / p.stem).exists():
                    p.unlink()
                    pruned += 1
            except FileNotFoundError:
                pass
        return pruned

    def pending_images(self):
        """UIDs in the inbox, oldest first; those already done are removed."""
        found = []
        for p in self.inbox.glob("*.dcm"):
            uid = p.stem
            if self.is_done(uid):
                p.unlink()
                continue
            found.append((p.stat().st_mtime, uid))
        return [uid for _, uid in sorted(found)]

    def pending_results(self):
        """Result folders waiting, oldest first. Other threads send and remove folders while
        this lists them (the sending associations, GET /health): one gone is not waiting."""
        found = []
        for p in self.outbox.iterdir():
            try:
                if p.is_dir() and not p.name.startswith("."):
                    found.append((p.stat().st_mtime, p))
            except FileNotFoundError:
                continue
        return [p for _, p in sorted(found)]

    def put_results(self, uid, files):
        """(name, bytes) pairs -> outbox/UID/, all files or none (staged and renamed); their
        names. Each file is written as it comes, so that only one is held at a time (the
        heatmaps of an 8192x8192 image are 192 MB each, uncompressed). SpoolError, the
        staging folder removed, where they cannot be written."""
        staging, names, files = None, [], iter(files)
        try:
            staging = Path(tempfile.mkdtemp(dir=self.outbox, prefix=f".{uid}."))
            while True:
                try:  # building the next file: its errors are the results', never the spool's
                    name, data = next(files)
                except StopIteration:
                    break
                except OSError as e:
                    raise ResultsError(f"{type(e).__name__}: {one_line(e)}") from None
                with open(staging / name, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                names.append(name)
                del data
            fsync_dir(staging)
            target = self.outbox / uid
            if target.exists():  # a kill after the rename, before done/: the same bytes again
                shutil.rmtree(target)
            os.rename(staging, target)
            staging = None
            fsync_dir(self.outbox)
        except OSError as e:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            raise SpoolError(f"{self.outbox}: cannot write the results of {uid} "
                             f"({os_reason(e)})") from None
        except BaseException:  # building a heatmap failed half-way: nothing is left of them
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        return sorted(names)

    def put_quarantine(self, data, uid, reason):
        """The object (or what the caller keeps of it) and a .txt reason, written last: an
        entry is complete once its .txt is there. SpoolError (nothing left of the entry) where
        it cannot be written."""
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{uid if uid and UID_RE.match(uid) else 'unknown'}"
        with self._quarantine_lock:
            n = 0
            while (self.quarantine / f"{name}-{n}.txt").exists():
                n += 1
            stem = self.quarantine / f"{name}-{n}"
            try:
                if data is not None:
                    durable_write(Path(f"{stem}.dcm"), data)
                durable_write(Path(f"{stem}.txt"), (reason + "\n").encode())
            except SpoolError:
                Path(f"{stem}.dcm").unlink(missing_ok=True)
                raise
        return stem


