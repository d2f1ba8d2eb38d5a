"""The node's DICOM vocabulary: its version, the SOP classes it takes and sends, the C-STORE
statuses it answers with, the network limits it holds peers to, and its small exceptions.
Imports nothing of the node's: every other module of node/ may import it."""
import io
import re

from common import DataError

VERSION = "chexnet-serve 1.0"

# The chest X-ray storage SOP classes this node classifies.
CR = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
XRAY_CLASSES = {CR: "CR", DX_PRESENTATION: "DX for presentation",
                DX_PROCESSING: "DX for processing"}
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR (node/sr.py: TID 1500)
# the reports of versions before TID 1500, which an outbox may still hold at an upgrade
OLD_SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
PM_CLASS = "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map (node/pmap.py, --parametric-maps)

# DIMSE C-STORE statuses (PS3.4 B.2.3, PS3.7 C)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH = 0xA900  # data set does not match SOP class
CANNOT_UNDERSTAND = 0xC000
SOP_CLASS_NOT_SUPPORTED = 0x0122
STORED_WARNINGS = (0xB000, 0xB006, 0xB007)  # stored, with coercion or elements discarded

# What the node takes from a peer (DICOM and HTTP)
RECV_BYTES = 2 ** 20  # _recv (node/pynetdicom_internals.py)
MIN_RECV_RATE = 64 * 1024  # bytes per second a PDU must arrive at, after --timeout (_recv)
MAX_PDU_BYTES = 4 * 2 ** 20  # the largest PDU the node accepts (A-ASSOCIATE: Maximum Length)
ASSOCIATE_SECONDS = 5.0  # from connecting to a complete A-ASSOCIATE-RQ (at most --timeout)
# The largest A-ASSOCIATE-RQ the node reads: a real one is a few KB (presentation contexts of
# every storage class, about 13 KB; a user identity of some KB)
MAX_REQUEST_BYTES = 256 * 1024
UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class Refused(Exception):
    """The destination answered, and refused this object."""


class ServeError(DataError):
    """A bad setting or model directory for the node; one line."""


class ResultsError(Exception):
    """Building a result failed with an OSError that is no disk's (pydicom's writer raises
    OSError for a value it cannot encode): the image's fault, not the spool's."""


class SpoolError(Exception):
    """The spool cannot be written (a full disk, a read-only or failing file system): never the
    image's fault. What was being written is not there (nothing half-written), and the image
    it was for stays in the inbox and is tried again (Node._later)."""


def encode_file(ds):
    """A data set as the bytes of its DICOM file."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
