"""argparse types shared by the benchmarks: a bad value is a usage error (exit 2) naming the option."""
import argparse


def positive_int(text):
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def non_negative_int(text):
    """An integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def rate_list(text):
    """Comma-separated rates in [0, 1), e.g. "0,0.15"."""
    try:
        rates = [float(r) for r in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers in [0, 1), got {text!r}") from None
    if not rates or not all(0.0 <= r < 1.0 for r in rates):
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers in [0, 1), got {text!r}")
    return rates
