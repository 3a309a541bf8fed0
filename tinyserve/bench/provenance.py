"""Where a benchmark's numbers came from: the commit of the tree that ran and the machine it ran on."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["commit", "machine", "stamp"]


def commit() -> str:
    """``TINYSERVE_COMMIT`` when set, else git's HEAD, marked ``+dirty`` when the package's files differ from
    it (a copy of the tree on another machine may carry a stale repository)."""
    if os.environ.get("TINYSERVE_COMMIT"):
        return os.environ["TINYSERVE_COMMIT"]
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", str(here.parent)], capture_output=True,
                               text=True, timeout=30, cwd=here).stdout.strip()
    except Exception:  # noqa: BLE001
        return "unknown"
    return (head + ("+dirty" if dirty else "")) if head else "unknown"


def machine(card: str | None = None) -> dict[str, Any]:
    """The host (platform, processor, cores, Python) and the accelerator named `card`, if any."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "card": card}


def stamp() -> dict[str, Any]:
    """`machine()` with the `commit()` that ran: what a CPU benchmark's JSON records of where it came from."""
    return {**machine(), "commit": commit()}
