"""Peak resident memory of this process, as the harness and the reliability suite measure it.

Its own module, importing nothing heavy, so that a workload that measures itself does not
inflate its own figure by importing the harness.
"""

from __future__ import annotations

import sys

if sys.platform != "win32":
    import resource

__all__ = ["peak_rss_kib"]


def peak_rss_kib() -> int:
    """This process's own peak resident set so far, in KiB.

    On Linux ``ru_maxrss`` is not ours alone: the kernel folds the high-water mark of the address
    space we were forked from into it at ``exec``, so it is at least our parent's RSS (the bench
    runner's, or a pytest session's). ``VmHWM`` in ``/proc/self/status`` belongs to the address
    space made at ``exec``: read it where it exists.
    """
    if sys.platform == "win32":  # the peak working set
        import psutil

        info = psutil.Process().memory_info()
        return int(getattr(info, "peak_wset", info.rss)) // 1024
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])  # kB
    except OSError:
        pass
    raw = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return raw // 1024 if sys.platform == "darwin" else raw  # bytes on macOS, KiB on Linux
