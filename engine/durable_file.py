"""Files that are on the disk once written, not only in the page cache: a file published whole
under its name, and the directory entries that name it.

os.replace makes a file appear whole to readers, but after a power or node failure the rename may
have reached the disk (on Lustre and NFS a rename is a metadata operation the server applies at
once) while the file's bytes never did: the name then holds an empty or short file. The bytes are
fsynced before the rename, and the directory after it (a rename, a creation or a removal is a
change of the directory, which the file's own fsync does not cover on Linux: fsync(2)).
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets


def sync_dir(path) -> None:
    """fsyncs the directory `path`: the entries created, renamed or removed in it reach the disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:
        # some file systems cannot sync a directory at all (a few FUSE and network mounts answer
        # EINVAL): their entries are as durable as they can make them
        if e.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def sync_file(path) -> None:
    """fsyncs the file `path` (written before, by this process or another of this machine)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(path, synced=lambda name: False) -> None:
    """fsyncs every file under the directory `path` but those whose name `synced` says their writer
    fsynced already, then each directory after what it holds, `path` last: the tree as listed is on
    the disk."""
    for where, _, files in os.walk(path, topdown=False):
        for name in files:
            if not synced(name):
                sync_file(os.path.join(where, name))
        sync_dir(where)


class Replacement:
    """A file written under a temporary name of its own beside `path` (`file`, open for writing),
    which replaces `path` at commit(): synced, renamed, the directory synced. A replacement left
    without commit() (an error, a return) is removed by the `with` block or discard(): nothing is
    left beside `path`. Two processes writing the same `path` each write their own temporary file.

    The temporary file is created as open(path, "w") creates a file (0666 less the umask), not 0600
    as tempfile.mkstemp does: os.replace keeps its mode, and what others read must stay readable."""

    def __init__(self, path, binary: bool = False, encoding: str = "utf-8"):
        self.path = os.fspath(path)
        self.dir, name = os.path.split(os.path.abspath(self.path))
        # the target's name cut to 200 bytes: a name the file system takes (255 bytes at most) must
        # not fail for the ~25 the temporary name adds
        short = os.fsdecode(os.fsencode(name)[:200])
        tmp = os.path.join(self.dir, f".{short}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            self.file = os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding=encoding)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        self.tmp: str | None = tmp

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        self.tmp = None
        sync_dir(self.dir)

    def discard(self) -> None:
        try:
            self.file.close()
        except OSError:
            # the close flushes what is still buffered, which fails again where the write failed (a full
            # disk, a quota): the descriptor is closed all the same, and the error being handled (raised
            # by the write or commit) is the one to see, not this second one
            pass
        if self.tmp is not None:
            tmp, self.tmp = self.tmp, None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def __enter__(self) -> "Replacement":
        return self

    def __exit__(self, *exc) -> None:
        if self.tmp is not None:
            self.discard()


def write_file(path, data: str | bytes, encoding: str = "utf-8") -> None:
    """Writes `data` to `path` whole and durably (Replacement): a reader, or a restart after a crash
    of the machine, finds the file before or after, never a part of it."""
    with Replacement(path, binary=isinstance(data, bytes), encoding=encoding) as r:
        r.file.write(data)
        r.commit()
