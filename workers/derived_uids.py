"""UIDs of the objects Precedent derives (Structured Reports, Grad-CAM captures).

Derived from what the object is made of, never random: a retried task, a second worker
or a rerun after a crash makes the same UIDs, so a PACS receives the same object again
(and keeps one copy), never a duplicate (DESIGN.md, "work is idempotent").
"""

from __future__ import annotations

import uuid

_NAMESPACE = "precedent"


def derived_uid(kind: str, *sources: str) -> str:
    """A ``2.25`` UID (ISO/IEC 9834-8, a hash of the sources) for the object of ``kind``
    (e.g. ``"sc-series"``) made from ``sources`` (e.g. a SOP Instance UID and a model id)."""
    # A name-based UUID (RFC 4122 version 5) as the 2.25 root requires: at most 39 digits.
    name = "\x00".join([_NAMESPACE, kind, *sources])
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"
