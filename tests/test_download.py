"""batch_download.sh against small real archives served from 127.0.0.1: a full run, a killed
and resumed run, a corrupted archive, an archive escaping the target directory, a second run."""
import hashlib
import http.server
import io
import os
import re
import signal
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with HTTP Range support (what lets curl -C - resume), slowly if asked."""
    delay = 0.0  # seconds per 64 KiB chunk
    ranges = []  # Range headers seen
    fail = 0  # answer every request with this HTTP error (0: serve)

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.fail:
            return self.send_error(self.fail)
        path = Path(self.directory) / self.path.lstrip("/")
        if not path.is_file():
            return self.send_error(404)
        data = path.read_bytes()
        start = 0
        match = re.match(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if match:
            RangeHandler.ranges.append(int(match.group(1)))
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        try:
            for i in range(start, len(data), 65536):
                self.wfile.write(data[i:i + 65536])
                if self.delay:
                    time.sleep(self.delay)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()

    def handler(*args, **kwargs):
        return RangeHandler(*args, directory=str(root), **kwargs)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    RangeHandler.delay, RangeHandler.ranges, RangeHandler.fail = 0.0, [], 0
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def make_archives(www, nih_images, per_archive=(6, 6, 5)):
    """images_01..03.tar.gz of real NIH PNGs (members images/<name>.png, as NIH's), their list
    file with checksums, and a label table of exactly those images."""
    image_dir, table = nih_images
    names = sorted(p.name for p in image_dir.iterdir())[:sum(per_archive)]
    rows, start = [], 0
    for i, n in enumerate(per_archive, 1):
        name = f"images_{i:02d}.tar.gz"
        with tarfile.open(www / name, "w:gz") as tar:
            tar.add(image_dir, arcname="images", recursive=False)
            for image in names[start:start + n]:
                tar.add(image_dir / image, arcname=f"images/{image}")
        digest = hashlib.sha256((www / name).read_bytes()).hexdigest()
        rows.append(f"{name}\thttps://nihcc.invalid/{name}\t{digest}\t{n}\n")
        start += n
    listing = www.parent / "downloads.tsv"
    listing.write_text("archive\turl\tsha256\timages\n" + "".join(rows))
    lines = table.read_text().splitlines()
    keep = [lines[0]] + [ln for ln in lines[1:] if ln.split(",")[0] in names]
    return listing, names, "\n".join(keep) + "\n"


def download(target, listing, url, *extra, wait=True):
    cmd = ["bash", str(REPO / "batch_download.sh"), str(target), "--list", str(listing),
           "--mirror", url, "--jobs", "2", *map(str, extra)]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CHEXNET_RETRY_DELAY": "0"})


def snapshot(target):
    return {p.name: p.read_bytes() for p in (target / "images").iterdir()}


def prepared_target(tmp_path, table_text, name="data"):
    target = tmp_path / name
    target.mkdir()
    (target / "Data_Entry_2017_v2020.csv").write_text(table_text)
    return target


@pytest.mark.integration
def test_full_run_then_a_second_run_downloads_nothing(tmp_path, server, nih_images):
    www, url = server
    listing, names, table = make_archives(www, nih_images)
    target = prepared_target(tmp_path, table)
    proc = download(target, listing, url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in (target / "images").iterdir()) == names
    for name in names:  # byte-identical to the originals
        assert (target / "images" / name).read_bytes() == (nih_images[0] / name).read_bytes()
    assert f"all {len(names)} images of Data_Entry_2017_v2020.csv are in" in proc.stdout
    assert "next: python stats.py --data-dir" in proc.stdout
    assert (target / "BBox_List_2017.csv").is_file()
    # The result is a data directory the other scripts accept.
    from dataset import check_data_dir
    check_data_dir(target)
    requests = len(RangeHandler.ranges)
    again = download(target, listing, url)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("already downloaded, verified and extracted") == 3
    assert "downloading" not in again.stdout and len(RangeHandler.ranges) == requests


@pytest.mark.system
def test_killed_mid_download_resumes_to_identical_files(tmp_path, server, nih_images):
    www, url = server
    listing, names, table = make_archives(www, nih_images, per_archive=(12,))
    fresh = prepared_target(tmp_path, table, "fresh")
    assert download(fresh, listing, url).returncode == 0
    target = prepared_target(tmp_path, table)
    RangeHandler.delay = 0.05  # ~1.3 MB/s: a few seconds for the 5 MB archive
    job = download(target, listing, url, wait=False)
    part = target / ".download" / "images_01.tar.gz.part"
    deadline = time.time() + 60
    while not (part.is_file() and part.stat().st_size > 500_000):
        assert job.poll() is None and time.time() < deadline, job.stdout.read()
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    killed_at = part.stat().st_size
    assert not (target / ".download" / "images_01.tar.gz").exists()
    RangeHandler.delay = 0.0
    proc = download(target, listing, url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "continuing the download" in proc.stdout
    assert any(start >= killed_at for start in RangeHandler.ranges)  # resumed, not restarted
    assert snapshot(target) == snapshot(fresh)


@pytest.mark.integration
def test_corrupted_archive_is_reported_and_not_extracted(tmp_path, server, nih_images):
    www, url = server
    listing, names, table = make_archives(www, nih_images)
    good = (www / "images_02.tar.gz").read_bytes()
    (www / "images_02.tar.gz").write_bytes(good[:-100] + bytes(100))  # same size, wrong bytes
    target = prepared_target(tmp_path, table)
    proc = download(target, listing, url)
    assert proc.returncode != 0
    assert "images_02.tar.gz: checksum mismatch" in proc.stderr and "moved aside" in proc.stderr
    assert len(list((target / "images").iterdir())) == 6 + 5  # archives 1 and 3 only
    assert list((target / ".download").glob("images_02.tar.gz.bad-*"))
    assert not (target / ".download" / "images_02.tar.gz.extracted").exists()
    # The mirror is fixed; the next run fetches the archive anew and finishes.
    (www / "images_02.tar.gz").write_bytes(good)
    proc = download(target, listing, url)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (target / "images").iterdir()) == names


@pytest.mark.integration
def test_archive_escaping_the_target_is_refused(tmp_path, server, nih_images):
    www, url = server
    listing, names, table = make_archives(www, nih_images, per_archive=(2,))
    png = (nih_images[0] / names[0]).read_bytes()
    with tarfile.open(www / "images_01.tar.gz", "w:gz") as tar:
        for member in (f"images/{names[0]}", "../evil.png"):
            info = tarfile.TarInfo(member)
            info.size = len(png)
            tar.addfile(info, io.BytesIO(png))
    digest = hashlib.sha256((www / "images_01.tar.gz").read_bytes()).hexdigest()
    listing.write_text("archive\turl\tsha256\timages\n"
                       f"images_01.tar.gz\thttps://nihcc.invalid/x\t{digest}\t2\n")
    target = prepared_target(tmp_path, table)
    proc = download(target, listing, url)
    assert proc.returncode != 0
    assert "'../evil.png' would be written outside" in proc.stderr and "refused" in proc.stderr
    assert not (tmp_path / "evil.png").exists() and not (target / "evil.png").exists()
    assert not list((target / "images").iterdir())
    assert not (target / ".download" / "images_01.tar.gz.extracted").exists()


@pytest.mark.integration
def test_first_n_and_space_check(tmp_path, server, nih_images):
    www, url = server
    listing, names, table = make_archives(www, nih_images)
    target = prepared_target(tmp_path, table)
    proc = download(target, listing, url, "--first", "1", "--delete-archives")
    assert proc.returncode == 0, proc.stderr
    assert f"6 of the {len(names)} images" in proc.stdout and "archives 1-1 of 3" in proc.stdout
    assert not (target / ".download" / "images_01.tar.gz").exists()  # deleted once extracted
    huge = listing.read_text().replace("\t6\n", "\t600000000\n")
    listing.write_text(huge)
    proc = download(target, listing, url)
    assert proc.returncode == 1 and "GB free, about" in proc.stderr and "--no-space-check" in proc.stderr


@pytest.mark.integration
def test_http_error_on_a_partial_download_keeps_it(tmp_path, server, nih_images):
    """A server error while continuing a partial download is not "complete": the .part stays,
    and the next run continues it instead of starting from zero."""
    www, url = server
    listing, names, table = make_archives(www, nih_images, per_archive=(12,))
    target = prepared_target(tmp_path, table)
    part = target / ".download" / "images_01.tar.gz.part"
    part.parent.mkdir()
    data = (www / "images_01.tar.gz").read_bytes()
    part.write_bytes(data[:1_000_000])
    RangeHandler.fail = 500
    proc = download(target, listing, url)
    assert proc.returncode != 0 and "HTTP 500" in proc.stderr
    assert "checksum" not in proc.stderr and part.stat().st_size == 1_000_000
    assert not list(part.parent.glob("*.bad-*"))
    RangeHandler.fail = 0
    proc = download(target, listing, url)
    assert proc.returncode == 0, proc.stderr
    assert "continuing the download" in proc.stdout and RangeHandler.ranges[-1] == 1_000_000
    assert sorted(p.name for p in (target / "images").iterdir()) == names


GOOD_SHA = "a" * 64


@pytest.mark.parametrize("row,fragment", [
    ("images_01.tar.gz\thttps://x.invalid/a\t" + GOOD_SHA, "expected 4 tab-separated fields"),
    ("images_01.tar.gz\thttps://x.invalid/a\t" + GOOD_SHA + "\tmany", "'many' is not a positive number"),
    ("images_01.tar.gz\thttps://x.invalid/a\tnot-a-sha\t5", "'not-a-sha' is not a SHA-256"),
    ("../images_01.tar.gz\thttps://x.invalid/a\t" + GOOD_SHA + "\t5", "is not a plain file name"),
    ("images_01.zip\thttps://x.invalid/a\t" + GOOD_SHA + "\t5", "ending in .tar.gz"),
    ("images_01.tar.gz\tftp://x.invalid/a\t" + GOOD_SHA + "\t5", "is not an http(s) URL"),
    ("images_01.tar.gz\thttps://x.invalid/a\t" + GOOD_SHA + "\t5\n"
     "images_01.tar.gz\thttps://x.invalid/b\t" + GOOD_SHA + "\t5", ":3: archive images_01.tar.gz is listed twice"),
])
@pytest.mark.integration
def test_archive_list_is_checked_before_any_work(tmp_path, row, fragment):
    listing = tmp_path / "downloads.tsv"
    listing.write_text("archive\turl\tsha256\timages\n" + row + "\n")
    target = tmp_path / "data"
    proc = download(target, listing, "http://127.0.0.1:9")
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and fragment in errors[0], proc.stderr
    assert str(listing) in errors[0] and not target.exists()


@pytest.mark.integration
def test_crlf_list_zip_archive_and_repeated_members(tmp_path, server, nih_images):
    """A list with Windows line ends works; a zip named .tar.gz is refused in one line; a file
    that appears twice in an archive is one image."""
    www, url = server
    listing, names, table = make_archives(www, nih_images, per_archive=(2,))
    listing.write_text(listing.read_text().replace("\n", "\r\n"))
    png = (nih_images[0] / names[0]).read_bytes()
    with tarfile.open(www / "images_01.tar.gz", "w:gz") as tar:
        for member in (f"images/{names[0]}", f"images/{names[0]}", f"images/{names[1]}"):
            info = tarfile.TarInfo(member)
            info.size = len(png)
            tar.addfile(info, io.BytesIO(png))
    digest = hashlib.sha256((www / "images_01.tar.gz").read_bytes()).hexdigest()
    listing.write_text(f"archive\turl\tsha256\timages\r\nimages_01.tar.gz\thttps://x.invalid/a\t{digest}\t2\r\n")
    target = prepared_target(tmp_path, table)
    proc = download(target, listing, url)
    assert "images_01.tar.gz: extracted 2 images" in proc.stdout, proc.stdout + proc.stderr
    assert "the list says" not in proc.stderr
    import zipfile
    with zipfile.ZipFile(www / "images_01.tar.gz", "w") as z:
        z.writestr(f"images/{names[0]}", png)
    digest = hashlib.sha256((www / "images_01.tar.gz").read_bytes()).hexdigest()
    listing.write_text(f"archive\turl\tsha256\timages\nimages_01.tar.gz\thttps://x.invalid/a\t{digest}\t1\n")
    other = prepared_target(tmp_path, table, "other")
    proc = download(other, listing, url)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if "images_01" in ln and "zip" in ln]
    assert len(lines) == 1 and "is a zip archive, not a tar.gz" in lines[0]
    assert not list((other / "images").iterdir())
