"""Writing files so that a crash never leaves a half-written one in place.

Text is UTF-8 whatever the machine's locale, so that a photo named in any script is written and read back.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def replace_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(partial)`` on ``<path>.partial``, then rename it onto ``path``.

    A failure (or interrupt) anywhere removes the partial file and leaves an
    existing file at ``path`` untouched; the exception propagates. A folder
    in the partial file's place is refused before anything is written.
    """
    path = os.fspath(path)
    partial = f"{path}.partial"
    if os.path.isdir(partial):
        raise IsADirectoryError(
            f"Cannot write {path}: it is written to {partial} first and renamed, but {partial} is a folder; "
            "move or remove that folder, or choose another path."
        )
    try:
        write(partial)
        os.replace(partial, path)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` as UTF-8 through :func:`replace_atomically`."""
    replace_atomically(path, lambda partial: Path(partial).write_text(text, encoding="utf-8"))
