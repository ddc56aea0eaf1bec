"""The flight recorder's window on disk: the record whole, as JSON, beside the run's logs (``tags.record_file``),
written atomically (a reader, or a run killed while writing, never sees half a file) and read back."""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["read", "write"]


def write(path: str, data: dict[str, Any]) -> None:
    """``data`` to ``path`` as JSON, replacing the file whole."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(json.dumps(data))  # dumps encodes in C; dump, to a file, in Python: 5x slower
    os.replace(path + ".tmp", path)


def read(path: str) -> dict[str, Any] | None:
    """What :func:`write` left at ``path``; None where there is nothing readable."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
