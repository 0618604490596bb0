"""Writing files so that a crash never leaves half of one: write a temporary file, then rename it."""

import os
import tempfile
from pathlib import Path


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
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
