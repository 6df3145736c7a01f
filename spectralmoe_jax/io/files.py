"""Small files written whole or not at all."""

from __future__ import annotations

import os


def write_atomic(path: str, text: str) -> None:
    """`text` into `path` through a new file renamed over the old one, so that a kill meanwhile
    leaves the old file or the new one, never a part (the temporary's name carries the pid:
    processes writing the same file do not share it)."""
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
