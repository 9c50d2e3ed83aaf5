"""A user's result files (eval's --json and --samples, bench's --json): checked before any work, written
whole or not at all, so that a long run never ends on an unwritable path and a failed write never leaves an
earlier file truncated."""
import os
import secrets
from pathlib import Path


def within(path, folder):
    """Whether the (resolved) path is the folder or lies inside it."""
    return path == folder or folder in path.parents


def unwritable(path):
    """Where new files at or under `path` could not be made: its nearest existing entry when that is no
    writable folder, else None."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    return None if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK) else existing


def check_new_file(flag, path, overwrite, reads=()):
    """Refuse, naming flag, a path that could not be written or must not be: a directory, one in a missing
    or unwritable directory, an existing file without overwrite, or one inside `reads` (files and
    directories the run reads)."""
    path = Path(path).expanduser().resolve()
    for source in reads:
        source = Path(source).expanduser().resolve()
        if within(path, source):
            raise ValueError(f"{flag} {path} would overwrite {source}, which this run reads: name another file")
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory: name a file")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{flag} {path}: no directory {path.parent}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{flag} {path} exists; pass --overwrite to replace it")
    if unwritable(path.parent):
        raise PermissionError(f"{flag} {path}: {path.parent} is not writable")
    return path


def fresh(folder, prefix, suffix, make):
    """make(path) for a new path in folder under a random name not yet taken; returns (path, what make gave).
    Made with the usual mode (the system applies the umask), unlike tempfile's private 0600/0700: the file
    or folder becomes the user's result. Reading the umask instead means setting it, which races threads."""
    for _ in range(100):
        path = Path(folder) / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            return path, make(path)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name {prefix}*{suffix} in {folder}")


def new_file(path):
    """(fd, path) of a new file under a random name, open for writing."""
    path, fd = fresh(path.parent, f".{path.name}.", ".tmp",
                     lambda p: os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return fd, path


def write_whole(path, text):
    """Write text to path (a link: to its target) through a temporary file renamed into place; on failure
    path is as it was. Each call has a temporary file of its own: two runs writing one result file leave one
    whole file, the last one's, never a mix of both (a process killed mid-write leaves its .NAME.XXXX.tmp)."""
    path = Path(path).expanduser().resolve()
    fd, tmp = new_file(path)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        tmp.replace(path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OSError(f"could not write {path} ({exc}); it is as it was") from exc
        raise
