"""argparse types shared by the benchmarks: a bad value is a usage error (exit 2) naming the option."""
import argparse


def _int_at_least(text, lo):
    """``int(text)`` if it is an integer >= ``lo``; ArgumentTypeError otherwise."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < lo:
        raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {text!r}")
    return value


def positive_int(text):
    """An integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text):
    """An integer >= 0."""
    return _int_at_least(text, 0)


def rate_list(text):
    """Comma-separated rates in [0, 1), e.g. "0,0.15"."""
    try:
        rates = [float(r) for r in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers in [0, 1), got {text!r}") from None
    if not rates or not all(0.0 <= r < 1.0 for r in rates):
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers in [0, 1), got {text!r}")
    return rates
