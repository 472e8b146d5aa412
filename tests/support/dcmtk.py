"""Running DCMTK's tools as real peers.

Every DCMTK process gets ``TCP_NODELAY=1``: without it, DCMTK stalls ~44 ms per
message on loopback (Nagle and delayed ACK).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from pydicom import dcmread, uid
from pydicom.dataset import Dataset

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


@cache
def dcmtk(tool: str) -> str:
    """The absolute path of DCMTK's ``tool``, never a namesake.

    pynetdicom installs console scripts called echoscu, storescu, storescp, findscu …
    into the virtual environment; a test that ran one of those by name would be
    talking to pynetdicom, not to the independent peer it claims. So the venv's
    directory is left out of the search, and the tool must say it is DCMTK.
    """
    venv_bin = str(Path(sys.executable).parent)
    search = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep) if d and d != venv_bin)
    found = shutil.which(tool, path=search)
    if found is None:
        raise RuntimeError(f"DCMTK's {tool} is not installed (Debian package dcmtk)")
    banner = subprocess.run([found, "--version"], capture_output=True, text=True, check=False)
    if "dcmtk" not in banner.stdout.lower():
        raise RuntimeError(f"{found} is not DCMTK's {tool}: {banner.stdout[:80]!r}")
    return found


# storescu's flag to propose a file's own transfer syntax, so it is sent as stored.
PROPOSE_FLAG: dict[str, str] = {
    uid.ImplicitVRLittleEndian: "-xi",
    uid.ExplicitVRLittleEndian: "-xe",
    uid.ExplicitVRBigEndian: "-xb",
    uid.DeflatedExplicitVRLittleEndian: "-xd",
    uid.JPEGBaseline8Bit: "-xy",
    uid.JPEGExtended12Bit: "-xx",
    uid.JPEGLosslessSV1: "-xs",
    uid.JPEGLSLossless: "-xt",
    uid.JPEGLSNearLossless: "-xu",
    uid.JPEG2000Lossless: "-xv",
    uid.JPEG2000: "-xw",
    uid.RLELossless: "-xr",
    uid.MPEG2MPML: "-xm",
    uid.MPEG4HP41: "-xn",
}

_SENDING = re.compile(r"Sending file: (.+)$")
_RESPONSE = re.compile(r"Received Store Response \((.+)\)")


@dataclass
class StoreRun:
    """What storescu did, read from its verbose log: which files it was told were stored."""

    returncode: int
    output: str
    sent: list[Path] = field(default_factory=list)
    acknowledged: list[Path] = field(default_factory=list)
    refused: list[Path] = field(default_factory=list)


def storescu(
    port: int,
    files: Sequence[Path],
    *,
    propose: str | None = None,
    called: str = "PRECEDENT",
    calling: str = "STORESCU",
    extra: Iterable[str] = (),
    timeout: float = 300,
) -> StoreRun:
    """Send ``files`` in one association, proposing transfer syntax ``propose`` if given."""
    command = [dcmtk("storescu"), "-v", "-nh", "-R", "-aet", calling, "-aec", called]
    if propose is not None:
        command.append(PROPOSE_FLAG[propose])
    command += [*extra, "127.0.0.1", str(port), *map(str, files)]
    done = subprocess.run(
        command, env=DCMTK_ENV, capture_output=True, text=True, timeout=timeout, check=False
    )
    return parse_storescu_log(done.returncode, done.stdout + done.stderr)


def parse_storescu_log(returncode: int, output: str) -> StoreRun:
    run = StoreRun(returncode, output)
    current: Path | None = None
    for line in output.splitlines():
        if sending := _SENDING.search(line):
            current = Path(sending.group(1).strip())
            run.sent.append(current)
        elif (response := _RESPONSE.search(line)) and current is not None:
            (run.acknowledged if response.group(1) == "Success" else run.refused).append(current)
            current = None
    return run


def echoscu(
    port: int, *, called: str = "PRECEDENT", calling: str = "ECHOSCU"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [dcmtk("echoscu"), "-v", "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def group_by_transfer_syntax(files: Iterable[Path], syntax_of: dict[Path, str]) -> dict[str, list[Path]]:
    groups: dict[str, list[Path]] = {}
    for path in files:
        groups.setdefault(syntax_of[path], []).append(path)
    return groups


def start_storescp(port: int, directory: Path) -> subprocess.Popen[bytes]:
    """DCMTK's own storage SCP, accepting every transfer syntax as sent (+xa)."""
    directory.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [dcmtk("storescp"), "+xa", "--max-pdu", "131072", "-od", str(directory), str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@dataclass
class FindRun:
    """What findscu received: the Pending responses' identifiers, in order, and its log."""

    returncode: int
    output: str
    responses: list[Dataset] = field(default_factory=list)


def findscu(
    port: int,
    keys: Sequence[str],
    directory: Path,
    *,
    model: str = "-S",
    called: str = "PRECEDENT",
    calling: str = "FINDSCU",
    timeout: float = 60,
) -> FindRun:
    """One C-FIND with ``keys`` (findscu's ``-k`` syntax: ``Name=value``, or ``Name`` for an
    empty key) under ``model`` (``-S`` study root, ``-P`` patient root); every Pending
    response's identifier is extracted to ``directory`` and read back."""
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("rsp*.dcm"):
        old.unlink()
    options = [model, "-X", "-od", str(directory), "-aet", calling, "-aec", called]
    returncode, output = query_retrieve_tool("findscu", options, keys, port, timeout)
    responses = [dcmread(path) for path in sorted(directory.glob("rsp*.dcm"))]
    return FindRun(returncode, output, responses)


def query_retrieve_tool(
    tool: str, options: Sequence[str], keys: Sequence[str], port: int, timeout: float
) -> tuple[int, str]:
    """Run findscu, movescu or getscu verbosely with ``options`` and ``-k`` ``keys`` against
    the node on loopback ``port``; return its exit code and its whole log."""
    command = [dcmtk(tool), "-v", *options]
    for key in keys:
        command += ["-k", key]
    command += ["127.0.0.1", str(port)]
    done = subprocess.run(
        command, env=DCMTK_ENV, capture_output=True, text=True, timeout=timeout, check=False
    )
    return done.returncode, done.stdout + done.stderr


@dataclass
class RetrieveRun:
    """What movescu or getscu did: its log, the responses' statuses as DCMTK names them
    (the last one is the final status) and, for getscu, the files it wrote."""

    returncode: int
    output: str
    statuses: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    @property
    def final(self) -> str:
        return self.statuses[-1] if self.statuses else ""


_MOVE_RESPONSE = re.compile(r"Received (?:Final )?Move Response(?: \d+)? \((.+)\)")
_GET_RESPONSE = re.compile(r"Received C-GET Response \((.+)\)")


def movescu(
    port: int,
    keys: Sequence[str],
    destination: str,
    *,
    model: str = "-S",
    called: str = "PRECEDENT",
    calling: str = "MOVESCU",
    timeout: float = 300,
) -> RetrieveRun:
    """One C-MOVE with ``keys`` (``-k`` syntax) to the AE title ``destination``."""
    options = [model, "-aet", calling, "-aec", called, "-aem", destination]
    returncode, output = query_retrieve_tool("movescu", options, keys, port, timeout)
    return RetrieveRun(returncode, output, _MOVE_RESPONSE.findall(output))


def getscu(
    port: int,
    keys: Sequence[str],
    directory: Path,
    *options: str,
    model: str = "-S",
    called: str = "PRECEDENT",
    calling: str = "GETSCU",
    timeout: float = 300,
) -> RetrieveRun:
    """One C-GET with ``keys``; ``options`` choose what getscu proposes for storage (e.g.
    ``+xs`` prefers JPEG Lossless). The received files are written to ``directory``.

    getscu (DcmSCU) never reads the identifier that follows a final Warning or Failure
    response, and then reports its release as failed: read the statuses, not the exit code.
    """
    directory.mkdir(parents=True, exist_ok=True)
    arguments = [model, "-aet", calling, "-aec", called, *options, "-od", str(directory)]
    returncode, output = query_retrieve_tool("getscu", arguments, keys, port, timeout)
    files = sorted(p for p in directory.iterdir() if p.is_file())
    return RetrieveRun(returncode, output, _GET_RESPONSE.findall(output), files)
