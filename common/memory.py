"""This process's memory, as the benches and reports quote it."""

from __future__ import annotations

from pathlib import Path


def peak_rss_mib() -> float:
    """This process's peak resident set in MiB: ``VmHWM`` of ``/proc/self/status`` (proc(5)).
    ``ru_maxrss`` would also count what a parent held when it forked this process, since
    Linux keeps it across ``exec``; it is used only where ``/proc`` is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
