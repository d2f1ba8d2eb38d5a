"""Worker processes: decoding and results out of the node's interpreter lock.

In one process their Python work (pydicom, highdicom, Pillow) held the lock ~0.05 s per image,
a ceiling of ~20 images/s whatever the cores, and with heatmaps one results thread bound the
node with CPU idle. The node's process keeps the network, the spool's bookkeeping and
inference (OpenVINO runs without the lock).

Here: the pool (Workers: a worker that dies or hangs is replaced, its task tried again alone),
what each worker sets up (worker_setup: its log, memory limit, spool, report writer) and the
tasks that run in it (decode_in_worker, results_in_worker, unclassified_in_worker)."""
import functools
import os
import signal
import sys
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pydicom

from common import DataError, one_line
from node.dicom import DX_PRESENTATION, ServeError, SpoolError
from node.logs import log, setup_logging
from node.pmap import build_parametric_maps, map_values
from node.results import build_heatmaps, with_type2
from node.sr import ReportWriter, build_unclassified_sr
from node.spool import Spool

class WorkerDied(Exception):
    """A task stopped or hung its worker process twice: in the pool, then alone in a new
    one."""


class Stopping(Exception):
    """The node is stopping: the task was not run (its image stays in the inbox)."""


class NoWorkers(Exception):
    """New worker processes cannot start (memory, process limits): the image waits in the
    inbox and is tried again, never quarantined for it."""


class Workers:
    """A pool of `n` worker processes (spawned: nothing of the node's state, its open files or
    the spool's lock, goes with them), each set up once with `settings` (worker_setup).

    Every process is started by one thread of the node's that lives as long as the node (the
    spawner), because each worker asks the kernel to kill it when that thread ends
    (PR_SET_PDEATHSIG, worker_setup): then no worker outlives the node, however it ends, even
    one stuck in a decoder that never lets its own threads run."""
    WATCH_SECONDS = 2.0
    # No task takes this long (the largest image, 8192x8192, decodes in 1.5 s; 14 heatmaps of
    # a 4k image take about 10): one that does hangs, or its pool does (below)
    TASK_SECONDS = 120.0

    def __init__(self, n, settings):
        import multiprocessing
        self.n, self.settings = n, settings
        self.context = multiprocessing.get_context("spawn")
        self.lock, self.alone = threading.Lock(), threading.Lock()
        self.replacing = threading.Lock()  # one replacement of the pool at a time
        self.stopped = False
        self.gone = weakref.WeakSet()  # pools abandoned (_abandon)
        self.pools = weakref.WeakSet()  # every pool started, the lone ones too (shutdown)
        self.spawner = ThreadPoolExecutor(1, thread_name_prefix="spawn")
        # multiprocessing's resource tracker, a helper process started with this process's -W
        # options, would warn of "leaked semaphore objects" at every stop: the node exits
        # without waiting for its pool (see serve.py's __main__), and the tracker frees them
        sys.warnoptions.append("ignore:resource_tracker:UserWarning")
        try:
            self.pool = self._start(n)
        except NoWorkers as e:
            raise ServeError(str(e)) from None

    def _start(self, n):
        """A pool of n processes, each started and ready (imports done), by the spawner;
        NoWorkers where they cannot start (or are not ready within TASK_SECONDS)."""
        return self.spawner.submit(self._start_now, n).result()

    def _start_now(self, n):
        from concurrent.futures import ProcessPoolExecutor
        pool = ProcessPoolExecutor(n, mp_context=self.context, initializer=worker_setup,
                                   initargs=(os.getpid(), self.settings))
        self.pools.add(pool)
        # CPython starts a process at a submit that finds none idle: n tasks that outlast
        # the submits start all n here, in this thread, and none is started later
        try:
            for ready in [pool.submit(time.sleep, 0.2) for _ in range(n)]:
                ready.result(timeout=self.TASK_SECONDS)
        except Exception as e:  # out of memory or processes, a setup that hangs; or stopping
            self._abandon(pool)
            raise NoWorkers(f"worker processes cannot start ({type(e).__name__}: "
                            f"{one_line(e)[:120]})") from None
        return pool

    def run(self, function, *args):
        """function(*args) in a worker process. A process that stops (a crash in a decoder,
        the kernel's OOM killer) takes every task of the pool with it, and one that hangs
        (a task over TASK_SECONDS) holds it: the pool is replaced and the task tried again
        alone in a process of its own, one such task at a time; WorkerDied if it stops or
        hangs that one too (then most likely the task is the cause, not another's).
        Stopping once shutdown() has begun (whatever it interrupts: the image waits);
        NoWorkers where new processes cannot start (the image waits too)."""
        from concurrent.futures import CancelledError
        from concurrent.futures.process import BrokenProcessPool
        while True:
            with self.lock:
                if self.stopped:
                    raise Stopping()
                pool = self.pool
            if pool in self.gone:  # abandoned, and no new pool could start yet
                self._replace(pool)
                continue
            try:
                future = pool.submit(function, *args)
            except BrokenProcessPool:
                break
            except RuntimeError:  # shut down meanwhile: replaced by another task, or stopping
                if self.stopped:
                    raise Stopping() from None
                if self.pool is pool and pool not in self.gone:
                    raise  # the interpreter is exiting
                continue
            try:
                return self._wait(pool, future)
            except (BrokenProcessPool, CancelledError):  # cancelled: by shutdown()
                if self.stopped:
                    raise Stopping() from None
                break
        self._replace(pool)
        with self.alone:
            try:
                alone = self._start(1)
            except NoWorkers:
                if self.stopped:
                    raise Stopping() from None
                raise
            try:
                return self._wait(alone, alone.submit(function, *args))
            except (BrokenProcessPool, CancelledError, RuntimeError):
                # shutdown() stops the lone pool too: then the image waits for the next start
                if self.stopped:
                    raise Stopping() from None
                raise WorkerDied() from None
            finally:
                self._abandon(alone)

    def _replace(self, pool):
        """A new pool for one that broke or hangs (by the first task to notice; the others
        wait for it). Started without holding self.lock, so that shutdown() never waits for
        processes that are slow to start; NoWorkers where they cannot."""
        with self.replacing:
            with self.lock:
                if self.stopped:
                    raise Stopping()
                if self.pool is not pool:  # replaced meanwhile
                    return
                if pool not in self.gone:
                    log.warning("a worker process stopped or hangs: %d new ones", self.n)
                    self._abandon(pool)
            new = self._start(self.n)
            with self.lock:
                if self.stopped:
                    self._abandon(new)
                    raise Stopping()
                self.pool = new

    def _abandon(self, pool):
        """Stop a pool's processes, waiting for nothing: a worker killed while it wrote its
        result to the pool's pipe leaves the pool's reader waiting for the rest forever, and
        the other workers waiting for the pipe's lock (CPython's ProcessPoolExecutor never
        learns that it broke); a hung task holds its process."""
        self.gone.add(pool)
        # the pool's processes: CPython keeps them in _processes (no public handle), which
        # shutdown() empties
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            try:
                process.kill()
            except Exception:  # gone already
                pass

    def _wait(self, pool, future):
        """The future's result; BrokenProcessPool if its pool broke or was abandoned, or the
        task ran over TASK_SECONDS (then its pool is abandoned: it or the task hangs)."""
        from concurrent.futures import TimeoutError
        from concurrent.futures.process import BrokenProcessPool
        deadline = time.monotonic() + self.TASK_SECONDS
        while True:
            try:
                return future.result(timeout=self.WATCH_SECONDS)
            except TimeoutError:
                # CPython 3.11 can also lose a future submitted just as a broken pool is torn
                # down (terminate_broken clears the work items without the submit lock)
                if getattr(pool, "_broken", False) or pool in self.gone:
                    raise BrokenProcessPool("the task's pool broke") from None
                if time.monotonic() > deadline:
                    log.warning("a task ran over %.0f s: its worker processes are stopped",
                                self.TASK_SECONDS)
                    self._abandon(pool)
                    raise BrokenProcessPool("the task ran over its time") from None

    def shutdown(self):
        """No task starts after this; the workers are stopped, a lone one too (the node exits
        without their tasks: those images stay in the inbox)."""
        with self.lock:
            self.stopped = True
            for pool in list(self.pools):
                self._abandon(pool)


_work = {}  # in a worker process: its settings, spool and report writer (worker_setup)


def worker_setup(node_pid, settings):
    # A worker outlives no node, however the node ends (kill -9 included): it would write into
    # the next node's spool. The kernel kills it when the node's thread that started it (the
    # spawner, Workers) ends; where that is not available (not Linux) a thread watches.
    if not die_with_parent() or os.getppid() != node_pid:
        def watch():
            while os.getppid() == node_pid:
                time.sleep(0.2)
            os._exit(1)
        threading.Thread(target=watch, daemon=True).start()
    setup_logging(settings["log_level"])
    _work.update(settings, spool=Spool(settings["spool"]), report=ReportWriter(
        settings["identity"], settings["points_note"], settings["uid_root"]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the node, which stops these
    if settings["heatmaps"]:
        import cam  # noqa: F401
        from matplotlib import colormaps  # noqa: F401
    # One report for a stand-in image, so that the first images of a burst do not wait for
    # highdicom's tables of the standard (loaded once per process) and the report template of
    # images without a character set: about 0.5 s idle for 14 findings, several times that
    # under load (images in another character set build theirs at the first one)
    stand_in = pydicom.Dataset()
    stand_in.SOPClassUID, stand_in.Modality = DX_PRESENTATION, "DX"
    stand_in.SOPInstanceUID = stand_in.StudyInstanceUID = stand_in.SeriesInstanceUID = "1.2.3"
    with_type2(stand_in)
    try:
        _work["report"](stand_in, settings["stand_in_findings"])
    except Exception as e:  # only a head start: the first image then pays for it
        log.warning("warming up the report writer failed: %s", one_line(e))
    if settings.get("memory_bytes"):
        limit_memory(settings["memory_bytes"])


def die_with_parent():
    """Ask the kernel to SIGKILL this process when the thread that started it ends (Linux's
    PR_SET_PDEATHSIG); whether it could."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def limit_memory(budget):
    """At most `budget` bytes of address space more than this process holds now (set up, its
    libraries loaded): a decoder that allocates what a hostile stream asks for fails with
    MemoryError (or, in C++, aborts its process: a WorkerDied) instead of taking the host's
    memory. A limit on address space, not on what is resident: it binds whatever allocates."""
    import resource
    try:
        with open("/proc/self/status") as f:
            size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        soft = size + budget
        resource.setrlimit(resource.RLIMIT_AS, (soft if hard == resource.RLIM_INFINITY
                                                else min(soft, hard), hard))
    except (OSError, ValueError, StopIteration) as e:  # not Linux: the size checks only
        log.warning("cannot limit the worker's memory: %s", one_line(e))


def in_worker(function):
    """A worker's task: its errors come back to the node as DataError (the input's fault: a
    MemoryError too, under the worker's limit), SpoolError (the spool's) or RuntimeError with
    the message (never an exception the node cannot unpickle, which would break the pool)."""
    @functools.wraps(function)
    def task(*args):
        try:
            return function(*args)
        except (DataError, SpoolError):
            raise
        except MemoryError:
            raise DataError(f"it needs more memory than a worker may take (--worker-memory-mb "
                            f"{(_work.get('memory_bytes') or 0) / 2 ** 20:g})") from None
        except Exception as e:
            raise RuntimeError(f"{type(e).__name__}: {one_line(e)}") from None
    return task


@in_worker
def decode_in_worker(path, header=True):
    """(ten crops (10, crop, crop) uint8, as images.eval_gray; the DICOM header, or None
    without `header`) of an image file."""
    from images import eval_gray
    gray = eval_gray(path, _work["resize"], _work["crop"])
    return gray, with_type2(pydicom.dcmread(path, stop_before_pixels=True)) if header else None


@in_worker
def results_in_worker(uid, source, findings, maps, positive):
    """The report, and a heatmap per positive finding where `maps` (10, len(positive), h, w)
    are given (and with --parametric-maps its parametric map, node/pmap.py), written to the
    outbox: their file names, in the order they are sent (the report first, the parametric
    maps last: a destination that refuses them still has the others)."""
    identity = _work["identity"]

    def files():  # one at a time, each written before the next is built
        yield "0-sr.dcm", _work["report"](source, findings)
        if maps is not None:
            gray, heat = _heat(_work["spool"].image(uid), maps, _work["resize"], _work["crop"])
            overlays = _overlays(gray, heat, findings, positive, identity)
            for k, data in build_heatmaps(source, overlays, identity, _work["uid_root"],
                                          _work["heatmap_syntax"]):
                yield f"1-sc-{k:02d}.dcm", data
            if _work.get("parametric_maps"):
                yield from _parametric_maps(uid, source, gray.shape, heat, positive, identity)
    return _work["spool"].put_results(uid, files())


@in_worker
def unclassified_in_worker(uid, reason):
    """The report saying the accepted image `uid` (still in the inbox) got no result, and why,
    written to the outbox: its file names. Its header is read here, as any image's is (a
    hostile one stops a worker, not the node)."""
    source = with_type2(pydicom.dcmread(_work["spool"].image(uid), stop_before_pixels=True))
    # in a folder of its own: the image sent again and classified writes (and its sender
    # removes) outbox/UID/, never this one
    report = build_unclassified_sr(source, reason, _work["identity"], _work["uid_root"])
    return _work["spool"].put_results(f"{uid}.unclassified", [("0-sr.dcm", report)])


def heatmap_caption(row, identity):
    """What a heatmap says of its finding: the report's probabilities, each labelled, and the
    notices (the research use; the bundled sample, where the model was trained on it)."""
    calibrated = row.get("calibrated_probability")
    return "  ".join(filter(None, [
        row["finding"], f"p = {row['probability']:.3f} raw" + (
            f", {calibrated:.3f} calibrated" if calibrated is not None else ""),
        f"(CAM, {identity['mode']}; red = most weight)",
        identity.get("notice") and "BUNDLED-SAMPLE MODEL: MEANS NOTHING CLINICALLY",
        "RESEARCH USE ONLY"]))


def _parametric_maps(uid, source, shape, heat, positive, identity):
    """("2-pm-KK.dcm", the file) of each positive finding (node/pmap.py). An optional extra: one
    that cannot be built (a source highdicom refuses, memory) is said in the log and left out,
    and the image's report and heatmaps go without it (a failure here would otherwise answer
    the image with a no-result report)."""
    values = ((k, map_values(heat[j], shape)) for j, k in enumerate(positive))
    try:
        for k, data in build_parametric_maps(source, values, identity, _work["uid_root"]):
            yield f"2-pm-{k:02d}.dcm", data
    except Exception as e:
        log.warning("%s: parametric maps not built (%s: %s); its report and heatmaps go "
                    "without them", uid, type(e).__name__, one_line(e)[:200])


def _heat(path, maps, resize, crop):
    """The image (H, W) uint8 and its findings' maps (K, h, w) over it (cam.py), at the
    resized image's size: registered_overlay scales the colours to the X-ray's, map_values
    the values."""
    from cam import tencrop_heatmap
    from images import load_gray, shorter_to
    gray = np.asarray(load_gray(path))
    return gray, tencrop_heatmap(maps, shorter_to(gray.shape[::-1], resize)[::-1], crop)


def _overlays(gray, heat, findings, positive, identity):
    """(k, (H, W, 3) uint8) heatmap overlays at the image's resolution (cam.py)."""
    from cam import registered_overlay
    for j, k in enumerate(positive):
        yield k, registered_overlay(gray, heat[j], heatmap_caption(findings[k], identity))
