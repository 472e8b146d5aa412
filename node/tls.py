"""DICOM over TLS (PS3.15 B.1): the contexts the acceptor and the node's own associations
use, built once at start-up from ``[tls]`` so that a bad file stops the start, not the
first association.

pynetdicom's TLS acceptor completes each handshake in its one accepting thread, with no
time limit: a peer that opens a connection and says nothing would stop every other peer
from connecting. So the server context defers the handshake, and
:func:`complete_handshake` (bound to EVT_CONN_OPEN) completes it in the connection's own
thread, within ``dicom.acse_timeout``, logging a failure with the peer's address.
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pynetdicom.events import Event

from node.errors import TlsConfigError
from node.settings import Destination, TlsSettings

log = logging.getLogger(__name__)

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_SOURCE_LOCATION = re.compile(r"\s*\(_ssl\.c:\d+\)$")


class _HandshakeLater(ssl.SSLContext):
    """A server context whose sockets leave the handshake to :func:`complete_handshake`."""

    def wrap_socket(  # type: ignore[override]
        self, sock: socket.socket, server_side: bool = False, **options: Any
    ) -> ssl.SSLSocket:
        options["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, server_side, **options)


class _EncryptedKey(Exception):
    """Raised instead of prompting for a pass phrase: the node runs unattended."""


def server_context(settings: TlsSettings) -> ssl.SSLContext:
    """The acceptor's context: its certificate, and client certificates checked against
    ``tls.ca_certificates`` (required with ``tls.require_client_certificate``, else checked
    when presented, or not at all without a CA bundle). Raises :class:`TlsConfigError`."""
    if settings.certificate is None or settings.private_key is None:
        raise TlsConfigError("tls.certificate and tls.private_key must be set when tls.enabled is true")
    context = _HandshakeLater(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[settings.minimum_version]
    _load_identity(context, settings.certificate, settings.private_key)
    if settings.ca_certificates is not None:
        _load_authorities(context, settings.ca_certificates)
        context.verify_mode = ssl.CERT_REQUIRED if settings.require_client_certificate else ssl.CERT_OPTIONAL
    elif settings.require_client_certificate:
        raise TlsConfigError("tls.ca_certificates must be set when tls.require_client_certificate is true")
    return context


def client_context(settings: TlsSettings) -> ssl.SSLContext:
    """The context of the node's associations to TLS destinations: their certificates
    checked against ``tls.ca_certificates`` (the system's trusted CAs when unset) and their
    host names; the node's own certificate offered when one is set. Raises
    :class:`TlsConfigError`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the peer and its host name
    context.minimum_version = _VERSIONS[settings.minimum_version]
    if settings.ca_certificates is not None:
        _load_authorities(context, settings.ca_certificates)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if settings.certificate is not None and settings.private_key is not None:
        _load_identity(context, settings.certificate, settings.private_key)
    return context


class OutgoingTls:
    """What the node's own associations to ``[[destinations]]`` pass pynetdicom as
    ``tls_args``: the client context and the host name to check, for destinations with
    ``tls = true``; None for the others."""

    def __init__(self, context: ssl.SSLContext | None) -> None:
        self._context = context

    @classmethod
    def for_destinations(cls, settings: TlsSettings, destinations: Sequence[Destination]) -> OutgoingTls:
        """Build the client context only where a destination needs it: a node without TLS
        destinations starts without ``[tls]`` files."""
        return cls(client_context(settings) if any(d.tls for d in destinations) else None)

    def tls_args(self, destination: Destination) -> tuple[ssl.SSLContext, str] | None:
        if not destination.tls:
            return None
        if self._context is None:  # never sent in the clear instead
            raise TlsConfigError(f"destination {destination.name} needs TLS, and no client context was built")
        return self._context, destination.host


PLAIN = OutgoingTls(None)


def complete_handshake(event: Event, timeout: float) -> None:
    """EVT_CONN_OPEN of a TLS acceptor: complete the handshake within ``timeout`` seconds.

    A peer that fails it (no certificate, one no trusted CA signed, plain DICOM, silence)
    is logged at WARNING with its address, and its connection closed: pynetdicom then
    sees a closed transport and ends the association before any PDU is read.
    """
    channel = getattr(event.assoc.dul.socket, "socket", None)
    if not isinstance(channel, ssl.SSLSocket):
        return
    requestor = event.assoc.requestor
    host, port = requestor.address, requestor.port
    restore = channel.gettimeout()
    try:
        channel.settimeout(timeout)
        channel.do_handshake()
        channel.settimeout(restore)
    except (OSError, ValueError) as exc:  # ssl.SSLError and TimeoutError are OSErrors
        log.warning("TLS handshake with %s:%s failed: %s", host, port, _why(exc, timeout))
        channel.close()
        return
    log.info("TLS %s with %s:%s, client certificate %s", channel.version(), host, port, _subject(channel))


def _why(exc: Exception, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no handshake within {timeout:g} s (dicom.acse_timeout)"
    if isinstance(exc, ssl.SSLEOFError) or (isinstance(exc, OSError) and not str(exc)):
        return "the peer closed the connection"
    return _SOURCE_LOCATION.sub("", str(exc))


def _subject(channel: ssl.SSLSocket) -> str:
    certificate = channel.getpeercert()
    if not certificate:
        return "none"
    subject: Any = certificate.get("subject", ())
    names = [f"{attribute[0]}={attribute[1]}" for rdn in subject for attribute in rdn]
    return ", ".join(names) or "without subject"


def _readable(key: str, path: Path) -> None:
    try:
        with path.open("rb") as file:
            file.read(1)
    except OSError as exc:
        raise TlsConfigError(f"tls.{key}: cannot read {path}: {exc.strerror or exc}") from None


def _load_identity(context: ssl.SSLContext, certificate: Path, private_key: Path) -> None:
    _readable("certificate", certificate)
    _readable("private_key", private_key)
    _certificates_in("certificate", certificate)
    try:
        context.load_cert_chain(certificate, private_key, password=_no_pass_phrase)
    except _EncryptedKey:
        raise TlsConfigError(
            f"tls.private_key: {private_key} is encrypted; the node needs it unencrypted "
            "(readable by the node's user only)"
        ) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsConfigError(
                f"tls.private_key: {private_key} is not the key of tls.certificate {certificate}"
            ) from None
        raise TlsConfigError(f"tls.private_key: {private_key} holds no PEM private key") from None


def _load_authorities(context: ssl.SSLContext, bundle: Path) -> None:
    _readable("ca_certificates", bundle)
    _certificates_in("ca_certificates", bundle)
    context.load_verify_locations(cafile=bundle)


def _certificates_in(key: str, path: Path) -> None:
    """Raise unless ``path`` holds at least one PEM certificate (what OpenSSL's own
    message, 'PEM lib', does not say)."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except ssl.SSLError:
        raise TlsConfigError(f"tls.{key}: {path} holds no PEM certificate") from None


def _no_pass_phrase() -> str:
    raise _EncryptedKey
