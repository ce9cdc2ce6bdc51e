"""A run folder belongs to one process: ``RunLock(folder, command)`` holds an exclusive lock on
``folder/.lock`` (flock: the kernel releases it when the process ends, however it ends) while a
command writes there, so that a second command into the same folder is refused at once instead
of interleaving its files with the first's. The file names its holder (command, pid, host,
start); a clean exit empties it, so a holder's line found in a lock that no process holds is
the trace of a killed run, which the next command names and takes over."""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
import time
from pathlib import Path

from .schema import ConfigError


class RunLock:
    def __init__(self, folder: Path, command: str):
        self.folder, self.command = Path(folder), command
        self.path = self.folder / ".lock"
        self._fd = None

    def __enter__(self) -> RunLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ConfigError(f"{self.folder} is in use by {holder or 'another process'}: one process at a time "
                                  "writes a run folder; wait for it, or choose another folder") from None
            raise ConfigError(f"{self.folder}: cannot lock {self.path} ({e.strerror})") from None
        left = _read(fd)
        if left:
            print(f"{self.command}: {self.path} names {left}, which no longer holds it (killed?); taking the folder "
                  "over", file=sys.stderr)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{self.command} (pid {os.getpid()} on {socket.gethostname()}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')})".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        os.ftruncate(self._fd, 0)
        os.close(self._fd)  # releases the lock
        self._fd = None


def _read(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode(errors="replace").strip()


def _holder(fd: int) -> str:
    """The line of the process holding the lock. One that has just taken it writes its line right
    after (two commands started together), so an empty file is read again for up to a second."""
    deadline = time.monotonic() + 1.0
    while not (line := _read(fd)) and time.monotonic() < deadline:
        time.sleep(0.01)
    return line
