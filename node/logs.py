"""Process-wide logging set-up for the command line entry points."""

import logging
import sys
import warnings

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class OneLineFormatter(logging.Formatter):
    """Escapes line breaks in messages, so that a value a peer sent (a UID with a newline,
    quoted by us or by pynetdicom) cannot forge log entries. Tracebacks keep their lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = record.message.replace("\r", "\\r").replace("\n", "\\n")
        return super().formatMessage(record)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
    # pynetdicom narrates every PDU at INFO; the node logs what an operator needs.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # highdicom narrates every attribute it copies at INFO, and quotes a patient's name when it
    # finds one odd (as a Python warning, or in highdicom.base's warnings): the log names UIDs,
    # never patients, so neither reaches it.
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    logging.getLogger("highdicom.base").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="The string .* is unlikely to represent the intended person")
    # pydicom warns (as Python warnings) about every odd value it reads; the node
    # reports what it refuses itself, and odd-but-readable data is normal in the field.
    warnings.filterwarnings("ignore", module="pydicom")
