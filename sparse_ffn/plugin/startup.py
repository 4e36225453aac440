"""Start-up hook that makes `--model sparse_ffn` resolve in the stock `lm_eval` script.

lm-eval 0.4.x reads no plugin entry points, so `sparse_ffn.pth` (installed into site-packages)
imports this module at interpreter start. It only appends a tiny finder to `sys.meta_path` (no torch,
no lm_eval import; well under a millisecond). When some program later imports `lm_eval.models`, the finder
lets the import run and then registers our model lazily, as lm-eval registers its own:
`model_registry.register("sparse_ffn", target="module:Class")`. Set SPARSE_FFN_NO_PLUGIN=1 to skip.
"""

from __future__ import annotations

import sys

MODEL_NAME = "sparse_ffn"
TARGET = "sparse_ffn.model_adapters.lm_eval_adapter:SparseFFNLM"
_WATCHED = "lm_eval.models"


def register() -> None:
    """Register the lazy placeholder in lm-eval's model registry (idempotent)."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=TARGET)


class _RegisterAfterImport:
    """A meta-path finder that finds nothing itself; it wraps the real loader of `lm_eval.models`
    to register afterwards. Duck-typed: importing importlib.abc would cost ~20 ms at every start-up."""

    def find_spec(self, name, path, target=None):  # noqa: ANN001
        if name != _WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
        else:
            return None
        if spec.loader is None:
            return None
        self._real = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):  # noqa: ANN001
        return self._real.create_module(spec)

    def exec_module(self, module) -> None:  # noqa: ANN001
        self._real.exec_module(module)
        try:
            register()
        except Exception as e:  # never break lm_eval itself
            sys.stderr.write(f"sparse-ffn: could not register the lm-eval model: {e}\n")


def install() -> None:
    if "lm_eval.models" in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
