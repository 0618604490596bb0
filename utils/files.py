"""Writing files so that a crash never leaves half of one, and one writer per folder.

`atomic_write` writes a temporary file, then renames it; `remove_stale_temporaries` deletes the
temporaries a killed process left behind; `FolderLock` lets one process at a time write a run folder.
"""

import os
import re
import tempfile
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

STALE_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # atomic_write's .<name>.<random>.tmp


def atomic_write(path: Path, write) -> None:
    """write(tmp_path), flush it to disk, then rename over `path`: a crash never leaves a half-written file.

    The temporary file is `.<name>.<random>.tmp` beside `path`; `remove_stale_temporaries` cleans up
    the ones a killed process left behind.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private (0600); the file gets what open() would give
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the `.<name>.<random>.tmp` files that writes killed midway left in `folder`; return them.

    Call it only while holding the folder's `FolderLock`: a live writer's temporary looks the same.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if STALE_TEMPORARY.match(p.name) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


class FolderLock:
    """One process at a time in a folder: `<folder>/train.lock` holds the owner's pid and an OS lock.

    The operating system drops the lock when its process dies, even on SIGKILL, so a lock file left
    by a killed run is simply taken over. `release` (or leaving the `with` block) removes the file.
    """

    def __init__(self, folder: str | Path, name: str = "train.lock"):
        self.path, self.fd = Path(folder) / name, None

    def acquire(self) -> "FolderLock":
        """Take the lock (a no-op if held); FileExistsError, naming the holder's pid, if another process has it."""
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(fd):
                holder = _read_pid(fd)
                os.close(fd)
                raise FileExistsError(f"{self.path.parent} is in use by another training run (process {holder}, "
                                      f"see {self.path.name}): wait for it to finish or stop it, or train into "
                                      "another --out")
            if _same_file(fd, self.path):
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self.fd = fd
            else:  # its holder released and removed the file between our open and our lock: open it afresh
                os.close(fd)
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still locked, so no one locks the file we remove
        except OSError:  # Windows cannot remove an open file; an unlocked lock file is harmless
            pass
        os.close(self.fd)  # closing drops the lock
        self.fd = None

    __enter__ = acquire

    def __exit__(self, *exc) -> None:
        self.release()


def _try_lock(fd: int) -> bool:
    """Lock `fd` without waiting: False if another process holds it."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except (BlockingIOError, PermissionError):
        return False
    except OSError:  # a file system without locks (some network mounts): better unlocked than never training
        pass
    return True


def _read_pid(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    except (OSError, AttributeError):  # Windows: the locked byte cannot be read; no os.pread
        return "unknown"


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False
