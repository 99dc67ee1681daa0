"""The recorder's per-process journal file: JSON lines written before an answer ends, replayed after a crash."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

#: A line that starts with this is a provisional record ("the upstream was asked; if this process dies,
#: record this"); every other line is a finished record. Provisional lines put the marker first.
PROVISIONAL_PREFIX = b'{"j":"s",'


class JournalBusy(RuntimeError):
    """The journal file is locked by another live process (each worker needs its own)."""


def _lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def is_provisional(line: bytes) -> bool:
    return line.startswith(PROVISIONAL_PREFIX)


def _request_id(line: bytes) -> str | None:
    try:
        data = json.loads(line)
    except ValueError:
        return None
    rid = data.get("request_id") if isinstance(data, dict) else None
    return rid if isinstance(rid, str) else None


def resolve(lines: Iterable[bytes]) -> Iterator[bytes]:
    """The finished-record lines of a journal left by a process that is gone, in order, followed by one
    record for every provisional entry no finished record followed (the request the process was serving
    when it died: its last provisional entry, as a record). Unreadable lines are passed on as they are
    (the replay sets them aside as rejected)."""
    open_: dict[str, bytes] = {}
    for line in lines:
        if not line.endswith(b"\n"):
            line += b"\n"
        if is_provisional(line):
            rid = _request_id(line)
            if rid is not None:
                open_.pop(rid, None)
                open_[rid] = line  # a later entry (progress of a stream) replaces the earlier one
            continue
        rid = _request_id(line)
        if rid is not None:
            open_.pop(rid, None)
        yield line
    for line in open_.values():
        yield b"{" + line[len(PROVISIONAL_PREFIX) :]


class Journal:
    """An append-only file of JSON lines owned by one process, with logical offsets that survive compaction.

    `append` is one `write()` on an O_APPEND descriptor: once it returns, the line survives the process
    being killed (not a power loss: `sync` fsyncs, the recorder calls it when the file holds the only copy).
    A failed or short write is cut back, so the file never holds a torn line of ours. Offsets handed out are
    logical: `compact` drops what lies before an offset (keeping given lines in front) without changing
    the offsets of what follows. The open file holds an exclusive `flock`, so two live processes never
    share one; `take` reads the file of a process that died. Methods are thread-safe.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._size = 0  # physical size: bytes we know are in the file
        self._base = 0  # logical offset = physical offset + base
        self._dirty = False

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    @property
    def dirty(self) -> bool:
        return self._dirty

    @property
    def end(self) -> int:
        """The logical offset of the end of the file (where the next line goes)."""
        return self._size + self._base

    @property
    def size(self) -> int:
        return self._size

    def open(self) -> list[bytes] | None:
        """Open and lock (creating directories). A file left by an earlier process is resolved (its
        unfinished requests become records) and rewritten as records only; returns those lines, or None
        when the file was empty or new.

        Raises JournalBusy when another live process holds the file, OSError when it cannot be opened.
        """
        with self._lock:
            if self._fd is not None:
                return None
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            if not _lock(fd):
                os.close(fd)
                raise JournalBusy(f"{self.path} is in use by another process")
            try:
                size = os.fstat(fd).st_size
                found: list[bytes] | None = None
                if size:
                    with open(fd, "rb", closefd=False) as reader:
                        reader.seek(0)
                        found = list(resolve(reader))
                    data = b"".join(found)
                    if len(data) != size:  # provisional entries resolved, or a torn last line ended
                        # a new file renamed over the old one: a full disk leaves the old one whole
                        fd = self._replace(fd, data)
                    size = len(data)
            except BaseException:
                os.close(fd)
                raise
            self._fd, self._size, self._base, self._dirty = fd, size, 0, False
            return found or None

    def adopt(self, other: Path) -> tuple[int, int] | None:
        """Move the resolved records of another process's journal (a process that is gone) to the end of
        this one, fsync'd, and remove that file. Returns (logical offset of the first line, lines moved);
        None when `other` is held by a live process, gone, or empty."""
        try:
            fd = os.open(other, os.O_RDWR)
        except FileNotFoundError:
            return None
        try:
            if not _lock(fd):
                return None
            try:
                if os.stat(other).st_ino != os.fstat(fd).st_ino:
                    return None  # another process took it and removed it meanwhile
            except FileNotFoundError:
                return None
            with open(fd, "rb", closefd=False) as reader:
                lines = list(resolve(reader))
            at = self.end
            if lines:
                at = self.append(b"".join(lines))
                self.sync()
            other.unlink()
            return (at, len(lines)) if lines else None
        finally:
            os.close(fd)

    def append(self, data: bytes) -> int:
        """Append complete lines; returns the logical offset where they start. Raises OSError (the file is
        then as it was before the call)."""
        with self._lock:
            fd = self._fd
            if fd is None:
                raise OSError(errno.EBADF, f"journal {self.path} is not open")
            at = self._size
            try:
                _write_all(fd, data)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, at)  # no torn line of ours stays behind
                raise
            self._size = at + len(data)
            self._dirty = True
            return at + self._base

    def sync(self) -> None:
        """fsync what was appended."""
        fd = self._fd
        if fd is not None and self._dirty:
            self._dirty = False
            os.fsync(fd)

    def read_lines(self, start: int, max_lines: int) -> tuple[list[bytes], int]:
        """Up to `max_lines` complete lines from logical offset `start`, and the logical offset past them.

        Reads without holding the lock for the read itself (appends go on meanwhile)."""
        with self._lock:
            if self._fd is None:
                return [], start
            fd = os.dup(self._fd)
            at = max(0, start - self._base)
            size = self._size
        lines: list[bytes] = []
        end = start
        rest = b""
        try:
            while len(lines) < max_lines and at < size:
                block = os.pread(fd, min(1 << 18, size - at), at)
                if not block:
                    break
                at += len(block)
                parts = (rest + block).split(b"\n")
                rest = parts.pop()
                for part in parts:
                    if len(lines) >= max_lines:
                        break
                    lines.append(part + b"\n")
                    end += len(part) + 1
        finally:
            os.close(fd)
        return lines, end

    def compact(self, keep: bytes, start: int) -> None:
        """Drop everything before logical offset `start`, putting `keep` (complete lines) in its place.
        Offsets from `start` on stay valid. Raises OSError (the file is then unchanged)."""
        with self._lock:
            fd = self._fd
            if fd is None:
                return
            cut = max(0, start - self._base)
            if not keep and cut >= self._size:
                os.ftruncate(fd, 0)
                self._size, self._base = 0, start
                return
            tail = os.pread(fd, self._size - cut, cut) if cut < self._size else b""
            self._fd = self._replace(fd, keep + tail)
            self._size = len(keep) + len(tail)
            self._base = start - len(keep)
            self._dirty = True

    def _replace(self, fd: int, data: bytes) -> int:
        """Write `data` to a new locked file, rename it over ours and close `fd`; the new descriptor.
        On an error the old file and `fd` are left as they were."""
        tmp = self.path.with_name(self.path.name + ".compact")
        new = os.open(tmp, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _lock(new)  # ours alone: taken before the name points at it
            _write_all(new, data)
            os.replace(tmp, self.path)
        except BaseException:
            os.close(new)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        os.close(fd)
        return new

    def close(self) -> None:
        """fsync, unlock and close."""
        with self._lock:
            fd, self._fd = self._fd, None
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.fsync(fd)
                os.close(fd)  # releases the flock
                self._dirty = False


def _write_all(fd: int, data: bytes) -> None:
    n = os.write(fd, data)
    if n == len(data):  # the usual case: one system call
        return
    view = memoryview(data)[max(n, 0) :]
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.ENOSPC, "short write")
        view = view[n:]


def append_detached(path: Path, data: bytes) -> None:
    """Append lines to a journal without owning it (after the recorder stopped); fsync'd."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
