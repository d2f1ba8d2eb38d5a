"""The node's log: one logger, "serve" (every line says it, as before the node was a package),
set up alike in the node's process and in each worker process."""
import logging
import sys

log = logging.getLogger("serve")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level):
    """The node's log (stderr), in its process and in each worker process."""
    logging.basicConfig(level=level, stream=sys.stderr, format=LOG_FORMAT)
    for noisy in ("pynetdicom", "highdicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # pydicom logs a traceback for every undecodable image: the quarantine line says it once
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
