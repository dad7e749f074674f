"""Peak resident memory of this process, from /proc (standard library only: the ANTs venv imports it too)."""

from __future__ import annotations

from pathlib import Path


def status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in kB (``VmRSS``, ``VmHWM``, ...); 0 where absent."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak() -> None:
    """Reset VmHWM (Linux >= 4.0), so the next reading is the peak of what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
