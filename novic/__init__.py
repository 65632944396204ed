"""novic: open-vocabulary image classification (NOVIC): train, export, and run without torch.

`from novic import Classifier` is lazy: importing `novic` loads nothing heavy (no numpy, PIL,
onnxruntime or torch); the runtime is imported on first use of `Classifier`, `Batcher`, `Result`,
`Label` or `ClassifierError`.
"""
__version__ = "0.1.0"

__all__ = ["Batcher", "Classifier", "ClassifierError", "Label", "Result", "__version__"]

_LAZY = {"Classifier": "novic.runtime.classifier", "ClassifierError": "novic.runtime.classifier",
         "Label": "novic.runtime.classifier",
         "Result": "novic.runtime.classifier", "Batcher": "novic.runtime.batching"}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'novic' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
