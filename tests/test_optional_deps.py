"""A CPU install has no numba-cuda (it comes with the cuda12/cuda13/test extras): ``import
topkattn`` and every CPU path work without it, and ``impl="cuda"`` says which extra to install.

Each check runs in a fresh interpreter where ``numba_cuda`` cannot be imported and its
``numba.cuda`` redirector is removed, as in an environment where it was never installed
(``numba.cuda`` is then Numba's own deprecated built-in target, or absent).
"""
import json
import subprocess
import sys
import textwrap

import pytest

WITHOUT_NUMBA_CUDA = textwrap.dedent("""
    import importlib.abc, sys
    class _Missing(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "numba_cuda" or name.startswith("numba_cuda."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None
    sys.meta_path[:] = [_Missing()] + [f for f in sys.meta_path if type(f).__name__ != "NumbaCudaFinder"]
""")


def _run(code, env_sim="1"):
    """Run ``code`` without numba-cuda; its last stdout line parsed as JSON."""
    import os
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": env_sim}
    p = subprocess.run([sys.executable, "-c", WITHOUT_NUMBA_CUDA + textwrap.dedent(code)], capture_output=True,
                       text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_import_and_cpu_paths_need_no_numba_cuda():
    out = _run("""
        import json, sys
        import numpy as np
        import topkattn as ta
        import topkattn.ann, topkattn.decoding, topkattn.layers, topkattn.model, topkattn.training
        import topkattn.cli.main
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal((1, 2, 5, 4)) for _ in range(3))
        out = ta.topk_attention(q, k, v, topk=2)
        print(json.dumps({"finite": bool(np.isfinite(out).all()),
                          "loaded": sorted(m for m in sys.modules if m.startswith(("numba_cuda", "numba.cuda")))}))
    """)
    assert out == {"finite": True, "loaded": []}


@pytest.mark.parametrize("sim", ["1", "0"])
def test_impl_cuda_without_numba_cuda_names_the_extra(sim):
    out = _run("""
        import json
        import numpy as np
        import topkattn as ta
        q = np.zeros((1, 1, 3, 4), np.float32)
        errors = []
        try:
            ta.topk_attention_forward(q, q, q, topk=2, impl="cuda")
        except RuntimeError as e:
            errors.append(str(e))
        from topkattn.cuda.launch import get_cuda
        try:
            get_cuda()
        except RuntimeError as e:
            errors.append(str(e))
        print(json.dumps(errors))
    """, env_sim=sim)
    assert len(out) == 2
    for msg in out:
        assert "numba-cuda" in msg and "topkattn[cuda12]" in msg and "topkattn[test]" in msg, msg
