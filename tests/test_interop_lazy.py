"""The engine never imports PyTorch, JAX, safetensors or tokenizers on its own."""
import json
import subprocess
import sys

import pytest


def _modules_after(code):
    probe = code + "\nimport sys, json; print(json.dumps(sorted(m for m in ('torch', 'jax', 'safetensors', " \
                   "'tokenizers') if m in sys.modules)))"
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_import_topkattn_and_subpackages_is_framework_free():
    assert _modules_after("import topkattn, topkattn.interop, topkattn.pretrained, topkattn.cli.main") == []


def test_interop_submodules_load_on_access():
    pytest.importorskip("torch")
    assert _modules_after("import topkattn.interop as i; i.torch.topk_attention") == ["torch"]
    with pytest.raises(AttributeError, match="has no attribute 'tensorflow'"):
        import topkattn.interop as i

        i.tensorflow
