"""Atomic file writes: nothing a user wrote is ever left half-written.

The data goes to a temporary file in the target's folder, is flushed and fsynced, then
renamed over the target (``os.replace``, atomic on POSIX), and the folder is fsynced so
the rename survives a crash.  A failure at any point leaves the old file untouched.
"""
import os
import tempfile

import numpy as np


def atomic_savez(path, arrays, *, prefix):
    """Write ``arrays`` (name -> ndarray) as an uncompressed ``.npz`` at ``path``, atomically.

    The file gets the permissions a plain ``open(path, "w")`` would give (0666 minus the
    umask), not the owner-only mode of a temporary file.  ``prefix`` names the temporary
    file (``<prefix>*.tmp`` in the same folder), so a killed writer's leftovers are
    recognisable (see :func:`remove_stale_temporaries`).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


def remove_stale_temporaries(folder, prefix):
    """Delete ``<prefix>*.tmp`` files in ``folder`` (left by a writer killed mid-save).

    Only for a folder this process owns (a training run's ``--out``): another writer's
    in-flight temporary file would be removed too.  Returns the names removed.
    """
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if name.startswith(prefix) and name.endswith(".tmp"):
            try:
                os.unlink(os.path.join(folder, name))
                removed.append(name)
            except OSError:
                pass
    return removed


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder):
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory handles
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
