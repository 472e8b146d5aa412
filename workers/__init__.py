"""The analysis side of Precedent: Celery tasks, decoding, models, Grad-CAM, results."""

import importlib.metadata


def software_version() -> str:
    """What derived objects name as the software that made them (SoftwareVersions)."""
    try:
        return f"precedent {importlib.metadata.version('precedent')}"
    except importlib.metadata.PackageNotFoundError:
        return "precedent (not installed)"
