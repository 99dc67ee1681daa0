"""The recorder's append-only spill file: JSON lines kept in order until the database takes them."""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from pathlib import Path
from typing import BinaryIO

logger = logging.getLogger(__name__)


class SpillFileBusy(RuntimeError):
    """The spill file is locked by another live process (each worker needs its own)."""


def _lock(fh: BinaryIO) -> bool:
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class SpillFile:
    """An append-only file of records (one JSON line each) with a replay cursor.

    Lines are appended at the end; `read_chunk` reads from the replay cursor and `advance` moves it past
    what the database has taken, truncating the file once everything is replayed. A file left by an
    earlier process is counted at `open` and replayed from its start. The open file holds an exclusive
    `flock`, so two live processes never share one; `adopt` takes over files of processes that died.
    Methods are thread-safe.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._fh: BinaryIO | None = None
        self._count = 0  # lines not yet replayed
        self._offset = 0  # bytes already replayed
        self._dirty = False

    @property
    def count(self) -> int:
        return self._count

    @property
    def dirty(self) -> bool:
        return self._dirty

    @property
    def is_open(self) -> bool:
        return self._fh is not None

    def open(self) -> int:
        """Open and lock (creating directories); count the lines a previous process left and return that.

        Raises SpillFileBusy when another live process holds the file.
        """
        with self._lock:
            if self._fh is not None:
                return self._count
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fh = self.path.open("ab")
            if not _lock(fh):
                fh.close()
                raise SpillFileBusy(f"{self.path} is in use by another process")
            count = 0
            last = b"\n"
            with self.path.open("rb") as reader:
                while block := reader.read(1 << 20):
                    count += block.count(b"\n")
                    last = block[-1:]
            self._fh = fh
            if last != b"\n":
                # A line cut short by a crash: end it, so it is read (and rejected) as one bad line.
                self._fh.write(b"\n")
                self._fh.flush()
                count += 1
            self._count = count
            self._offset = 0
            return count

    def adopt(self, other: Path) -> int:
        """Move the records of another spill file (left by a dead process) to the end of this one.

        Returns the number of lines taken; 0 when `other` is held by a live process or already gone.
        """
        try:
            fh = other.open("rb")
        except FileNotFoundError:
            return 0
        with fh:
            if not _lock(fh):
                return 0
            try:
                if os.stat(other).st_ino != os.fstat(fh.fileno()).st_ino:
                    return 0  # another process adopted and removed it meanwhile
            except FileNotFoundError:
                return 0
            data = fh.read()
            if data and not data.endswith(b"\n"):
                data += b"\n"
            lines = data.count(b"\n")
            if data:
                with self._lock:
                    own = self._require_open()
                    own.write(data)
                    own.flush()
                    os.fsync(own.fileno())
                    self._count += lines
            other.unlink()
            return lines

    def append(self, lines: list[bytes]) -> None:
        """Append complete lines (each ending in a newline); flushed to the OS, fsync'd by `sync`."""
        if not lines:
            return
        with self._lock:
            fh = self._require_open()
            fh.write(b"".join(lines))
            fh.flush()
            self._count += len(lines)
            self._dirty = True

    def sync(self) -> None:
        """fsync what was appended."""
        fh = self._fh
        if fh is not None and self._dirty:
            self._dirty = False
            os.fsync(fh.fileno())

    def size(self) -> int:
        with self._lock:
            fh = self._require_open()
            return fh.seek(0, os.SEEK_END)

    def insert_at(self, mark: int, lines: list[bytes]) -> None:
        """Put `lines` at byte offset `mark`, before what was appended since (keeps the file in order)."""
        if not lines:
            return
        with self._lock:
            fh = self._require_open()
            with self.path.open("rb") as reader:
                reader.seek(mark)
                tail = reader.read()
            os.ftruncate(fh.fileno(), mark)
            fh.write(b"".join(lines) + tail)
            fh.flush()
            self._count += len(lines)
            self._dirty = True

    def read_chunk(self, max_lines: int) -> tuple[list[bytes], int]:
        """Up to `max_lines` complete lines from the replay cursor, and the offset just past them."""
        with self._lock:
            self._require_open()
            lines: list[bytes] = []
            with self.path.open("rb") as reader:
                reader.seek(self._offset)
                end = self._offset
                while len(lines) < max_lines:
                    line = reader.readline()
                    if not line.endswith(b"\n"):
                        break
                    lines.append(line)
                    end += len(line)
            return lines, end

    def advance(self, end: int, lines: int) -> bool:
        """Move the replay cursor to `end` (past `lines` lines); truncate when all is replayed.

        Returns True when the file is now empty.
        """
        with self._lock:
            fh = self._require_open()
            self._offset = end
            self._count = max(0, self._count - lines)
            if self._offset >= fh.seek(0, os.SEEK_END):
                os.ftruncate(fh.fileno(), 0)
                os.fsync(fh.fileno())
                self._offset = 0
                self._count = 0
                return True
            return False

    def close(self) -> None:
        """fsync, unlock and close (the count stays: what is left is replayed by the next owner)."""
        with self._lock:
            if self._fh is not None:
                self._fh.flush()
                os.fsync(self._fh.fileno())
                self._fh.close()  # releases the flock
                self._fh = None
                self._dirty = False

    def _require_open(self) -> BinaryIO:
        if self._fh is None:
            raise RuntimeError(f"spill file {self.path} is not open")
        return self._fh


def append_detached(path: Path, lines: list[bytes]) -> None:
    """Append lines to a spill file without owning it (after the recorder stopped); fsync'd."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as fh:
        fh.write(b"".join(lines))
        fh.flush()
        os.fsync(fh.fileno())
