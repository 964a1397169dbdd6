"""The typed public API (the package ships ``py.typed``): every public function, method and
property of these modules annotates each parameter and its return, and the annotations resolve
(``typing.get_type_hints``: a misspelt name in a string annotation fails here)."""
import importlib
import inspect
import os
import typing

import pytest

import topkattn

TYPED_MODULES = ["topkattn.model", "topkattn.storage", "topkattn.backend", "topkattn.checks",
                 "topkattn.decoding.runner", "topkattn.training.checkpoint", "topkattn.training.runs",
                 "topkattn.training.train", "topkattn.training.optim", "topkattn.threads",
                 "topkattn.training.tasks", "topkattn.interop", "topkattn.interop.torch",
                 "topkattn.interop.jax",
                 "topkattn.ops.block_attention", "topkattn.ops.block_selection", "topkattn.ops.blockwise_attention",
                 "topkattn.ops.cpu_kernels", "topkattn.ops.dense_attention", "topkattn.ops.dynamic_k",
                 "topkattn.ops.masked_attention", "topkattn.ops.reference", "topkattn.ops.selection",
                 "topkattn.ops.sparse_attention", "topkattn.ops.tail_attention", "topkattn.ops.topk_attention",
                 "topkattn.ops.ternary", "topkattn.distributed.comm", "topkattn.distributed.context_parallel",
                 "topkattn.distributed.data_parallel", "topkattn.distributed.device_comm",
                 "topkattn.distributed.exchange",
                 "topkattn.distributed.head_parallel", "topkattn.distributed.sharded_cache",
                 "topkattn.distributed.sharded_decoding", "topkattn.distributed.sharded_layers",
                 "topkattn.decoding.selectors", "topkattn.cuda.launch",
                 "topkattn.layers.attend", "topkattn.layers.cache", "topkattn.layers.mla", "topkattn.layers.attention",
                 "topkattn.layers.module", "topkattn.layers.embedding", "topkattn.layers.rmsnorm",
                 "topkattn.layers.layernorm", "topkattn.layers.rope", "topkattn.layers.swiglu",
                 "topkattn.layers.gelu", "topkattn.layers.moe", "topkattn.layers.block", "topkattn.layers.loss",
                 "topkattn.layers.token_shift", "topkattn.layers.projection", "topkattn.layers.attention_stats",
                 "topkattn.decoding.lorann", "topkattn.pretrained.bert", "topkattn.pretrained.samples",
                 "topkattn.testing",
                 "topkattn.ann.index", "topkattn.ann.kernels", "topkattn.ann.kmeans", "topkattn.ann.quant",
                 "topkattn.ann.rrr", "topkattn.ann.persist", "topkattn.ann.rwlock",
                 "topkattn.layers.attention_variants", "topkattn.layers.kv_experts", "topkattn.layers.linear",
                 "topkattn.layers.mla_variants", "topkattn.layers.ternary_io",
                 "topkattn.cuda.block_attention", "topkattn.cuda.lorann_score", "topkattn.cuda.mla_decode",
                 "topkattn.cuda.sparse_backward", "topkattn.cuda.topk_forward", "topkattn.cuda.topk_select"]
OPTIONAL = {"topkattn.interop.torch": "torch", "topkattn.interop.jax": "jax"}


def _public_callables(mod):
    """(qualified name, function) of the module's own public functions, and of its public classes'
    own methods and properties (``__init__`` included)."""
    for name, obj in vars(mod).items():
        if name.startswith("_") and name != "__getattr__":
            continue
        if inspect.isfunction(obj) and obj.__module__ == mod.__name__:
            yield name, obj
        elif inspect.isclass(obj) and obj.__module__ == mod.__name__:
            for attr, member in vars(obj).items():
                if attr.startswith("_") and attr != "__init__":
                    continue
                if isinstance(member, (staticmethod, classmethod)):
                    member = member.__func__
                if isinstance(member, property):
                    member = member.fget
                if inspect.isfunction(member) and not getattr(member, "__module__", "").startswith("dataclasses"):
                    yield f"{name}.{attr}", member


def _type_checking_names(mod):
    """Names a module imports only under ``if TYPE_CHECKING:`` (resolved here for get_type_hints)."""
    from topkattn.decoding.selectors import DecodeSelector
    from topkattn.layers.mla import MLA
    from topkattn.model import Transformer
    from topkattn.training.train import TrainConfig, TrainResult
    return {"DecodeSelector": DecodeSelector, "MLA": MLA, "Transformer": Transformer, "Self": typing.Any,
            "TrainConfig": TrainConfig, "TrainResult": TrainResult}


@pytest.mark.parametrize("module", TYPED_MODULES)
def test_public_api_is_annotated(module):
    if module in OPTIONAL:
        pytest.importorskip(OPTIONAL[module])
    mod = importlib.import_module(module)
    found, missing = 0, []
    for name, fn in _public_callables(mod):
        found += 1
        sig = inspect.signature(fn)
        for p in sig.parameters.values():
            if p.name not in ("self", "cls") and p.annotation is inspect.Parameter.empty:
                missing.append(f"{name}({p.name})")
        if sig.return_annotation is inspect.Signature.empty:
            missing.append(f"{name} -> ?")
        typing.get_type_hints(fn, globalns=vars(mod), localns=_type_checking_names(mod))
    assert found, f"{module}: no public functions found (the test would check nothing)"
    assert not missing, f"{module}: unannotated: {missing}"


def test_the_package_is_marked_typed():
    assert os.path.isfile(os.path.join(os.path.dirname(topkattn.__file__), "py.typed"))


def test_the_check_sees_a_missing_hint():
    """The collector finds an unannotated parameter (the test above can fail)."""
    import types

    mod = types.ModuleType("fake")

    def f(a: int, b) -> int:
        return a

    f.__module__ = "fake"
    mod.f = f
    (name, fn), = _public_callables(mod)
    assert name == "f" and inspect.signature(fn).parameters["b"].annotation is inspect.Parameter.empty
