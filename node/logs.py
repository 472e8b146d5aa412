"""Process-wide logging set-up for the command line entry points."""

import logging
import sys
import warnings


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # pynetdicom narrates every PDU at INFO; the node logs what an operator needs.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # pydicom warns (as Python warnings) about every odd value it reads; the node
    # reports what it refuses itself, and odd-but-readable data is normal in the field.
    warnings.filterwarnings("ignore", module="pydicom")
