"""Advisory locks between sdsengine processes (two runs saving to one place), as flock: the kernel drops a
lock with the process that held it, so a killed run leaves none behind.

Local file systems lock a folder itself. NFS emulates flock with POSIX locks, where an exclusive lock needs
a file open for writing, which a folder cannot be: there the exclusive lock is taken on a lock file beside
the folder instead, and a save in progress cannot be told from a stopped one (in_use says None).
"""
import contextlib
import fcntl
import os
import warnings
from pathlib import Path

# the folders this process holds through hold(), by (device, inode), and their descriptors: the one registry of
# them (held() finds one by path); exclusive() on one of them takes no lock of its own, which would wait forever on
# this one (flock locks taken through two descriptors conflict within a process too), as a save to --out inside the
# --resume-dir being held did
_holding: dict[tuple[int, int], int] = {}


@contextlib.contextmanager
def using(folder):
    """A shared lock on `folder` (a save's staging folder) while the block runs: what in_use looks for."""
    fd = _open(folder)
    try:
        if fd is not None:
            with contextlib.suppress(OSError):  # no locks here at all: in_use will not know
                fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        if fd is not None:
            os.close(fd)


def in_use(folder):
    """True where a live process holds `using(folder)`, False where none does, None where this file system
    cannot tell."""
    fd = _open(folder)
    if fd is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return None
    finally:
        os.close(fd)


def hold(folder):
    """An exclusive lock on `folder` taken without waiting, for as long as the process keeps the returned
    descriptor open (the kernel drops it with the process): None where this file system has no lock on
    folders (NFS) or the folder cannot be opened; BlockingIOError where another process holds it."""
    _forget_deleted()
    fd = _open(folder)
    if fd is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _holding[_identity(fd)] = fd
        return fd
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError:
        os.close(fd)
        return None


def release(fd):
    """Drop the lock that hold() returned `fd` for."""
    _holding.pop(_identity(fd), None)
    os.close(fd)


def held(folder):
    """The descriptor by which this process holds `folder` through hold(), or None: a folder deleted since and
    made anew at that path is another folder, which the lock went without."""
    try:
        stat = os.stat(folder)
    except OSError:
        return None
    fd = _holding.get((stat.st_dev, stat.st_ino))
    return fd if fd is not None and os.fstat(fd).st_nlink > 0 else None


def _forget_deleted():
    """Let go of held folders deleted since (not through their holder): their locks keep nothing out."""
    for fd in list(_holding.values()):
        if os.fstat(fd).st_nlink == 0:
            release(fd)


def _held_here(fd) -> bool:
    """Whether this process holds the folder open as `fd` through hold(): a deleted folder's inode, which a new
    one may reuse, is not."""
    held = _holding.get(_identity(fd))
    return held is not None and os.fstat(held).st_nlink > 0


def _identity(fd):
    stat = os.fstat(fd)
    return stat.st_dev, stat.st_ino


@contextlib.contextmanager
def exclusive(folder, name):
    """An exclusive lock for `name` in `folder` while the block runs, waiting for any other holder: on the
    folder itself, else (NFS) on the file folder/.NAME.lock, else none, with a warning."""
    fd = _open(folder)
    if fd is not None and _held_here(fd):  # every other process is kept out already
        os.close(fd)
        yield
        return
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # NFS: no exclusive lock on a folder
            os.close(fd)
            fd = None
    if fd is None:
        fd = _lock_file(Path(folder) / f".{name}.lock")
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _lock_file(path):
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        return _no_lock(path, exc)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd
    except OSError as exc:
        os.close(fd)
        return _no_lock(path, exc)


def _no_lock(path, exc):
    warnings.warn(f"could not lock {path} ({exc}): two runs saving there at once are not kept apart")
    return None


def _open(folder):
    try:
        return os.open(folder, os.O_RDONLY)
    except OSError:  # a folder that cannot be read: no lock on it
        return None
