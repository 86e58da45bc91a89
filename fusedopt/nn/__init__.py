"""Dropout with a device-independent, memory-free mask: `Dropout` and `functional` (see functional.py)."""
import torch

from . import functional
from .functional import bias_dropout_add, dropout, dropout_keep_bits, unpack_keep_bits

__all__ = ["Dropout", "bias_dropout_add", "dropout", "dropout_keep_bits", "functional", "unpack_keep_bits"]


class Dropout(torch.nn.Module):
    """A drop-in for torch.nn.Dropout(p, inplace) drawing the mask of fusedopt.nn.functional.dropout.

    Every forward in training mode takes a fresh (seed, offset) from torch's default CPU generator; in eval
    mode the input is returned as is.
    """

    def __init__(self, p: float = 0.5, inplace: bool = False):
        super().__init__()
        functional._check_p(p)
        self.p = p
        self.inplace = inplace

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return functional.dropout(input, self.p, self.training, self.inplace)

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace={self.inplace}"
