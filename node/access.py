"""Who may open an association with the node, decided before any data flows."""

from __future__ import annotations

import enum

from node.settings import CallingAE


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
