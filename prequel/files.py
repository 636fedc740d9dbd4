"""Writing a file whole or not at all: what every output of prequel goes through."""

import os
import tempfile
from pathlib import Path

TEMP_SUFFIX = ".tmp"  # write_atomic's temp files: f".{name}.{random}.tmp" beside the target
_UMASK = os.umask(0o022)  # read once at import (os.umask can only be read by setting it) ...
os.umask(_UMASK)  # ... and put back at once


def write_atomic(path: Path, data) -> None:
    """Temp file + fsync + rename (+ fsync of the directory): a reader, or a run resumed after a
    crash, sees the old file or the whole new one, never a part. `data`: bytes, or an iterable of
    pieces (written as they come: a file larger than memory). A failed write (disk full,
    read-only directory) removes its temp file and raises the OSError."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)  # as open() would make it, not mkstemp's 0600
            for piece in [data] if isinstance(data, (bytes, bytearray, memoryview)) else data:
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename in (None, tmp):
            e.filename = str(path)  # name the file the user knows, not our temp file
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (a power cut must not bring back the old name)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open a directory; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
