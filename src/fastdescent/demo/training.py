"""Section 2 of the demo: a NumPy MLP on handwritten digits with every optimizer, kernel vs reference.

Each optimizer trains the same network (same seed, same batches) twice, once with
the kernel backend and once with the NumPy reference: the accuracies, the wall time
of one ``optimizer.step`` in each mode, and the largest parameter difference
between the two runs (0: the backends agree bit for bit).

:func:`train_epochs` is the training loop every MLP run of the demo uses.
"""

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

import fastdescent

from .console import Progress, table
from .contenders import CONTENDERS, make_optimizer
from .data import MiniBatches
from .mlp import MLP

INSTALL_HINT = 'pip install "fastdescent[demo]"  (matplotlib and scikit-learn)'


@dataclass
class Digits:
    """scikit-learn's 8x8 digits, pixels scaled to [0, 1] (float32), split 75/25 stratified."""

    x_train: np.ndarray
    x_test: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray

    @property
    def n_features(self):
        return self.x_train.shape[1]


def load_digits_split(seed):
    """The digits bundled with scikit-learn (no download), split with ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    return Digits(*train_test_split(x, digits.target, test_size=0.25, stratify=digits.target, random_state=seed))


@dataclass
class History:
    """What :func:`train_epochs` records, one entry per epoch (``step_seconds`` per step)."""

    train_loss: list = field(default_factory=list)       # mean loss of the epoch's batches
    held_out_loss: list = field(default_factory=list)
    held_out_accuracy: list = field(default_factory=list)
    lr: list = field(default_factory=list)                # param_groups[0]["lr"] at the epoch's end
    epoch_seconds: list = field(default_factory=list)     # gradients + updates, evaluations excluded
    step_seconds: list = field(default_factory=list)      # each optimizer.step alone
    #: ``(step, training seconds so far, loss on the traced set)`` every ``trace_every`` steps, from step 0
    trace: list = field(default_factory=list)

    @property
    def epochs(self):
        return len(self.train_loss)


@contextmanager
def evaluation_point(optimizer):
    """The parameters hold the point to evaluate inside this block: Schedule-Free's
    averaged iterate (its ``eval()``, then ``train()`` back), else the parameters as
    they are."""
    if not hasattr(optimizer, "eval"):
        yield
        return
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()


def train_epochs(model, optimizer, batches, epochs, held_out, *, after_step=None, after_epoch=None,
                 trace=None, trace_every=1, progress=None, label=""):
    """Train ``model`` for up to ``epochs`` passes over ``batches``; returns a :class:`History`.

    ``held_out`` is ``(x, y)``, evaluated after every epoch. ``after_step(step, loss)``
    runs after each ``optimizer.step`` (schedulers, averagers; ``step`` counts from 1);
    ``after_epoch(epoch, history)`` after each evaluation, and training stops early
    when it returns True. ``trace=(x, y)`` records the loss on that whole set every
    ``trace_every`` steps (the path of the training loss within epochs). Hooks,
    evaluations and traces are not counted in ``epoch_seconds``. Evaluations and
    traces take place at the optimizer's :func:`evaluation_point`.
    """
    x_held_out, y_held_out = held_out
    history = History()
    step, total_seconds = 0, 0.0
    if trace is not None:
        with evaluation_point(optimizer):
            history.trace.append((0, 0.0, model.loss(*trace)))
    for epoch in range(1, epochs + 1):
        losses, seconds = [], 0.0
        for xb, yb in batches:
            started = time.perf_counter()
            loss, grads = model.loss_and_gradients(xb, yb)
            before_step = time.perf_counter()
            optimizer.step(grads)
            finished = time.perf_counter()
            seconds += finished - started
            history.step_seconds.append(finished - before_step)
            losses.append(loss)
            step += 1
            if trace is not None and step % trace_every == 0:
                with evaluation_point(optimizer):
                    history.trace.append((step, total_seconds + seconds, model.loss(*trace)))
            if after_step is not None:
                after_step(step, loss)
        history.train_loss.append(float(np.mean(losses)))
        with evaluation_point(optimizer):
            history.held_out_loss.append(model.loss(x_held_out, y_held_out))
            history.held_out_accuracy.append(model.accuracy(x_held_out, y_held_out))
        history.lr.append(float(optimizer.param_groups[0]["lr"]))
        history.epoch_seconds.append(seconds)
        total_seconds += seconds
        if progress is not None:
            progress.update(label, epoch, epochs, f"loss {history.train_loss[-1]:.4f}  "
                                                  f"held-out {100 * history.held_out_accuracy[-1]:.1f}%")
        if after_epoch is not None and after_epoch(epoch, history):
            if progress is not None and epoch < epochs:
                progress.update(label, epochs, epochs, f"stopped after epoch {epoch}")
            break
    return history


def max_difference(arrays, others):
    """The largest absolute elementwise difference between two lists of arrays."""
    return max((float(np.max(np.abs(a - b), initial=0.0)) for a, b in zip(arrays, others, strict=True)),
               default=0.0)


def train_once(contender, backend, data, args, progress):
    """Train a fresh MLP (same seed every time) with one optimizer and backend."""
    model = MLP([data.n_features, *args.hidden, 10], activation="relu", dtype=np.float32, seed=args.seed)
    optimizer = make_optimizer(contender, model.params, contender.mlp_lr, backend=backend)
    batches = MiniBatches(data.x_train, data.y_train, batch_size=args.batch_size, seed=args.seed)
    history = train_epochs(model, optimizer, batches, args.epochs, (data.x_test, data.y_test),
                           progress=progress, label=f"{contender.name} [{backend}]")
    if hasattr(optimizer, "eval"):
        optimizer.eval()  # the model to keep is Schedule-Free's averaged iterate
    return {
        "model": model,
        "history": history,
        # the median resists the pauses of a shared machine better than the mean
        "seconds_per_step": float(np.median(history.step_seconds)) if history.step_seconds else float("nan"),
        "train_accuracy": model.accuracy(data.x_train, data.y_train),
        "held_out_accuracy": model.accuracy(data.x_test, data.y_test),
    }


def digits_or_none(seed):
    """The digits split, or None (and a note) when scikit-learn is missing."""
    try:
        return load_digits_split(seed)
    except ImportError:
        print(f"scikit-learn is not installed, so there is no dataset: skipping the training.\n"
              f"To run it: {INSTALL_HINT}")
        return None


def train(args, contenders):
    print("\n== 2. A multilayer perceptron on handwritten digits, kernel vs reference ==")
    data = digits_or_none(args.seed)
    if data is None:
        return None
    sizes = [data.n_features, *args.hidden, 10]
    model = MLP(sizes)
    print(f"scikit-learn's bundled digits: {len(data.x_train)} training and {len(data.x_test)} held-out 8x8 images;"
          f" MLP {'-'.join(map(str, sizes))} (ReLU, softmax cross-entropy, {model.n_parameters:,} float32"
          f" parameters);\n{args.epochs} epochs of shuffled mini-batches of {args.batch_size};"
          f" optimizer threads: {fastdescent.get_num_threads()}.\n")
    progress = Progress()
    results = {}
    for contender in contenders:
        runs = {backend: train_once(contender, backend, data, args, progress) for backend in ("kernel", "reference")}
        results[contender.name] = runs
    headers = ["optimizer", "lr", "train acc", "held-out acc", "kernel us/step", "reference us/step",
               "speedup", "max |param diff|"]
    rows = []
    for name, runs in results.items():
        kernel, reference = runs["kernel"], runs["reference"]
        difference = max_difference(kernel["model"].params, reference["model"].params)
        rows.append([name, f"{CONTENDERS[name].mlp_lr:g}", f"{100 * kernel['train_accuracy']:.1f}%",
                     f"{100 * kernel['held_out_accuracy']:.1f}%",
                     f"{1e6 * kernel['seconds_per_step']:.1f}", f"{1e6 * reference['seconds_per_step']:.1f}",
                     f"{reference['seconds_per_step'] / kernel['seconds_per_step']:.1f}x", f"{difference:.3g}"])
    print()
    print(table(rows, headers, "<>>>>>>>"))
    print("(accuracies after the kernel run; us/step = median wall time of one optimizer.step;"
          " param diff = kernel run vs reference run)")
    return results


__all__ = ["Digits", "History", "evaluation_point", "load_digits_split", "train_epochs"]
