"""Dropout with a device-independent, memory-free mask: `Dropout` and `functional` (see functional.py)."""
import torch

from . import functional
from .functional import bias_dropout_add, dropout, dropout_keep_bits, unpack_keep_bits

__all__ = ["Dropout", "bias_dropout_add", "dropout", "dropout_keep_bits", "functional", "swap_dropout",
           "unpack_keep_bits"]


class Dropout(torch.nn.Dropout):
    """A drop-in for torch.nn.Dropout(p, inplace) (a subclass, so isinstance checks find it) drawing the mask of
    fusedopt.nn.functional.dropout.

    Every forward in training mode takes a fresh (seed, offset) from torch's default CPU generator; in eval
    mode the input is returned as is. Like torch's, it is a leaf module for torch.fx (its mode is read when the
    graph runs) and scriptable (TorchScript calls the ops).
    """

    def __init__(self, p: float = 0.5, inplace: bool = False):
        functional._check_p(p)
        super().__init__(p, inplace)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # the ops, with a draw counter of its own (it orders draws only under compile)
            if not self.training or self.p == 0.0:
                return input
            draw = torch.ops.fusedopt.dropout_seed(torch.zeros((), dtype=torch.long))
            y = torch.ops.fusedopt.dropout(input, float(self.p), draw)
            return input.copy_(y) if self.inplace else y
        if isinstance(input, torch.fx.Proxy) and getattr(input.tracer, "root", self) is not self:  # an fx leaf
            return input.tracer.create_proxy("call_module", input.tracer.path_of_module(self), (input,), {})
        return functional.dropout(input, self.p, self.training, self.inplace)


def swap_dropout(module: torch.nn.Module) -> int:
    """Makes every torch.nn.Dropout in `module` (itself included) a fusedopt.nn.Dropout, in place, and returns
    how many it made.

    For models whose layers a library builds (torch.nn.TransformerEncoderLayer, a torchvision classifier):
    each module's class is swapped (as torch.distributed.fsdp.fully_shard swaps classes), so p, inplace, the
    training mode, hooks and every reference to the module stay as they were. Only torch.nn.Dropout itself:
    Dropout1d/2d/3d and AlphaDropout drop other things and are left alone, and so are the dropouts a layer
    calls as a function (torch.nn.functional.dropout, scaled_dot_product_attention's dropout_p).
    """
    found = [m for m in module.modules() if type(m) is torch.nn.Dropout]
    for m in found:
        functional._check_p(m.p)  # before any is swapped
    for m in found:
        m.__class__ = Dropout
    return len(found)
