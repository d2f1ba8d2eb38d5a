"""Query/retrieve in: ask a PACS for the chest X-ray studies of a date range (C-FIND) and move
their CR/DX series (C-MOVE) to the DICOM node, which classifies them as any image sent to it.

    python retrieve.py --pacs PACS@10.0.0.5:104 --node-ae CHEXNET \\
        --from 2026-01-01 --to 2026-01-31 --state /var/lib/chexnet/retrieve.jsonl

The PACS must know the node as a DICOM modality (its AE title, address and port: the C-MOVE
destination) and let this command's AE title (--ae-title, default the node's) query and move.
Each series moved whole is recorded in --state (appended, fsynced): a rerun, after a kill -9
or a failure, moves only what is missing. At most --max-retrievals C-MOVEs at once (default 1:
the PACS serves people too). Exit status 0 only where every series found was moved. See
docs/serve.md, "Query/retrieve".
"""
import datetime
import re
import sys

import optional

if __name__ == "__main__":  # a missing package is one line, before the imports below fail
    try:
        optional.dicom_node()
    except optional.MissingPackage as e:
        sys.exit(f"error: {e}")
from common import (ArgumentParser, DataError, ae_title, dicom_address, one_line,  # noqa: E402
                    positive_float, positive_int)
from node.retrieve import RetrieveSettings, Run  # noqa: E402
from node.settings import Destination  # noqa: E402

MODALITIES = ("CR", "DX")  # what the node classifies
MAX_RETRIEVALS = 8  # the node's --max-associations default: more would be refused there


def pacs(text):
    """'AE@HOST:PORT' -> Destination (argparse type)."""
    return Destination(*dicom_address(text))


def day(text):
    import argparse
    try:
        # a year from 1000: a DICOM date is 8 digits (Python writes year 999 as 3)
        if not re.fullmatch(r"[1-9]\d{3}-\d{2}-\d{2}", text):
            raise ValueError
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a date YYYY-MM-DD, e.g. "
                                         "2026-01-31") from None


def timeout(text):
    import argparse
    value = positive_float(text)
    if value > 3600:  # more is no timeout (and overflows the socket's)
        raise argparse.ArgumentTypeError(f"at most 3600 seconds, got {text}")
    return value


def max_retrievals(text):
    import argparse
    value = positive_int(text)
    if value > MAX_RETRIEVALS:
        raise argparse.ArgumentTypeError(f"at most {MAX_RETRIEVALS} (the node's "
                                         f"--max-associations default), got {value}")
    return value


def get_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--pacs", type=pacs, required=True, metavar="AE@HOST:PORT",
                   help="the PACS to query and move from: AE@HOST:PORT")
    p.add_argument("--node-ae", type=ae_title, required=True,
                   help="the node's AE title, as the PACS knows it among its modalities (the "
                        "C-MOVE destination)")
    p.add_argument("--ae-title", type=ae_title, default=None,
                   help="this command's calling AE title (default --node-ae: one modality "
                        "entry at the PACS serves both)")
    p.add_argument("--from", dest="date_from", type=day, required=True, metavar="YYYY-MM-DD",
                   help="first study date, YYYY-MM-DD")
    p.add_argument("--to", dest="date_to", type=day, required=True, metavar="YYYY-MM-DD",
                   help="last study date, YYYY-MM-DD (included)")
    p.add_argument("--modality", nargs="+", choices=MODALITIES, default=list(MODALITIES),
                   help="the series modalities moved (default CR DX)")
    p.add_argument("--state", required=True, metavar="FILE",
                   help="the journal of the series moved (JSON lines): a rerun moves only the "
                        "rest")
    p.add_argument("--max-retrievals", type=max_retrievals, default=1, metavar="N",
                   help=f"C-MOVEs at once, each on an association of its own (default 1, at most "
                        f"{MAX_RETRIEVALS})")
    p.add_argument("--timeout", type=timeout, default=60.0,
                   help="seconds to wait for each answer of the PACS (default 60)")
    p.add_argument("--dry-run", action="store_true",
                   help="list the series that would be moved; move nothing, write nothing")
    args = p.parse_args(argv)
    if args.date_from > args.date_to:
        p.error(f"argument --from: {args.date_from} is after --to {args.date_to}")
    return args


def settings_of(args):
    return RetrieveSettings(
        pacs=args.pacs, node_ae=args.node_ae, ae_title=args.ae_title or args.node_ae,
        date_from=args.date_from, date_to=args.date_to,
        modalities=tuple(dict.fromkeys(args.modality)), state=args.state,
        max_retrievals=args.max_retrievals, timeout=args.timeout, dry_run=args.dry_run)


def main(argv=None):
    settings = settings_of(get_args(argv))

    def say(line):
        print(line, flush=True)

    def warn(line):
        print(line, file=sys.stderr, flush=True)

    try:
        return Run(settings, say, warn).run()
    except DataError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"error: interrupted; --state {settings.state} holds the series moved whole: "
              "rerun to move the rest", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    sys.exit(main())
