"""DICOM over TLS (PS3.15 B.1): the acceptor, the node's own associations, and bad files.

A throw-away PKI made with the ``openssl`` command: a CA; the node's certificate for
localhost and 127.0.0.1, which it also presents as a client; a modality's certificate the
CA signed; one another CA signed; and a destination's certificate for another host name.
Peers are DCMTK's echoscu and storescu where a modality would be (``+tls key cert +cf
ca``), pynetdicom AEs where the test plays a viewer or a destination.
"""

from __future__ import annotations

import logging
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove  # type: ignore[attr-defined]
from sqlalchemy import select

from node.catalog.deliveries import DeliveryQueue
from node.catalog.models import INSTANCES
from node.errors import TlsConfigError
from node.service import Node
from node.settings import ConfigError, Settings, load_settings
from tests.support.data import PYDICOM_TEST_DIR
from tests.support.dcmtk import DCMTK_ENV, dcmtk, storescu
from tests.support.nodes import (
    RunningNode,
    free_port,
    node_settings,
    run_precedent,
    running_node,
    write_config,
)
from tests.support.waiting import wait_until
from tests.support.wire import VERIFICATION, stored_rows

SMALL_FILE = PYDICOM_TEST_DIR / "CT_small.dcm"  # about 39 KB
CONFIG_EXIT = 2
# Short, so that failed handshakes free their slots quickly (it bounds the handshake too).
QUICK = {"acse_timeout": 2.0}


# --- a throw-away PKI ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    directory: Path
    ca: Path
    node: tuple[Path, Path]  # (private key, certificate): localhost, 127.0.0.1
    modality: tuple[Path, Path]  # signed by the CA
    rogue: tuple[Path, Path]  # signed by another CA
    elsewhere: tuple[Path, Path]  # signed by the CA, for another host name

    @property
    def node_key(self) -> Path:
        return self.node[0]

    @property
    def node_certificate(self) -> Path:
        return self.node[1]


def openssl(*arguments: str | Path) -> None:
    subprocess.run(["openssl", *map(str, arguments)], check=True, capture_output=True, timeout=60)


def new_key(path: Path) -> Path:
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path)
    return path


def new_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key = new_key(directory / f"{name}.key")
    certificate = directory / f"{name}.pem"
    openssl("req", "-x509", "-key", key, "-out", certificate, "-days", "2", "-subj", f"/CN={name}")
    return key, certificate


def signed(directory: Path, name: str, ca: tuple[Path, Path], alt_names: str) -> tuple[Path, Path]:
    key = new_key(directory / f"{name}.key")
    request, certificate = directory / f"{name}.csr", directory / f"{name}.pem"
    extensions = directory / f"{name}.ext"
    extensions.write_text(
        f"subjectAltName={alt_names}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth,clientAuth\n"
    )
    openssl("req", "-new", "-key", key, "-out", request, "-subj", f"/CN={name}")
    ca_key, ca_certificate = ca
    openssl(
        "x509", "-req", "-in", request, "-CA", ca_certificate, "-CAkey", ca_key, "-CAcreateserial",
        "-out", certificate, "-days", "2", "-extfile", extensions,
    )  # fmt: skip
    return key, certificate


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = new_ca(directory, "Test CA")
    rogue_ca = new_ca(directory, "Rogue CA")
    return Pki(
        directory,
        ca[1],
        node=signed(directory, "localhost", ca, "DNS:localhost,IP:127.0.0.1"),
        modality=signed(directory, "MODALITY", ca, "DNS:modality.invalid"),
        rogue=signed(directory, "ROGUE", rogue_ca, "DNS:rogue.invalid"),
        elsewhere=signed(directory, "elsewhere", ca, "DNS:elsewhere.invalid"),
    )


def tls_section(pki: Pki, **overrides: object) -> dict[str, object]:
    return {
        "enabled": True,
        "certificate": str(pki.node_certificate),
        "private_key": str(pki.node_key),
        "ca_certificates": str(pki.ca),
        **overrides,
    }


# --- DCMTK as the modality ------------------------------------------------------------------------


def dcmtk_tls(pki: Pki, identity: tuple[Path, Path] | None) -> list[str]:
    """DCMTK's options for TLS: with a certificate (``+tls key cert``) or anonymous
    (``+tla``), checking the node's certificate against the CA (``+cf``)."""
    offered = ["+tls", str(identity[0]), str(identity[1])] if identity else ["+tla"]
    return [*offered, "+cf", str(pki.ca)]


def echoscu(port: int, options: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [dcmtk("echoscu"), "-v", "-aec", "PRECEDENT", *options, "127.0.0.1", str(port)],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def handshake_failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "node.tls" and r.levelname == "WARNING" and "handshake with 127.0.0.1:" in r.getMessage()
    ]


def open_files() -> int:
    return sum(1 for _ in Path("/proc/self/fd").iterdir())


def all_ended(running: RunningNode) -> bool:
    return running.node.acceptor.active_associations() == 0


# --- the acceptor ---------------------------------------------------------------------------------


def test_dcmtk_echoes_and_stores_over_tls_and_the_instance_is_catalogued(
    start_node: Callable[..., RunningNode], pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    running = start_node(tls=tls_section(pki))

    with caplog.at_level(logging.INFO, logger="node.tls"):
        echoed = echoscu(running.port, dcmtk_tls(pki, pki.modality))
        run = storescu(running.port, [SMALL_FILE], extra=dcmtk_tls(pki, pki.modality))

    assert echoed.returncode == 0, echoed.stderr
    assert "Received Echo Response (Success)" in echoed.stdout + echoed.stderr
    assert run.returncode == 0 and run.acknowledged == [SMALL_FILE], run.output[-2000:]
    uid = str(dcmread(SMALL_FILE, stop_before_pixels=True).SOPInstanceUID)
    assert list(stored_rows(running)) == [uid]
    accepted = [r.getMessage() for r in caplog.records if r.name == "node.tls" and r.levelname == "INFO"]
    assert any("client certificate commonName=MODALITY" in line for line in accepted), accepted


@pytest.mark.parametrize(
    ("identity", "why"),
    [("rogue", "certificate verify failed"), (None, "peer did not return a certificate")],
    ids=["certificate-from-another-ca", "no-certificate"],
)
def test_a_client_without_a_certificate_the_ca_signed_is_refused_and_nothing_is_stored(
    start_node: Callable[..., RunningNode],
    pki: Pki,
    caplog: pytest.LogCaptureFixture,
    identity: str | None,
    why: str,
) -> None:
    running = start_node(dicom=QUICK, tls=tls_section(pki))
    offered = getattr(pki, identity) if identity else None

    run = storescu(running.port, [SMALL_FILE], extra=dcmtk_tls(pki, offered))

    assert run.returncode != 0 and not run.acknowledged, run.output[-2000:]
    assert "Association Accepted" not in run.output
    assert stored_rows(running) == {}
    assert any(why in line for line in handshake_failures(caplog)), handshake_failures(caplog)
    assert not any(running.node.store.incoming_dir.iterdir())


def test_without_require_client_certificate_an_anonymous_client_is_served(
    start_node: Callable[..., RunningNode], pki: Pki
) -> None:
    running = start_node(dicom=QUICK, tls=tls_section(pki, require_client_certificate=False))
    assert echoscu(running.port, dcmtk_tls(pki, None)).returncode == 0
    # A certificate still counts when presented: one no trusted CA signed is refused.
    assert echoscu(running.port, dcmtk_tls(pki, pki.rogue)).returncode != 0


def test_plain_and_silent_clients_fail_alone_and_leak_nothing(
    start_node: Callable[..., RunningNode], pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """pynetdicom would complete each handshake in its one accepting thread, with no time
    limit: a connection that says nothing would keep every other peer out. Here it costs
    only its own slot, until dicom.acse_timeout."""
    running = start_node(dicom=QUICK, tls=tls_section(pki))
    good = dcmtk_tls(pki, pki.modality)
    assert echoscu(running.port, good).returncode == 0  # the TLS machinery is warm
    wait_until(lambda: all_ended(running), 10, "the first association ended")
    files_before = open_files()

    with socket.create_connection(("127.0.0.1", running.port)) as silent:
        plain = echoscu(running.port, [])
        assert plain.returncode != 0 and "Association Accepted" not in plain.stdout + plain.stderr
        assert echoscu(running.port, good).returncode == 0, "a silent connection kept a TLS peer out"
        silent.settimeout(30)
        assert silent.recv(1) == b"", "the silent connection was not closed"

    failures = handshake_failures(caplog)
    assert any("wrong version number" in line for line in failures), failures
    assert any("no handshake within 2 s (dicom.acse_timeout)" in line for line in failures), failures
    wait_until(lambda: all_ended(running), 10, "every connection ended")
    wait_until(lambda: open_files() <= files_before, 10, f"no more than {files_before} files are open")
    assert echoscu(running.port, good).returncode == 0


def test_minimum_version_refuses_an_older_protocol(start_node: Callable[..., RunningNode], pki: Pki) -> None:
    running = start_node(dicom=QUICK, tls=tls_section(pki, minimum_version="1.3"))

    def handshake(maximum: ssl.TLSVersion) -> str:
        context = client_context(pki, pki.modality)
        context.maximum_version = maximum
        with (
            socket.create_connection(("127.0.0.1", running.port), timeout=30) as channel,
            context.wrap_socket(channel, server_hostname="localhost") as secured,
        ):
            return str(secured.version())

    assert handshake(ssl.TLSVersion.TLSv1_3) == "TLSv1.3"
    with pytest.raises(ssl.SSLError):
        handshake(ssl.TLSVersion.TLSv1_2)


# --- the node's own associations: C-MOVE, results, destinations check ----------------------------


def client_context(pki: Pki, identity: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.ca)
    context.load_cert_chain(identity[1], identity[0])
    return context


@dataclass
class TlsDestination:
    port: int
    received: list[tuple[str, str]]  # (SOP Instance UID, the sender's certificate's CN)


@contextmanager
def tls_storage_scp(pki: Pki, identity: tuple[Path, Path]) -> Iterator[TlsDestination]:
    """A pynetdicom storage SCP over TLS that requires a client certificate the CA signed."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=pki.ca)
    context.load_cert_chain(identity[1], identity[0])
    context.verify_mode = ssl.CERT_REQUIRED
    destination = TlsDestination(free_port(), [])

    def handle(event: Event) -> int:
        certificate: Any = event.assoc.dul.socket.socket.getpeercert()  # type: ignore[union-attr]
        subject = dict(rdn[0] for rdn in certificate["subject"])
        destination.received.append((str(event.request.AffectedSOPInstanceUID), subject["commonName"]))
        return 0x0000

    ae = AE(ae_title="VIEWER")
    ae.add_supported_context(VERIFICATION)
    for storage in AllStoragePresentationContexts:
        ae.add_supported_context(storage.abstract_syntax)
    server = ae.start_server(
        ("127.0.0.1", destination.port),
        block=False,
        ssl_context=context,
        evt_handlers=[(evt.EVT_C_STORE, handle)],
    )
    try:
        yield destination
    finally:
        server.shutdown()


def settings_with_destination(tmp_path: Path, pki: Pki, port: int, host: str = "localhost") -> Settings:
    settings = node_settings(tmp_path / "data", free_port(), tls=tls_section(pki))
    viewer = {"name": "viewer", "ae_title": "VIEWER", "host": host, "port": port, "tls": True}
    return Settings(**{**settings.model_dump(), "destinations": [viewer]})


def c_move_over_tls(pki: Pki, port: int, uid: str) -> Dataset:
    """A viewer's C-MOVE of one study to VIEWER, over TLS; the final response's status."""
    ae = AE(ae_title="PYMOVE")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate(
        "127.0.0.1", port, ae_title="PRECEDENT", tls_args=(client_context(pki, pki.modality), "localhost")
    )
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = uid
    try:
        responses = list(assoc.send_c_move(query, "VIEWER", StudyRootQueryRetrieveInformationModelMove))
    finally:
        assoc.release()
    return responses[-1][0]


def test_c_move_and_results_reach_a_tls_destination_with_the_node_s_certificate(
    tmp_path: Path, pki: Pki
) -> None:
    header = dcmread(SMALL_FILE, stop_before_pixels=True)
    with (
        tls_storage_scp(pki, pki.node) as viewer,
        running_node(settings_with_destination(tmp_path, pki, viewer.port)) as running,
    ):
        assert storescu(running.port, [SMALL_FILE], extra=dcmtk_tls(pki, pki.modality)).acknowledged

        status = c_move_over_tls(pki, running.port, str(header.StudyInstanceUID))

        assert status.Status == 0x0000, status
        assert status.NumberOfCompletedSuboperations == 1
        assert viewer.received == [(str(header.SOPInstanceUID), "localhost")]

        # Results forwarding: what the results step queues goes by the destination's forwarder.
        catalog = running.node.catalog
        with catalog.transaction() as connection:
            pks = list(connection.execute(select(INSTANCES.c.id)).scalars())
            DeliveryQueue(catalog).request(connection, pks, ["viewer"])
        wait_until(lambda: len(viewer.received) == 2, 30, "the forwarder delivered over TLS")
        assert viewer.received[1] == (str(header.SOPInstanceUID), "localhost")

        config = tmp_path / "precedent.toml"
        write_config(config, toml_of(settings_with_destination(tmp_path, pki, viewer.port)))
        checked = run_precedent("destinations", "check", "--config", str(config))
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert "ok   viewer: VIEWER at localhost" in checked.stdout


def test_a_destination_whose_certificate_names_another_host_gets_nothing(tmp_path: Path, pki: Pki) -> None:
    header = dcmread(SMALL_FILE, stop_before_pixels=True)
    with (
        tls_storage_scp(pki, pki.elsewhere) as viewer,
        running_node(settings_with_destination(tmp_path, pki, viewer.port)) as running,
    ):
        assert storescu(running.port, [SMALL_FILE], extra=dcmtk_tls(pki, pki.modality)).acknowledged

        status = c_move_over_tls(pki, running.port, str(header.StudyInstanceUID))

        assert status.Status != 0x0000
        assert "cannot be reached" in str(status.get("ErrorComment", ""))
        assert viewer.received == []


def toml_of(settings: Settings) -> str:
    """The few sections a `precedent destinations check` needs, as a site would write them."""
    tls = settings.tls
    (viewer,) = settings.destinations
    return (
        f'[tls]\ncertificate = "{tls.certificate}"\nprivate_key = "{tls.private_key}"\n'
        f'ca_certificates = "{tls.ca_certificates}"\n\n'
        f'[[destinations]]\nname = "{viewer.name}"\nae_title = "{viewer.ae_title}"\n'
        f'host = "{viewer.host}"\nport = {viewer.port}\ntls = true\n'
    )


# --- configuration that cannot work ---------------------------------------------------------------


def test_tls_enabled_without_certificate_and_key_is_a_configuration_error(tmp_path: Path) -> None:
    config = write_config(tmp_path / "precedent.toml", "[tls]\nenabled = true\n")
    for command in ("config", "serve"):
        done = run_precedent(command, "--config", str(config), cwd=tmp_path, timeout=60)
        assert done.returncode == CONFIG_EXIT, done.stderr
        assert "tls.certificate and tls.private_key must be set" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("toml", "line"),
    [
        (
            'enabled = true\ncertificate = "node.pem"\nprivate_key = "node.key"\n',
            "tls.ca_certificates must be set when tls.require_client_certificate is true",
        ),
        ('certificate = "node.pem"\n', "tls.certificate and tls.private_key go together"),
        ('minimum_version = "1.1"\n', "tls.minimum_version: Input should be '1.2' or '1.3'"),
    ],
    ids=["mutual-tls-without-ca", "certificate-without-key", "tls-1.1"],
)
def test_tls_settings_that_cannot_work_name_their_key(tmp_path: Path, toml: str, line: str) -> None:
    config = write_config(tmp_path / "precedent.toml", f"[tls]\n{toml}")
    with pytest.raises(ConfigError) as refused:
        load_settings(config)
    assert line in str(refused.value)


def serve_with_tls(tmp_path: Path, **tls: object) -> subprocess.CompletedProcess[str]:
    lines = "".join(f'{key} = "{value}"\n' for key, value in tls.items())
    config = write_config(
        tmp_path / "precedent.toml", f"[dicom]\nport = {free_port()}\n\n[tls]\nenabled = true\n{lines}"
    )
    return run_precedent("serve", "--config", str(config), cwd=tmp_path, timeout=60)


@pytest.mark.parametrize(
    ("change", "line"),
    [
        ({"certificate": "absent.pem"}, "tls.certificate: cannot read absent.pem: No such file or directory"),
        ({"private_key": "absent.key"}, "tls.private_key: cannot read absent.key: No such file or directory"),
        ({"ca_certificates": "absent.pem"}, "tls.ca_certificates: cannot read absent.pem"),
        ({"private_key": "{modality_key}"}, "tls.private_key: {modality_key} is not the key of"),
    ],
    ids=["missing-certificate", "missing-key", "missing-ca", "key-of-another-certificate"],
)
def test_serve_stops_with_exit_code_2_naming_the_key_of_a_file_it_cannot_use(
    tmp_path: Path, pki: Pki, change: dict[str, str], line: str
) -> None:
    names = {"modality_key": str(pki.modality[0])}
    given = {key: value.format(**names) for key, value in change.items()}
    settings = tls_section(pki, **given)
    del settings["enabled"]

    done = serve_with_tls(tmp_path, **settings)

    assert done.returncode == CONFIG_EXIT, done.stderr
    assert f"configuration error: {line.format(**names)}" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert "ready" not in done.stdout
    assert not (tmp_path / "precedent-data").exists(), "the start went on past the TLS files"


def junk(directory: Path) -> Path:
    path = directory / "junk.pem"
    path.write_text("not a certificate\n")
    return path


def encrypted(pki: Pki) -> Path:
    """The node's own key, encrypted with a pass phrase."""
    path = pki.directory / "encrypted.key"
    if not path.exists():
        openssl("pkey", "-in", pki.node_key, "-aes256", "-passout", "pass:secret", "-out", path)
    return path


@pytest.mark.parametrize(
    ("key", "bad_file", "message"),
    [
        ("certificate", lambda pki, tmp: junk(tmp), "{path} holds no PEM certificate"),
        ("ca_certificates", lambda pki, tmp: junk(tmp), "{path} holds no PEM certificate"),
        ("private_key", lambda pki, tmp: junk(tmp), "{path} holds no PEM private key"),
        ("private_key", lambda pki, tmp: pki.node_certificate, "{path} holds no PEM private key"),
        ("certificate", lambda pki, tmp: tmp, "cannot read {path}: Is a directory"),
        ("private_key", lambda pki, tmp: encrypted(pki), "{path} is encrypted"),
    ],
    ids=["certificate-not-pem", "ca-not-pem", "key-not-pem", "certificate-as-key", "directory", "encrypted"],
)
def test_a_file_the_node_cannot_use_is_named_with_its_key(
    tmp_path: Path, pki: Pki, key: str, bad_file: Callable[[Pki, Path], Path], message: str
) -> None:
    """The start-up check of each file, in process: a bad one never prompts for a pass
    phrase, never ends in a traceback, and is named by its key and its path."""
    path = bad_file(pki, tmp_path)
    settings = node_settings(tmp_path / "data", free_port(), tls=tls_section(pki, **{key: str(path)}))
    with pytest.raises(TlsConfigError) as refused:
        Node(settings)
    assert f"tls.{key}: {message.format(path=path)}" in str(refused.value)
