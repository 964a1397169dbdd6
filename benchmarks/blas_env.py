"""Set the BLAS thread count from ``--threads N`` before NumPy loads (it reads the variables once).

Imported by the benchmark scripts above their ``import numpy``; only the standard library here.
"""
import os
import sys


def threads_from_argv(argv=None, default="1"):
    """Export OPENBLAS/OMP/MKL_NUM_THREADS from ``--threads N`` (or ``--threads=N``) in ``argv``;
    without the option, keep what the environment says, else ``default``."""
    argv = sys.argv if argv is None else argv
    n = next((a.split("=", 1)[1] for a in argv if a.startswith("--threads=")), None)
    if n is None and "--threads" in argv[:-1]:
        n = argv[argv.index("--threads") + 1]
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = n or os.environ.get(var, default)
