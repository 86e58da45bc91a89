"""The course's training loop on scikit-learn's bundled digits (no download),
with torch.optim.Adam, torch.optim.Adam(fused=True) and fusedopt.Adam from the
same seed.

    python examples/train_digits.py [--epochs 30] [--out results]

Two models: the course's `Net` (one linear layer + cross-entropy) and an MLP with
Xavier-uniform init, fusedopt.nn.Dropout, and L2 + L1 regularization that leaves
biases alone. For the torch run, L1 enters as a loss penalty λ1·Σ|θ| (whose
gradient is λ1·sign(θ), the same coupled term fusedopt's l1_decay adds).
Prints test accuracy, the optimizer-step wall time and the largest parameter
difference from the torch run; writes the loss curves as a PNG.

The runs differ only in float rounding, and training amplifies a difference of
one ulp: after 30 epochs the MLP's parameters of torch's own for-loop and fused
Adam differ by about 0.4. That is the yardstick fusedopt's difference is printed
beside.
"""
import argparse
import gc
import time
from pathlib import Path

import torch
from torch import nn

import fusedopt


class Net(nn.Module):  # the course's model
    def __init__(self, d_in=64, n_classes=10):
        super().__init__()
        self.linear = nn.Linear(d_in, n_classes)

    def forward(self, x):
        return self.linear(x)


class MLP(nn.Module):
    def __init__(self, d_in=64, hidden=128, n_classes=10, p=0.2):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), fusedopt.nn.Dropout(p),
                                    nn.Linear(hidden, hidden), nn.ReLU(), fusedopt.nn.Dropout(p),
                                    nn.Linear(hidden, n_classes))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)  # U(±√(6/(fan_in + fan_out)))
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.layers(x)


def digits(seed=0):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_train = int(0.8 * len(y))
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


RUNS = {"torch": dict(foreach=False), "torch fused": dict(fused=True), "fusedopt": None}


def train(model_cls, run, data, epochs, seed, lr=1e-2, weight_decay=1e-4, l1_decay=1e-5):
    torch.manual_seed(seed)  # same init, same batches, same dropout masks for every run
    model = model_cls()
    (x_train, y_train), (x_test, y_test) = data
    regularize = model_cls is MLP
    use_fusedopt = RUNS[run] is None
    if use_fusedopt:
        groups = (fusedopt.param_groups(model, weight_decay=weight_decay, l1_decay=l1_decay)
                  if regularize else model.parameters())
        optimizer = fusedopt.Adam(groups, lr=lr)
    else:
        groups = (fusedopt.param_groups(model, weight_decay=weight_decay, l1_decay=0.0)
                  if regularize else model.parameters())
        optimizer = torch.optim.Adam(groups, lr=lr, **RUNS[run])
    decayed = optimizer.param_groups[0]["params"] if regularize else []
    criterion = nn.CrossEntropyLoss()
    # A full garbage collection of the ~1M objects that torch and scikit-learn import takes up to 0.2 s and lands
    # in whichever step happens to trigger it: freeze them, so the step times are about the optimizers.
    gc.collect()
    gc.freeze()
    losses, step_time = [], 0.0
    for _ in range(epochs):  # the course's loop
        model.train()
        order = torch.randperm(len(y_train))
        for i in range(0, len(order), 64):
            idx = order[i:i + 64]
            optimizer.zero_grad()
            loss = criterion(model(x_train[idx]), y_train[idx])
            if regularize and not use_fusedopt:
                loss = loss + l1_decay * sum(p.abs().sum() for p in decayed)
            loss.backward()
            t0 = time.perf_counter()
            optimizer.step()
            step_time += time.perf_counter() - t0
            losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return model, losses, accuracy, step_time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    data = digits(args.seed)
    report, curves = {}, {}
    for model_cls in (Net, MLP):
        runs = {name: train(model_cls, name, data, args.epochs, args.seed) for name in RUNS}
        diffs = {name: max((a - b).abs().max().item()
                           for a, b in zip(runs["torch"][0].parameters(), model.parameters()))
                 for name, (model, *_) in runs.items()}
        for name, (_, losses, acc, step_time) in runs.items():
            diff = f"  largest parameter difference from torch {diffs[name]:.3e}" if name != "torch" else ""
            print(f"{model_cls.__name__:4s} {name:11s} test accuracy {acc:.4f}  optimizer steps {step_time:.3f} s"
                  + diff)
            curves[f"{model_cls.__name__} {name}"] = losses
        report[model_cls.__name__] = {"accuracy": {k: v[2] for k, v in runs.items()},
                                      "max_param_diff": diffs["fusedopt"], "torch_fused_diff": diffs["torch fused"]}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for label, losses in curves.items():
            ax.plot(losses, label=label, lw=1, ls="--" if "fusedopt" in label else ":" if "fused" in label else "-")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_yscale("log")
        ax.legend()
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(out / "digits_loss.png", dpi=120)
        print(f"wrote {out / 'digits_loss.png'}")
    except ImportError:
        pass
    return report


if __name__ == "__main__":
    main()
