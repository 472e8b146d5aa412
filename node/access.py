"""Who may open an association with the node, decided before any data flows."""

from __future__ import annotations

import enum

from node.errors import NotPermitted
from node.settings import CallingAE, DicomSettings, Service


class Refusal(enum.Enum):
    CALLING_AE_NOT_RECOGNIZED = "calling AE title not allowed"
    CALLED_AE_NOT_RECOGNIZED = "called AE title is not one of this node's"


class AccessPolicy:
    """The calling-AE allowlist (empty: anyone) and the AE titles the node answers to."""

    def __init__(self, allowed: list[CallingAE], called_ae_titles: set[str]) -> None:
        self._allowed = allowed
        self._called_ae_titles = {title.strip() for title in called_ae_titles}

    def refusal(self, calling_ae_title: str, called_ae_title: str, address: str) -> Refusal | None:
        """Why this association must be refused, or None to accept it."""
        if called_ae_title.strip() not in self._called_ae_titles:
            return Refusal.CALLED_AE_NOT_RECOGNIZED
        if self._allowed and not any(entry.admits(calling_ae_title, address) for entry in self._allowed):
            return Refusal.CALLING_AE_NOT_RECOGNIZED
        return None


class Permissions:
    """``dicom.permissions``: what each calling AE may ask once associated, checked per
    request (the allowlist above decides who may associate at all)."""

    def __init__(self, settings: DicomSettings) -> None:
        self._settings = settings

    def check(self, calling_ae_title: str, service: Service) -> None:
        """Raise :class:`NotPermitted`, its message fit for an Error Comment (64 characters
        at most), when this AE may not use ``service``."""
        if service not in self._settings.services_of(calling_ae_title):
            raise NotPermitted(f"calling AE {calling_ae_title.strip()} may not {service} (dicom.permissions)")
