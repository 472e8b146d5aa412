"""Where a node's C-MOVE sends to, in tests: DCMTK's storescp (accepting everything, or
only what a profile lists), an Orthanc, and pynetdicom storage SCPs that answer as the test
tells them."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import uid
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.presentation import AllStoragePresentationContexts

from tests.support.dcmtk import DCMTK_ENV, dcmtk, start_storescp


def wait_for_echo(port: int, process: subprocess.Popen[Any] | None = None, timeout: float = 20) -> None:
    """Poll with DCMTK's echoscu until an SCP on loopback answers (storescp prints nothing
    when it is ready); fail early when ``process``, the SCP, has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the SCP on port {port} exited with {process.returncode}")
        echo = subprocess.run(
            [dcmtk("echoscu"), "-to", "2", "127.0.0.1", str(port)],
            env=DCMTK_ENV,
            capture_output=True,
            check=False,
        )
        if echo.returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing answered C-ECHO on port {port} within {timeout} s")


def _stopped(process: subprocess.Popen[Any]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


@contextlib.contextmanager
def storescp(port: int, directory: Path) -> Iterator[Path]:
    """DCMTK's storescp accepting every SOP class and transfer syntax as sent; yields the
    directory it writes the received files to."""
    process = start_storescp(port, directory)
    try:
        wait_for_echo(port, process)
        yield directory
    finally:
        _stopped(process)


# A storescp profile: the SOP classes listed, in the transfer syntaxes listed; nothing else.
_PROFILE = """\
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = LittleEndianImplicit
[Any]
TransferSyntax1 = JPEG2000LosslessOnly
TransferSyntax2 = JPEGLossless:Non-hierarchical-1stOrderPrediction
TransferSyntax3 = JPEGLSLossless
TransferSyntax4 = RLELossless
TransferSyntax5 = OppositeEndianExplicit
TransferSyntax6 = LocalEndianExplicit
TransferSyntax7 = LittleEndianImplicit
[[PresentationContexts]]
[Picky]
PresentationContext1 = VerificationSOPClass\\Uncompressed
{contexts}
[[Profiles]]
[Picky]
PresentationContexts = Picky
"""


@contextlib.contextmanager
def picky_storescp(port: int, directory: Path, accepts: dict[str, str]) -> Iterator[Path]:
    """storescp accepting only the SOP classes in ``accepts`` (DCMTK name → ``"Any"`` or
    ``"Uncompressed"``): a destination that refuses the presentation contexts of others."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [
        f"PresentationContext{n} = {name}\\{syntaxes}"
        for n, (name, syntaxes) in enumerate(accepts.items(), 2)
    ]
    config = directory.parent / f"{directory.name}.cfg"
    config.write_text(_PROFILE.format(contexts="\n".join(lines)), encoding="utf-8")
    command = [dcmtk("storescp"), "-xf", str(config), "Picky", "-od", str(directory), str(port)]
    process = subprocess.Popen(command, env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_echo(port, process)
        yield directory
    finally:
        _stopped(process)


@dataclass
class Orthanc:
    """A running Orthanc: its DICOM AE and its REST API on loopback."""

    ae_title: str
    dicom_port: int
    http_port: int

    def get(self, path: str) -> Any:
        return self._call(urllib.request.Request(self._url(path)))

    def post(self, path: str, body: object) -> Any:
        data = json.dumps(body).encode()
        return self._call(urllib.request.Request(self._url(path), data=data, method="POST"))

    def file(self, instance_id: str) -> bytes:
        with _NO_PROXY.open(self._url(f"/instances/{instance_id}/file"), timeout=60) as reply:
            return bytes(reply.read())

    def instances(self) -> dict[str, str]:
        """SOP Instance UID → Orthanc's id, of every instance it holds."""
        expanded = self.get("/instances?expand")
        return {str(item["MainDicomTags"]["SOPInstanceUID"]): str(item["ID"]) for item in expanded}

    def _url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    @staticmethod
    def _call(request: urllib.request.Request) -> Any:
        with _NO_PROXY.open(request, timeout=120) as reply:
            return json.loads(reply.read() or b"null")


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@contextlib.contextmanager
def orthanc(
    directory: Path, dicom_port: int, http_port: int, *, ae_title: str = "ORTHANC", modalities: dict[str, Any]
) -> Iterator[Orthanc]:
    """Orthanc with a temporary configuration and storage, its REST API on loopback only;
    ``modalities`` are its DicomModalities (name → [AE title, host, port])."""
    executable = shutil.which("Orthanc")
    if executable is None:
        raise RuntimeError("Orthanc is not installed (Debian package orthanc)")
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "precedent-test",
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": ae_title,
        "StorageDirectory": str(directory / "storage"),
        "IndexDirectory": str(directory / "storage"),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomModalities": modalities,
        "Plugins": [],
    }
    (directory / "orthanc.json").write_text(json.dumps(config), encoding="utf-8")
    with (directory / "orthanc.log").open("wb") as log:
        process = subprocess.Popen([executable, str(directory / "orthanc.json")], stdout=log, stderr=log)
    peer = Orthanc(ae_title, dicom_port, http_port)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(directory / 'orthanc.log').read_text()[-2000:]}")
            try:
                peer.get("/system")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        wait_for_echo(dicom_port, process)
        yield peer
    finally:
        _stopped(process)


_AS_SENT = [
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEG2000Lossless,
    uid.RLELossless,
]


@dataclass
class Received:
    """One C-STORE a pynetdicom test SCP received."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    move_originator: str | None
    move_originator_id: int | None


@dataclass
class StorageSCP:
    """What a test storage SCP has received, in order."""

    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


@contextlib.contextmanager
def storage_scp(
    port: int,
    ae_title: str,
    status_of: Callable[[Dataset], int] = lambda dataset: 0x0000,
    delay: float = 0.0,
) -> Iterator[StorageSCP]:
    """A pynetdicom storage SCP accepting every storage SOP class as proposed, answering
    each C-STORE with ``status_of(dataset)`` after ``delay`` seconds."""
    scp = StorageSCP()

    def handle(event: Event) -> int:
        request: C_STORE = event.request
        dataset = event.dataset
        time.sleep(delay)
        with scp.lock:
            scp.received.append(
                Received(
                    str(request.AffectedSOPClassUID),
                    str(request.AffectedSOPInstanceUID),
                    str(event.context.transfer_syntax),
                    str(request.MoveOriginatorApplicationEntityTitle or "").strip() or None,
                    request.MoveOriginatorMessageID,
                )
            )
        return status_of(dataset)

    ae = AE(ae_title=ae_title)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, _AS_SENT)
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle)])
    try:
        yield scp
    finally:
        server.shutdown()
