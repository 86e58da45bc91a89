"""A tensor subclass and a counting torch function mode, for the tests of the paths that take plain tensors only
(csrc/module.cpp: Note [Gradients from C++], Note [Direct calls])."""
import torch
from torch.overrides import TorchFunctionMode


class Sub(torch.Tensor):
    """A subclass: what it is handed to goes through Python (__torch_function__)."""


class Counting(TorchFunctionMode):
    """Counts the torch functions called under it."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))
