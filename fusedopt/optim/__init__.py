"""fusedopt's optimizers: drop-in torch.optim classes whose step is one fused op call per device and dtype."""
from ._base import zero_numbering
from .adagrad import Adagrad
from .adam import Adam, AdamW
from .groups import param_groups
from .rmsprop import RMSprop
from .sgd import SGD

__all__ = ["SGD", "Adagrad", "Adam", "AdamW", "RMSprop", "param_groups", "zero_numbering"]
