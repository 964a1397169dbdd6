"""benchmarks/bench_args.py: bad benchmark options are usage errors (exit 2) naming the option."""
import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_args


def _parser():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=bench_args.positive_int, default=1)
    ap.add_argument("--long", type=bench_args.non_negative_int, default=0)
    ap.add_argument("--rates", type=bench_args.rate_list, default="0")
    return ap


def test_good_values_parse():
    a = _parser().parse_args(["--n", "3", "--long", "0", "--rates", "0,0.15"])
    assert (a.n, a.long, a.rates) == (3, 0, [0.0, 0.15])


@pytest.mark.parametrize("argv,needle", [(["--n", "0"], "argument --n: must be an integer >= 1, got '0'"),
                                         (["--n", "x"], "argument --n: must be an integer >= 1, got 'x'"),
                                         (["--long", "-1"], "argument --long: must be an integer >= 0"),
                                         (["--rates", "abc"], "argument --rates: must be comma-separated numbers"),
                                         (["--rates", "0,1.5"], "argument --rates: must be comma-separated numbers")])
def test_bad_values_exit_2_naming_the_option(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(argv)
    assert e.value.code == 2 and needle in capsys.readouterr().err
