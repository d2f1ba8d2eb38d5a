"""A DICOM node for the clinic: a Storage SCP that classifies every chest X-ray sent to it with
the exported OpenVINO model (INT8 by default) and sends the results back by C-STORE (or by
STOW-RS to a DICOMweb service).

    python serve.py --model-dir models --ae-title CHEXNET --port 11112 \\
        --allow-ae PACS MODALITY1 --destination PACS@10.0.0.5:104 --spool /var/lib/chexnet

For each CR or DX image (for presentation or processing) it receives: the ten-crop prediction of
`python infer.py --mode int8 --image FILE` (the same functions, the same probabilities), a
DICOM Structured Report (highdicom) in the image's study with every finding's probability,
threshold and decision, the model's identity and a research-use-only statement, and for each
positive finding a secondary-capture heatmap (the exported model's class activation maps).

Nothing is lost: an image is written to SPOOL/inbox/ (fsync, atomic rename) before the success
status goes back; its results wait in SPOOL/outbox/ until the destination accepts them (retried
with backoff); SPOOL/done/ records every finished SOP Instance UID. After a kill -9, a restart
finishes every accepted image once: a resent image is recognised by its UID, and the results'
UIDs derive from the source UID and the model digest, so a PACS never sees two reports.
Refusals (caller not allowed, too many associations, queue full, image declared too large, not a
chest X-ray SOP class, malformed object) each get their DIMSE status and a log line; malformed
objects go to SPOOL/quarantine/ with a .txt reason. Optional HTTP: POST /predict, GET /health.

Torch is never imported: an edge box needs openvino, numpy, pillow, pydicom (+ pylibjpeg
decoders), pynetdicom, highdicom and matplotlib (heatmap colours). See docs/serve.md.
"""
import logging
import os
import re
import signal
import sys
import threading
import time
from dataclasses import fields
from pathlib import Path

import optional

if __name__ == "__main__":  # a missing package is one line, before the imports below fail
    try:
        optional.dicom_node()
    except optional.MissingPackage as e:
        sys.exit(f"error: {e}")
# node/ imports pydicom, highdicom and pynetdicom here, once, before any thread: a first import
# racing in several threads fails
from common import (ArgumentParser, DataError, SetupError, ae_title,  # noqa: E402
                    dicom_address, exclusive_lock, one_line, os_reason, positive_float,
                    positive_int)
from images import MAX_DECODED_BYTES  # noqa: E402
from node.core import Node  # noqa: E402
from node.dicom import UID_RE, VERSION, ServeError  # noqa: E402
from node.http import read_token, start_http  # noqa: E402
from node.logs import log, setup_logging  # noqa: E402
from node.network import start_dicom  # noqa: E402
from node.pipeline import Model  # noqa: E402
from node.pynetdicom_internals import check_pynetdicom_version  # noqa: E402
from node.settings import Destination, NodeSettings, WebDestination  # noqa: E402
from node.spool import Spool  # noqa: E402
from node.stow import authorization  # noqa: E402
from node.tls import sending_tls, tls_context  # noqa: E402


# ---------------------------------------------------------------------------------------------
# The command line

def destination(text):
    """'AE@HOST:PORT' -> Destination, 'https://HOST[:PORT]/PATH' (a DICOMweb service's root) ->
    WebDestination (argparse type)."""
    if re.match(r"(?i)https?://", text):
        return web_destination(text)
    return Destination(*dicom_address(text))


def web_destination(text):
    import argparse
    from urllib.parse import urlsplit
    try:
        url = urlsplit(text)
        port = url.port or (443 if url.scheme.lower() == "https" else 80)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    if url.username is not None or url.password is not None:
        raise argparse.ArgumentTypeError(
            f"{url.scheme}://{url.hostname}...: no credentials in the URL (a process list shows "
            "them): --destination-token-file or --destination-basic-auth-file")
    if url.port == 0 or any(c.isspace() or not c.isprintable() for c in text):
        raise argparse.ArgumentTypeError(f"{text!r}: a port 1-65535, no spaces or control "
                                         "characters (percent-encode them)")
    if not url.hostname or url.query or url.fragment:
        raise argparse.ArgumentTypeError(f"{text!r}: expected the DICOMweb service's root, "
                                         "e.g. https://pacs.example.org/dicom-web")
    return WebDestination(text, url.scheme.lower(), url.hostname, port, url.path or "/")


def port(text):
    import argparse
    if not text.isdigit() or not 0 <= int(text) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: not a port (0-65535)")
    return int(text)


def get_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--model-dir", default="models", help="what infer.sh exported")
    p.add_argument("--mode", default="int8", choices=["int8", "fp32"])
    p.add_argument("--rule", default="youden", choices=["youden", "f1", "sensitivity"],
                   help="which of the operating points chosen on val decides")
    p.add_argument("--no-operating-points", action="store_true",
                   help="run without operating points (probabilities only, no decisions, no "
                        "heatmaps) where `infer.py --part val` has not chosen them")
    p.add_argument("--spool", required=True,
                   help="directory of the inbox, outbox, done records and quarantine")
    p.add_argument("--ae-title", type=ae_title, default="CHEXNET", help="this node's AE title")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on")
    p.add_argument("--port", type=port, default=11112, help="DICOM port")
    p.add_argument("--allow-ae", type=ae_title, nargs="+", default=None,
                   help="calling AE titles allowed to send (others refused at association)")
    p.add_argument("--allow-any-ae", action="store_true",
                   help="accept any calling AE title (instead of --allow-ae)")
    p.add_argument("--destination", type=destination, default=None,
                   help="where results go: AE@HOST:PORT (the PACS, by C-STORE) or the root of "
                        "a DICOMweb service, https://HOST/dicom-web (by STOW-RS)")
    p.add_argument("--max-associations", type=positive_int, default=8)
    p.add_argument("--max-queue", type=positive_int, default=1000,
                   help="images accepted and not yet classified; more are refused (0xA700)")
    p.add_argument("--max-image-mb", type=positive_float, default=128.0,
                   help="largest image by its header (rows x columns x frames x samples x "
                        "bytes); larger ones are refused before decoding (0xA700); at most "
                        "128")
    p.add_argument("--worker-memory-mb", type=positive_float, default=None,
                   help="address space each worker process may take beyond its start-up size, "
                        "so that a decoder misled by a hostile file fails alone (default 2048 "
                        "+ 8 x --max-image-mb)")
    p.add_argument("--workers", type=positive_int, default=max(1, (os.cpu_count() or 1) // 4),
                   help="decoding processes (default a quarter of the cores)")
    p.add_argument("--result-workers", "--result-threads", type=positive_int, default=2,
                   help="processes building reports and heatmaps (--result-threads: its old "
                        "name)")
    p.add_argument("--send-associations", type=positive_int, default=2,
                   help="associations sending results to the destination at once (each sends "
                        "its share of the images, one result after another)")
    p.add_argument("--streams", type=positive_int, default=None,
                   help="OpenVINO CPU streams (default: the THROUGHPUT hint chooses, as infer.py)")
    p.add_argument("--no-heatmaps", action="store_true", help="send the report only")
    p.add_argument("--uncompressed-heatmaps", action="store_true",
                   help="write heatmaps uncompressed (3 MB for a 1024x1024 image), not JPEG "
                        "Baseline (about 0.2 MB, lossy and marked so; sent decompressed to a "
                        "destination that does not accept JPEG)")
    p.add_argument("--parametric-maps", action="store_true",
                   help="also send each heatmap's class activation map as a DICOM Parametric "
                        "Map (values 0-1 on the image's pixel grid, 2 MB for a 1024x1024 "
                        "image), which a viewer can overlay on the X-ray (docs/serve.md)")
    p.add_argument("--uid-root", default="1.2.826.0.1.3680043.8.498.",
                   help="UID prefix of the results (your organisation's root)")
    p.add_argument("--keep-done-days", type=positive_float, default=None,
                   help="delete done/ records (one small JSON per image: its findings) older "
                        "than this, hourly; default: keep them all")
    p.add_argument("--retry-seconds", type=positive_float, default=2.0,
                   help="first wait before resending to a destination that failed")
    p.add_argument("--retry-max-seconds", type=positive_float, default=300.0,
                   help="longest wait between resends (the backoff doubles up to it)")
    p.add_argument("--timeout", type=positive_float, default=30.0,
                   help="DICOM network timeouts, seconds")
    p.add_argument("--tls-cert", default=None, help="TLS: this node's certificate (PEM)")
    p.add_argument("--tls-key", default=None, help="TLS: its private key (PEM)")
    p.add_argument("--tls-ca", default=None,
                   help="TLS: CA certificates; senders must then present a certificate it signed")
    p.add_argument("--destination-tls-ca", default=None,
                   help="TLS to the destination: the CA certificates its certificate must be "
                        "signed by (an https:// destination without it: the system's CAs)")
    p.add_argument("--destination-tls-cert", default=None,
                   help="the certificate the node presents to the destination (default "
                        "--tls-cert; a client certificate may differ from the server's)")
    p.add_argument("--destination-tls-key", default=None, help="its private key (PEM)")
    p.add_argument("--destination-token-file", default=None,
                   help="an https:// destination: the bearer token, read from this file (at "
                        "start and at every connection: a rotated token needs no restart)")
    p.add_argument("--destination-basic-auth-file", default=None,
                   help="an https:// destination: HTTP basic authentication, one line "
                        "USER:PASSWORD in this file")
    p.add_argument("--http-port", type=port, default=None,
                   help="also serve POST /predict and GET /health on this port")
    p.add_argument("--http-token-file", default=None,
                   help="HTTP bearer token, read from this file (or $CHEXNET_HTTP_TOKEN)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    args = p.parse_args(argv)
    if not args.allow_ae and not args.allow_any_ae:
        p.error("argument --allow-ae: name the AE titles allowed to send (or --allow-any-ae)")
    if args.allow_ae and args.allow_any_ae:
        p.error("argument --allow-any-ae: not with --allow-ae")
    if args.max_image_mb > MAX_DECODED_BYTES / 2 ** 20:  # what every decoder refuses anyway
        p.error(f"argument --max-image-mb: at most {MAX_DECODED_BYTES / 2 ** 20:g} (an 8192x8192 "
                "16-bit image: images.MAX_DECODED_BYTES)")
    if args.uncompressed_heatmaps and args.no_heatmaps:
        p.error("argument --uncompressed-heatmaps: not with --no-heatmaps")
    if args.parametric_maps and args.no_heatmaps:
        p.error("argument --parametric-maps: not with --no-heatmaps")
    if args.destination is None:
        p.error("argument --destination: where should the results go? AE@HOST:PORT or "
                "https://HOST/dicom-web")
    web = isinstance(args.destination, WebDestination)
    if args.destination_token_file and args.destination_basic_auth_file:
        p.error("argument --destination-basic-auth-file: not with --destination-token-file")
    credentials = args.destination_token_file or args.destination_basic_auth_file
    if credentials and not web:
        flag = ("--destination-token-file" if args.destination_token_file
                else "--destination-basic-auth-file")
        p.error(f"argument {flag}: only for a DICOMweb destination (https://...)")
    if credentials and args.destination.scheme == "http" and args.destination.host not in (
            "localhost", "127.0.0.1", "::1"):
        p.error(f"argument --destination: {args.destination} is plain http: the credentials "
                "would cross the network readable; use https://")
    if web and args.destination.scheme == "http" and (
            args.destination_tls_ca or args.destination_tls_cert):
        p.error("argument --destination-tls-ca: TLS needs an https:// destination")
    if bool(args.tls_cert) != bool(args.tls_key) or (args.tls_ca and not args.tls_cert):
        p.error("argument --tls-cert: TLS needs both --tls-cert and --tls-key")
    if bool(args.destination_tls_cert) != bool(args.destination_tls_key) or (
            args.destination_tls_cert and not args.destination_tls_ca and not web):
        p.error("argument --destination-tls-cert: needs --destination-tls-key and "
                "--destination-tls-ca")
    if not args.uid_root.endswith(".") or not UID_RE.match(args.uid_root[:-1]) \
            or len(args.uid_root) > 32:
        p.error(f"argument --uid-root: {args.uid_root!r} is not a UID prefix ending in '.' "
                "(at most 32 characters)")
    return args


def node_settings(args):
    """The NodeSettings of the parsed flags, built once: what node/ takes (values, never the
    flags themselves)."""
    values = {f.name: getattr(args, f.name) for f in fields(NodeSettings)}
    values["allow_ae"] = tuple(args.allow_ae) if args.allow_ae else None
    return NodeSettings(**values)


# ---------------------------------------------------------------------------------------------
# Start, signals, stop

def main(argv=None):
    settings = node_settings(get_args(argv))
    setup_logging(settings.log_level.upper())
    try:  # before anything is made or loaded: another pynetdicom's internals may differ
        check_pynetdicom_version()
    except ServeError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(1)
    try:
        spool = Spool(settings.spool)
    except OSError as e:
        print(f"error: --spool {settings.spool}: {os_reason(e)}", file=sys.stderr)
        sys.exit(1)
    try:
        with exclusive_lock(Path(settings.spool) / ".lock", "another serve.py",
                            "give each node its own --spool"):
            if not settings.no_heatmaps:  # imported by the worker processes, checked here
                optional.heatmaps()
            tls_context(settings.tls_cert, settings.tls_key, settings.tls_ca)
            sending_tls(settings)
            authorization(settings.destination_token_file, settings.destination_basic_auth_file)
            read_token(settings.http_token_file)
            model = Model(settings.model_dir, settings.mode, settings.rule, settings.streams,
                          settings.workers, settings.no_operating_points)
            spool.clean_leftovers()
            node = Node(settings, model, spool)
            return run(node, settings, spool)
    except (DataError, SetupError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(1)


def wait_for_stop():
    """Return when SIGTERM or SIGINT arrives (the main thread only).

    The handler only notes the signal, and the main thread looks every 0.5 s. Python runs a
    handler in the main thread between two bytecodes, and a wait there wakes only for signals
    the kernel delivers to the main thread: one delivered to another thread (OpenVINO's,
    pynetdicom's) never woke an untimed wait (SIGTERM unanswered about one time in ten). Nor
    may the handler take a lock: Event.set() from it, run as the main thread's timed
    Event.wait took back that Event's lock, deadlocked the node for good."""
    signals = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: signals.append(signum))
    while not signals:
        time.sleep(0.5)
    # a second signal ends the node at once, as kill -9 would (nothing accepted is lost)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)


def run(node, settings, spool):
    pending = spool.pending_images()
    with node.lock:
        node.queued.update(pending)
    for uid in pending:
        node.todo.put(uid)
    threads = [threading.Thread(target=node.decode_forever, name=f"decode-{i}", daemon=True)
               for i in range(settings.workers)]
    senders = [threading.Thread(target=node.send_forever, args=(i,), name=f"send-{i}",
                                daemon=True) for i in range(settings.send_associations)]
    threads += senders
    if settings.keep_done_days is not None:
        threads.append(threading.Thread(target=node.prune_forever,
                                        args=(settings.keep_done_days,), name="prune",
                                        daemon=True))
    for t in threads:
        t.start()
    try:
        server = start_dicom(node, settings)
    except OSError as e:
        raise ServeError(f"--port {settings.port}: cannot listen ({os_reason(e)})") from None
    http = start_http(node, settings) if settings.http_port is not None else None
    log.info("%s listening as %s on %s:%d (%s, %d classes, model sha256 %s)%s; results to %s; "
             "%d images to finish from before", VERSION, settings.ae_title, settings.host,
             server.server_address[1], settings.mode, len(node.model.class_names),
             node.model.identity["sha256"][:16],
             f"; HTTP on port {http.server_address[1]}" if http else "", settings.destination,
             len(pending))
    if node.model.points is None:
        log.warning("no operating points: probabilities only, no decisions or heatmaps")
    wait_for_stop()
    log.info("stopping: accepted images not yet finished stay in %s and are finished at the "
             "next start", spool.inbox)
    node.stopping.set()
    for ready in node.results_ready:  # an association open for more results is released
        ready.set()
    node.doorman.stop()
    server.shutdown()
    node.workers.shutdown()
    if http is not None:
        http.shutdown()
    deadline = time.monotonic() + 2.0  # releasing takes a round trip; a hung destination is left
    for sender in senders:
        sender.join(timeout=max(0.0, deadline - time.monotonic()))
    return 0


if __name__ == "__main__":
    code = main()
    # Out at once, as after kill -9 (which loses nothing): images being decoded or their
    # results built stay in the inbox for the next start; waiting for them (the interpreter
    # joins the worker pool at exit) could take as long as a decoder that hangs.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
