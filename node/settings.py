"""The node's settings as values: serve.py builds one NodeSettings from its flags, once, and
the node's modules take it (or the few values they need) from there, never the flags."""
import argparse
import re
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple, Union


class Destination(NamedTuple):
    ae_title: str
    host: str
    port: int

    def __str__(self):
        return f"{self.ae_title}@{self.host}:{self.port}"


def ae_title(text):
    """An AE title as a flag gives it (argparse type, serve.py's and retrieve.py's)."""
    if not 0 < len(text) <= 16 or "\\" in text or not text.isprintable() or text.strip() != text:
        raise argparse.ArgumentTypeError(f"{text!r}: an AE title is 1-16 printable characters, "
                                         "no backslash, no leading or trailing space")
    return text


def dicom_address(text):
    """'AE@HOST:PORT' -> Destination (argparse type, serve.py's and retrieve.py's)."""
    match = re.fullmatch(r"([^@]{1,16})@([^:@\s]+):(\d{1,5})", text)
    if not match or not 0 < int(match.group(3)) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: expected AE@HOST:PORT, e.g. "
                                         "PACS@10.0.0.5:104")
    ae_title(match.group(1))
    return Destination(match.group(1), match.group(2), int(match.group(3)))


class WebDestination(NamedTuple):
    """A DICOMweb service's root (STOW-RS at <root>/studies): no credentials in it (they are
    read from a file: --destination-token-file, --destination-basic-auth-file)."""
    url: str
    scheme: str  # http or https
    host: str
    port: int
    path: str

    def __str__(self):
        return self.url


@dataclass(frozen=True)
class NodeSettings:
    """One field per flag of serve.py, by the flag's name (see `python serve.py --help`), each
    checked by the command line already."""
    model_dir: str
    mode: str
    rule: str
    no_operating_points: bool
    spool: str
    ae_title: str
    host: str
    port: int
    allow_ae: Optional[Tuple[str, ...]]  # None: any calling AE title (--allow-any-ae)
    destination: Union[Destination, WebDestination]
    max_associations: int
    max_queue: int
    max_image_mb: float
    worker_memory_mb: Optional[float]
    workers: int
    result_workers: int
    send_associations: int
    streams: Optional[int]
    no_heatmaps: bool
    uncompressed_heatmaps: bool
    uid_root: str
    keep_done_days: Optional[float]
    retry_seconds: float
    retry_max_seconds: float
    timeout: float
    tls_cert: Optional[str]
    tls_key: Optional[str]
    tls_ca: Optional[str]
    destination_tls_ca: Optional[str]
    destination_tls_cert: Optional[str]
    destination_tls_key: Optional[str]
    destination_token_file: Optional[str]
    destination_basic_auth_file: Optional[str]
    http_port: Optional[int]
    http_token_file: Optional[str]
    log_level: str

