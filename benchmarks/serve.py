"""The DICOM node under load: N images from several concurrent senders, latency (image sent ->
its report at the destination) and throughput, beside infer.py's batch throughput on the same
images and machine.

    python benchmarks/serve.py [--model-dir models] [--n 300] [--senders 4] [--no-heatmaps]

Without --model-dir a random-weights DenseNet-121 is exported at the real 224x224 (the speeds
mean something, the findings do not; it needs torch for the export only). The node runs as
`serve.py` in its own process; the senders and the destination (a pynetdicom Storage SCP that
records when each report arrives) run here. Images: DX files (12 bits, windowed) made from the
NIH sample's 1024x1024 PNGs, each with its own SOP Instance UID. Nothing may be lost: the
benchmark fails unless every image's report arrives once.
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_files(pngs, n, out):
    """n DX files cycling through the PNGs, each its own SOP Instance UID; 8 per study."""
    import pydicom
    from pydicom.uid import generate_uid

    from dicom_files import dx_file
    templates, files = {}, []
    study = series = None
    for i in range(n):
        if i % 8 == 0:
            study, series = generate_uid(), generate_uid()
        png = pngs[i % len(pngs)]
        if png not in templates:
            templates[png] = dx_file(png, out / f"t-{png.stem}.dcm", study, series, 1)
        ds = pydicom.dcmread(templates[png])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = study, series, i + 1
        path = out / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def start_sink(port, arrivals):
    """The destination: records the arrival time of every SR by the image it references."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    def on_store(event):
        ds = event.dataset
        if ds.Modality == "SR":
            for item in ds.ContentSequence:
                if item.ValueType == "IMAGE":
                    uid = str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                    arrivals.setdefault(uid, []).append(time.perf_counter())
        return 0x0000

    ae = AE(ae_title="SINK")
    ae.supported_contexts = AllStoragePresentationContexts
    ae.maximum_associations = 16
    return ae.start_server(("127.0.0.1", port), block=False,
                           evt_handlers=[(evt.EVT_C_STORE, on_store)])


def sender(files, port, sent, errors):
    import pydicom
    from pynetdicom import AE
    ae = AE(ae_title="BENCH")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="CHEXNET")
    if not assoc.is_established:
        errors.append("association refused")
        return
    try:
        for path in files:
            ds = pydicom.dcmread(path)
            t = time.perf_counter()
            status = assoc.send_c_store(ds)
            if getattr(status, "Status", None) != 0:
                errors.append(f"{path.name}: status {getattr(status, 'Status', None)}")
                continue
            sent[str(ds.SOPInstanceUID)] = t
    finally:
        assoc.release()


def cpu_seconds(pid):
    """User + system CPU seconds of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batch_throughput(model_dir, data_dir, n, work):
    """infer.py --mode int8 on n images of the same set: its own images/s line."""
    proc = subprocess.run([sys.executable, "infer.py", "--mode", "int8", "--model-dir",
                           str(model_dir), "--data-dir", str(data_dir), "--limit", str(n),
                           "--no-store", "--no-figures", "--n-boot", "100",
                           "--out-csv", str(work / "batch.csv")],
                          cwd=REPO, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("throughput:")), None)
    if line is None:
        sys.exit(f"infer.py failed: {proc.stderr[-2000:]}")
    return float(line.split()[1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", default=None, help="an exported model (default: export a "
                                                     "random-weights DenseNet-121)")
    p.add_argument("--images", default=str(REPO.parent / "shared/data/nih_sample"))
    p.add_argument("--n", type=int, default=300, help="images sent")
    p.add_argument("--senders", type=int, default=4, help="concurrent sending associations")
    p.add_argument("--no-heatmaps", action="store_true")
    p.add_argument("--workers", type=int, default=None, help="the node's decoding threads")
    a = p.parse_args()

    from labels import write_list
    from tables import read_label_table
    work = Path(tempfile.mkdtemp(prefix="chexnet-serve-bench-"))
    image_dir = Path(a.images) / "images"
    table = Path(a.images) / "Data_Entry_2017_v2020_sample.csv"
    names, _, labels = read_label_table(table)
    data = work / "data"
    data.mkdir()
    os.symlink(image_dir.resolve(), data / "images")
    (data / "Data_Entry_2017_v2020.csv").write_bytes(table.read_bytes())
    for split, part in (("train", slice(0, 4)), ("val", slice(4, 8)), ("test", slice(8, None))):
        write_list(data / f"{split}_list.txt", names[part], labels[part])
    model_dir = a.model_dir
    if model_dir is None:
        import torch

        from model import build_model
        torch.manual_seed(0)
        torch.save(build_model(pretrained="none").state_dict(), work / "random.pt")
        model_dir = work / "models"
        subprocess.run([sys.executable, "infer.py", "--export", "--checkpoint", work / "random.pt",
                        "--model-dir", model_dir, "--data-dir", data, "--calibration-size", "4",
                        "--validation-size", "2"], cwd=REPO, check=True, capture_output=True)
    model_dir = Path(model_dir)
    has_points = (model_dir / "operating_points.json").exists()

    pngs = [image_dir / nm for nm in names[8:8 + min(a.n, 60)]]
    files = make_files(pngs, a.n, work)
    batch = batch_throughput(model_dir, data, min(a.n, len(names) - 8), work)

    sink_port, node_port, http_port = free_port(), free_port(), free_port()
    arrivals = {}
    sink = start_sink(sink_port, arrivals)
    cmd = [sys.executable, "serve.py", "--model-dir", str(model_dir), "--spool", str(work / "spool"),
           "--host", "127.0.0.1", "--port", str(node_port), "--allow-ae", "BENCH",
           "--destination", f"SINK@127.0.0.1:{sink_port}", "--max-queue", str(a.n + 10),
           "--log-level", "warning", "--http-port", str(http_port)]
    cmd += [] if has_points else ["--no-operating-points"]
    cmd += ["--no-heatmaps"] if a.no_heatmaps else []
    cmd += ["--workers", str(a.workers)] if a.workers else []
    log = open(work / "node.log", "w")
    node = subprocess.Popen(cmd, cwd=REPO, stderr=log, stdout=log)
    try:
        for _ in range(600):  # the node listens once its model is compiled
            try:
                socket.create_connection(("127.0.0.1", node_port), 0.2).close()
                break
            except OSError:
                time.sleep(0.2)
        sent, errors = {}, []
        node_cpu_start, own_cpu_start = cpu_seconds(node.pid), sum(os.times()[:2])
        shares = [files[i::a.senders] for i in range(a.senders)]
        start = time.perf_counter()
        threads = [threading.Thread(target=sender, args=(s, node_port, sent, errors))
                   for s in shares]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        while len(arrivals) < len(sent) and time.perf_counter() - start < 3600:
            if node.poll() is not None:
                sys.exit(f"the node stopped: {(work / 'node.log').read_text()[-2000:]}")
            time.sleep(0.1)
        end = max(max(v) for v in arrivals.values())
        time.sleep(0.5)  # the node records the last send after the destination answered
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=30) as r:
            stages = json.load(r)["seconds"]
        node_cpu = cpu_seconds(node.pid) - node_cpu_start
        own_cpu = sum(os.times()[:2]) - own_cpu_start
    finally:
        node.terminate()
        node.wait(60)
        sink.shutdown()
    if errors or len(sent) != a.n or set(arrivals) != set(sent) or \
            any(len(v) != 1 for v in arrivals.values()):
        sys.exit(f"lost or duplicated: {len(sent)} sent of {a.n}, {len(arrivals)} reports, "
                 f"errors {errors[:3]}")
    latency = np.array([arrivals[u][0] - t for u, t in sent.items()])
    rate = a.n / (end - start)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), "CPU")
    print(f"\n{a.n} DX images (1024x1024, 12 bit) from {a.senders} concurrent senders; "
          f"{os.cpu_count()} cores ({cpu}); OpenVINO INT8, ten-crop "
          f"{'with' if not a.no_heatmaps and has_points else 'without'} heatmaps; "
          f"{'decisions by the operating points' if has_points else 'no operating points'}")
    print("| | images/s | latency p50 | latency p95 | max |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| serve.py (C-STORE in -> report stored at the destination) | {rate:.2f} | "
          f"{np.percentile(latency, 50):.2f} s | {np.percentile(latency, 95):.2f} s | "
          f"{latency.max():.2f} s |")
    print(f"| infer.py --mode int8 (batch evaluation, PNGs) | {batch:.2f} | | | |")
    print(f"serve.py reaches {rate / batch:.0%} of batch evaluation; nothing lost, no duplicate "
          f"report ({a.n} sent, {len(arrivals)} reports)")
    print(f"CPU per image: the node {node_cpu / a.n:.3f} s, the senders and the destination "
          f"(this process) {own_cpu / a.n:.3f} s; {os.cpu_count()} cores x "
          f"{end - start:.1f} s = {os.cpu_count() * (end - start) / a.n:.3f} s per image")
    print("\nWhere the node's time goes, per image (its GET /health):")
    print("| stage | mean | p50 | p95 | what |")
    print("| --- | --- | --- | --- | --- |")
    for name, row in stages["per_image"].items():
        print(f"| {name} | {row['mean']:.3f} s | {row['p50']:.3f} s | {row['p95']:.3f} s | "
              f"{stages['stages'][name]} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
