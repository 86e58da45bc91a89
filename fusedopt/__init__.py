"""fusedopt: one pass over memory per optimizer step, on the CPU and CUDA.

    import fusedopt
    opt = fusedopt.AdamW(model.parameters(), lr=1e-3, l1_decay=1e-5)

The compiled library loads on first use of anything that needs it, so
`fusedopt.reference` (the pure-Python spec) works without a build.
"""
import importlib

_LAZY = {
    "SGD": "fusedopt.optim",
    "Adagrad": "fusedopt.optim",
    "RMSprop": "fusedopt.optim",
    "Adam": "fusedopt.optim",
    "AdamW": "fusedopt.optim",
    "param_groups": "fusedopt.optim",
    "zero_numbering": "fusedopt.optim",
    "ops": "fusedopt.ops",
    "nn": "fusedopt.nn",
    "reference": "fusedopt.reference",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'fusedopt' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    value = module if module.__name__ == f"fusedopt.{name}" else getattr(module, name)
    globals()[name] = value
    return value
