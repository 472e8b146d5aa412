"""Running DCMTK's tools as real peers.

Every DCMTK process gets ``TCP_NODELAY=1``: without it, DCMTK stalls ~44 ms per
message on loopback (Nagle and delayed ACK).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import uid

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}

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
    command = ["storescu", "-v", "-nh", "-R", "-aet", calling, "-aec", called]
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
        ["echoscu", "-v", "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
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
        ["storescp", "+xa", "--max-pdu", "131072", "-od", str(directory), str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
