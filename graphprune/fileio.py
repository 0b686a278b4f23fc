"""Every file graphprune writes goes through here.

Rule: write to a fresh temp file created with O_EXCL in the destination's folder (so no symlink planted at a
guessable name is ever followed, and two concurrent writers never share one), then atomically replace the
destination. A failure, Ctrl-C or SIGTERM removes the temp files this process created and nothing else. The
final file gets the mode a plain open() would give it: an existing file keeps its mode, a new one gets
0o666 minus the umask.
"""
from __future__ import annotations

import contextlib
import os
import signal
import stat
import tempfile
import threading
from pathlib import Path


class Terminated(BaseException):
    """SIGTERM arrived while a file was being written; raised so that cleanup runs as it does for Ctrl-C."""


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def final_mode(path: Path) -> int:
    """The permission bits open(path, 'w') would leave: the existing file's, else 0o666 & ~umask."""
    try:
        st = os.stat(path)  # follows a symlink, as open() would
        if stat.S_ISREG(st.st_mode):
            return stat.S_IMODE(st.st_mode)
    except OSError:
        pass
    return 0o666 & ~_umask()


@contextlib.contextmanager
def sigterm_cleans_up():
    """While active (main thread only), SIGTERM raises Terminated instead of killing the process outright,
    so `finally`/`except BaseException` cleanup runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if _state["critical"]:  # between the renames of a model and its data file: finish them first
            _state["pending"] = True
            return
        raise Terminated("terminated by SIGTERM")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):  # not the main interpreter, or signals unavailable
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


_state = {"critical": 0, "pending": False}


@contextlib.contextmanager
def uninterrupted():
    """SIGTERM is held back while this runs (renames that must happen together) and raised right after."""
    _state["critical"] += 1
    try:
        yield
    finally:
        _state["critical"] -= 1
        if not _state["critical"] and _state["pending"]:
            _state["pending"] = False
            raise Terminated("terminated by SIGTERM")


class TempFile:
    """A fresh, exclusively created file next to `dest`; `commit()` renames it over `dest`."""

    def __init__(self, dest, suffix: str = ".tmp"):
        self.dest = Path(dest)
        folder = self.dest.parent if str(self.dest.parent) else Path(".")
        if not folder.is_dir():
            raise FileNotFoundError(2, "output folder does not exist", str(folder))
        self.mode = final_mode(self.dest)
        fd, name = tempfile.mkstemp(prefix=f".{self.dest.name}.", suffix=suffix, dir=folder)  # O_EXCL, 0600
        self.fd = fd
        self.path = Path(name)
        self.committed = False

    def open(self, mode: str = "wb"):
        """The temp file as a Python file object (owns the descriptor)."""
        fd, self.fd = self.fd, None
        return os.fdopen(fd, mode)

    def commit(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        os.chmod(self.path, self.mode)
        os.replace(self.path, self.dest)
        self.committed = True

    def discard(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None
        if not self.committed:
            with contextlib.suppress(OSError):
                os.unlink(self.path)


@contextlib.contextmanager
def temp_files():
    """Yields a factory `new(dest, suffix)` of TempFiles; on any exception (SIGTERM included) every temp file
    made through it that was not committed is removed, and only those."""
    made: list[TempFile] = []

    def new(dest, suffix: str = ".tmp") -> TempFile:
        tmp = TempFile(dest, suffix)
        made.append(tmp)
        return tmp

    with sigterm_cleans_up():
        try:
            yield new
        finally:
            for tmp in made:
                tmp.discard()


def write_bytes(path, data: bytes) -> None:
    """Atomically replace `path` with `data`."""
    with temp_files() as new:
        tmp = new(path)
        with tmp.open("wb") as f:
            f.write(data)
        tmp.commit()


def write_text(path, text: str, encoding: str = "utf-8") -> None:
    write_bytes(path, text.encode(encoding))


def open_regular(path, error=OSError, what: str = "file") -> tuple[int, int]:
    """(descriptor, size) of a regular file opened for reading. A FIFO, device, socket or folder is refused
    without blocking on it (O_NONBLOCK) or reading a byte; `error` is the exception class to raise."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except OSError as exc:
        raise error(f"{what} {path}: cannot open ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                    else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a plain file")
            raise error(f"{what} {path} is {kind}; expected a regular file")
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)
        return fd, st.st_size
    except BaseException:
        os.close(fd)
        raise


def read_regular(path, limit: int, error=OSError, what: str = "file") -> bytes:
    """The bytes of a regular file of at most `limit` bytes (size checked before reading)."""
    fd, size = open_regular(path, error, what)
    try:
        if size > limit:
            raise error(f"{what} {path} is {size} bytes, more than the {limit} accepted")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(1 << 24, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise error(f"{what} {path} grew past {limit} bytes while being read")
        return b"".join(chunks)
    finally:
        os.close(fd)
