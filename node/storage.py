"""The object store: where received files live on disk, and how they get there durably.

Layout under ``storage.data_dir``::

    incoming/           files being received (pynetdicom writes here); purged at start-up
    objects/ab/<sha256 of the SOP Instance UID>.dcm

The 256 fan-out directories are made at start-up: creating one on the C-STORE path
costs a mkdir and two more fsyncs. At ten million instances a directory holds ~40,000
files, which ext4 and XFS index without trouble.

A path is never built from a received identifier itself, only from its hash, so no
value a peer sends can name a file outside ``objects/``. A file is placed with
write → fsync → rename → fsync(directory): after a crash it is either whole or absent.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from node.errors import StorageUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredFile:
    relative_path: PurePosixPath
    size: int


class ObjectStore:
    """Owns the data directory's files; callers hold relative paths only."""

    def __init__(self, data_dir: Path, *, fsync: bool, min_free_bytes: int) -> None:
        self.data_dir = data_dir.resolve()
        self.incoming_dir = self.data_dir / "incoming"
        self.objects_dir = self.data_dir / "objects"
        self._fsync = fsync
        self._min_free_bytes = min_free_bytes

    def prepare(self) -> int:
        """Create the directories and purge files a crash left half-received.

        Returns how many leftovers were removed. Nothing in ``incoming/`` was ever
        acknowledged, so removing it loses nothing.
        """
        for directory in (self.data_dir, self.incoming_dir, self.objects_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self._make_fan_out()
        leftovers = [p for p in self.incoming_dir.iterdir() if p.is_file()]
        for path in leftovers:
            path.unlink(missing_ok=True)
        if leftovers:
            log.warning("removed %d partially received files from %s", len(leftovers), self.incoming_dir)
        return len(leftovers)

    def _make_fan_out(self) -> None:
        missing = [self.objects_dir / f"{n:02x}" for n in range(256)]
        missing = [directory for directory in missing if not directory.is_dir()]
        for directory in missing:
            directory.mkdir()
        if missing:
            self._sync_directory(self.objects_dir)

    @staticmethod
    def relative_path(sop_instance_uid: str) -> PurePosixPath:
        digest = hashlib.sha256(sop_instance_uid.encode("utf-8", "surrogateescape")).hexdigest()
        return PurePosixPath("objects", digest[:2], f"{digest}.dcm")

    def holds(self, sop_instance_uid: str) -> bool:
        """Whether a file is stored under this UID (one stat; no catalog query)."""
        return self.absolute(self.relative_path(sop_instance_uid)).exists()

    def absolute(self, relative: PurePosixPath) -> Path:
        return self.data_dir / relative

    def require_free_space(self) -> None:
        """Refuse new data before the disk is full, so a store never half-fails."""
        try:
            space = disk_space(self.data_dir, self._min_free_bytes)
        except OSError as exc:
            raise StorageUnavailable(f"data directory unusable: {exc.strerror}") from exc
        if space.low:
            raise StorageUnavailable(
                f"data directory has {space.free_bytes // 2**20} MiB free, below storage.min_free_bytes"
            )

    def place(self, received: Path, sop_instance_uid: str) -> StoredFile:
        """Move a fully received file to its final place, durably, replacing any old copy."""
        relative = self.relative_path(sop_instance_uid)
        target = self.absolute(relative)
        try:
            size = received.stat().st_size
            self._ensure_directory(target.parent)
            self._sync_file(received)
            self._move(received, target)
            self._sync_directory(target.parent)
        except OSError as exc:
            reason = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
            raise StorageUnavailable(f"cannot write to the data directory: {reason}") from exc
        return StoredFile(relative, size)

    def remove(self, relative: PurePosixPath) -> None:
        try:
            self.absolute(relative).unlink(missing_ok=True)
        except OSError:
            log.exception("could not remove %s", relative)

    def _ensure_directory(self, directory: Path) -> None:
        """Re-make a fan-out directory removed while the node runs (normally made at start-up)."""
        if directory.is_dir():
            return
        directory.mkdir(parents=True, exist_ok=True)
        self._sync_directory(directory.parent)

    def _sync_file(self, path: Path) -> None:
        if not self._fsync:
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _sync_directory(self, directory: Path) -> None:
        if self._fsync:
            self._sync_file(directory)

    def _move(self, source: Path, target: Path) -> None:
        try:
            source.replace(target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            self._copy_across_filesystems(source, target)

    def _copy_across_filesystems(self, source: Path, target: Path) -> None:
        staging = target.with_suffix(".partial")
        shutil.copyfile(source, staging)
        self._sync_file(staging)
        staging.replace(target)
        source.unlink(missing_ok=True)


@dataclass(frozen=True)
class DiskSpace:
    """The data directory's file system, against ``storage.min_free_bytes``."""

    path: Path
    free_bytes: int
    total_bytes: int
    min_free_bytes: int

    @property
    def low(self) -> bool:
        return self.free_bytes < self.min_free_bytes

    def describe(self) -> str:
        said = f"{_mib(self.free_bytes)} MiB free of {_mib(self.total_bytes)} MiB in {self.path.resolve()}"
        if self.low:
            return f"{said}: below storage.min_free_bytes ({_mib(self.min_free_bytes)} MiB)"
        return said


def disk_space(data_dir: Path, min_free_bytes: int) -> DiskSpace:
    """Raises OSError when the data directory cannot be looked at."""
    usage = shutil.disk_usage(data_dir)
    return DiskSpace(data_dir, usage.free, usage.total, min_free_bytes)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f}"
