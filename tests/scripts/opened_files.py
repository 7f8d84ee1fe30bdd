"""Which files below a directory a block of code opens, seen by the Linux kernel (inotify ``IN_OPEN``).

Every open is seen, whatever opens the file: Python's ``open``, ``torch.load``, and the Rust reader of
``safetensors``, which Python-level hooks (audit events, monkeypatching) would miss. Used by
tests/test_download.py to check the download list against the files the runtime loads.
"""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path

IN_OPEN = 0x00000020
IN_ISDIR = 0x40000000
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then the name)


class OpenedFiles:
    """A context manager: ``with OpenedFiles(root) as seen: ...``; then ``seen.paths`` is the set of files
    (``/``-separated, relative to ``root``) opened inside the block. Directories (listings) are not counted.

    Raises:
        OSError: inotify is not available (not Linux) or a watch cannot be added.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self.paths: set[str] = set()
        self._fd = -1
        self._watches: dict[int, Path] = {}

    def __enter__(self) -> OpenedFiles:
        libc = ctypes.CDLL(None, use_errno=True)
        self._fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        for directory in (self.root, *(p for p in self.root.rglob("*") if p.is_dir())):
            wd = libc.inotify_add_watch(self._fd, os.fsencode(directory), IN_OPEN)
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch failed for {directory}")
            self._watches[wd] = directory
        return self

    def __exit__(self, *exc) -> None:
        try:
            while True:
                try:
                    buf = os.read(self._fd, 1 << 16)
                except BlockingIOError:
                    break
                offset = 0
                while offset < len(buf):
                    wd, mask, _, length = _EVENT.unpack_from(buf, offset)
                    name = buf[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0")
                    offset += _EVENT.size + length
                    if name and not mask & IN_ISDIR:
                        self.paths.add((self._watches[wd] / os.fsdecode(name)).relative_to(self.root).as_posix())
        finally:
            os.close(self._fd)
