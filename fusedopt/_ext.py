"""Loads the compiled library, or says plainly why it cannot."""
import torch

try:
    from fusedopt._build_info import BUILD
except ImportError:  # never built
    BUILD = None

REBUILD = "rebuild it with: pip install --no-build-isolation -e ."


def _load():
    if BUILD is None:
        raise ImportError(f"fusedopt's extension is not built; {REBUILD}")
    if BUILD["torch"] != torch.__version__:
        raise ImportError(
            f"fusedopt was built for torch {BUILD['torch']}, you have {torch.__version__}; {REBUILD}")
    try:
        from fusedopt import _C  # noqa: F401  (registers torch.ops.fusedopt.*)
    except ImportError as e:
        raise ImportError(
            f"fusedopt._C failed to load ({e}); it was built for torch {BUILD['torch']} "
            f"(CUDA {BUILD['cuda']}, Python {BUILD['python']}), you have torch {torch.__version__} "
            f"(CUDA {torch.version.cuda}); {REBUILD}") from e


_load()
HAS_CUDA_KERNELS = BUILD["cuda"] is not None
