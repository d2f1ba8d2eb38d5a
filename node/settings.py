"""The node's settings as values: serve.py builds one NodeSettings from its flags, once, and
the node's modules take it (or the few values they need) from there, never the flags."""
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple, Union


class Destination(NamedTuple):
    ae_title: str
    host: str
    port: int

    def __str__(self):
        return f"{self.ae_title}@{self.host}:{self.port}"


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
    parametric_maps: bool
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

