"""Resident-memory probes for the benchmarks' worker subprocesses (Linux /proc).

``ru_maxrss`` is no use in a subprocess: Linux carries the parent's high-water mark across
fork + exec, so a worker started from a 3 GB parent reports >= 3 GB whatever it allocates.
The per-process high-water mark ``VmHWM`` can be reset (``/proc/self/clear_refs``, value 5,
Linux >= 4.0); ``start_peak()`` resets it and returns the current RSS, ``peak_extra_bytes(base)``
is then the highest RSS reached since, minus ``base``.
"""
import os
import resource


def rss_bytes():
    """Current resident set size of this process, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def start_peak():
    """Reset the high-water mark (where the kernel allows it); return the RSS to subtract."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then VmHWM counts from exec, still not the parent's
    return rss_bytes()


def peak_extra_bytes(base):
    """The highest RSS since ``start_peak()`` (VmHWM; ru_maxrss without /proc) minus ``base``."""
    try:
        peak = _hwm_bytes()
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return max(peak - base, 0)


MIN_MIB = 0.5  # a peak this small is below what the RSS high-water mark resolves


def mem_ratio(peak_mib, ref_mib):
    """``peak_mib / ref_mib``, or NaN when the reference peak is too small to divide by (< MIN_MIB)."""
    return peak_mib / ref_mib if ref_mib >= MIN_MIB else float("nan")
