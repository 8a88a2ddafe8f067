"""This process's resident memory on Linux, from ``/proc/self/status``: the
trainer's per-phase CPU peaks (``trainer.utils.Timer``) and the benchmarks'
(``benchmarks/common.py``) read it here.

VmRSS is the resident set now, VmHWM its high-water mark; ``reset_peak_rss``
sets the mark to the resident size now, so that a later VmHWM is the peak of
what ran in between. Not ``ru_maxrss``: Linux carries a parent's resident
size at fork into its child's ``ru_maxrss``, which would hide a child's own
peak below its parent's."""

from __future__ import annotations


def status_kb(field: str) -> int | None:
    """``field`` of /proc/self/status (``"VmRSS"``, ``"VmHWM"``) in kB; None
    where it cannot be read (not Linux) or is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the high-water mark (VmHWM) to the resident size now (Linux:
    ``clear_refs`` 5); whether it could."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
