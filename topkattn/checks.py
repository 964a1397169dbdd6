"""Argument checks, random generators and the row logsumexp: one of each for the whole package.

Every check names the argument and what it received: ``TypeError`` for a wrong type,
``ValueError`` for a value of the right type outside its range.  Each returns the value
in its plain Python form (``int``, ``float``), so callers write ``n = check_int("n", n, 1)``.
"""
from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from topkattn.backend import FLOAT_DTYPES, Array, get_array_module

if TYPE_CHECKING:  # typing.Self is Python 3.11+
    from typing_extensions import Self


def check_int(name: str, value: Any, lo: int | None = None, hi: int | None = None, *,
              optional: bool = False) -> int | None:
    """``int(value)``; TypeError unless an integer (bool is not), ValueError outside [lo, hi].

    ``optional``: None is accepted too (and returned).
    """
    if optional and value is None:
        return None
    alt = " or None" if optional else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer{alt}, got {type(value).__name__} {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must be an integer {_range(lo, hi)}{alt}, got {value!r}")
    return int(value)


def check_real(name: str, value: Any, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
               hi_open: bool = False) -> float:
    """``float(value)`` of a finite real number in the range; TypeError / ValueError otherwise.

    ``lo_open``/``hi_open`` exclude the bound itself.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    below = lo is not None and (v < lo or (lo_open and v == lo))
    above = hi is not None and (v > hi or (hi_open and v == hi))
    if not np.isfinite(v) or below or above:
        raise ValueError(f"{name} must be {_real_range(lo, hi, lo_open, hi_open)}, got {value!r}")
    return v


def check_bool(name: str, value: Any) -> bool:
    """``bool(value)`` of True/False (or a NumPy bool); TypeError for anything else (1, "no", None)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` if it is one of the strings ``choices``; TypeError for a non-string, ValueError
    listing the choices for another string."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__} {value!r}")
    if value not in choices:
        listed = [repr(c) for c in choices]
        alternatives = listed[0] if len(listed) == 1 else ", ".join(listed[:-1]) + " or " + listed[-1]
        raise ValueError(f"{name} must be {alternatives}, got {value!r}")
    return value


def make_rng(seed: Any, name: str = "seed", *, allow_none: bool = False) -> np.random.Generator:
    """A ``numpy.random.Generator`` from a seed.

    Accepts a Generator (used as is), an int, a non-empty sequence of ints, a
    ``SeedSequence`` and, with ``allow_none``, None (fresh OS entropy: for draws that
    need not be reproducible).  TypeError naming ``name`` for anything else, ValueError
    naming it for a negative int seed (or a negative int in the list).
    """
    if isinstance(seed, np.random.Generator):
        return seed
    if (seed is None and allow_none) or isinstance(seed, np.random.SeedSequence):
        return np.random.default_rng(seed)
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        if seed < 0:
            raise ValueError(f"{name} must be a non-negative int seed, got {seed!r}")
        return np.random.default_rng(int(seed))
    if isinstance(seed, (list, tuple)) and seed and all(
            isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in seed):
        if any(s < 0 for s in seed):
            raise ValueError(f"{name} must hold non-negative ints, got {list(seed)!r}")
        return np.random.default_rng([int(s) for s in seed])
    raise TypeError(f"{name} must be an int seed, a list of ints or a numpy.random.Generator, "
                    f"got {type(seed).__name__} {seed!r}")


class ConfigDict:
    """Mixin for dataclass configs: ``to_dict`` and a ``from_dict`` that refuses unknown keys."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def _plain_scalars(self) -> None:
        """Replace NumPy scalar fields (np.int64(2), np.float32(0.1), ...) by the Python values the
        checks accept them as, so the config stays JSON-serialisable (checkpoints, metrics)."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, plain_value(getattr(self, f.name)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        if not isinstance(d, Mapping):
            raise TypeError(f"{cls.__name__}.from_dict needs a dict, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys: {unknown}")
        return cls(**d)


def plain_value(v: Any) -> Any:
    """A NumPy scalar as its Python value (``np.int64(2)`` -> ``2``); anything else unchanged."""
    return v.item() if isinstance(v, np.generic) else v


def float_dtype(dtype: Any) -> np.dtype:
    """``np.dtype`` float32 or float64 from a name or dtype; TypeError otherwise."""
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"dtype must be 'float32' or 'float64', got {dtype!r}") from e
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return dt


def logsumexp_rows(a: Array) -> Array:
    """Row logsumexp of (rows, n) float scores in float64 (-inf entries ignored); -inf for empty rows.

    The row maximum is subtracted first, so large scores (1e4 and up) do not overflow.
    """
    xp = get_array_module(a)
    a = a.astype(xp.float64)
    if a.shape[-1] == 0:
        return xp.full(a.shape[:-1], -xp.inf)
    mx = a.max(axis=-1)
    safe = xp.where(xp.isfinite(mx), mx, 0.0)
    with np.errstate(divide="ignore"):
        return safe + xp.log(xp.exp(a - safe[..., None]).sum(axis=-1))


def _range(lo, hi):
    if lo is not None and hi is not None:
        return f"in [{lo}, {hi}]"
    if lo is not None:
        return f">= {lo}"
    return f"<= {hi}"


def _real_range(lo, hi, lo_open, hi_open):
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return "finite"
