r"""Section 3 of the demo: schedules, batch sizes and averaging, on the digits MLP.

What a training loop does around the update rule, each part on the same network,
data split and seeds, every run with the kernel backend:

* **batch size**: plain SGD on the full batch, on mini-batches and on single
  samples for the same number of epochs; the training loss against epochs and
  against wall time, and the time per epoch;
* **learning-rate schedules** for SGD with momentum: constant, step decay,
  exponential, cosine, SGDR, cyclic (triangular, triangular2) and one-cycle;
  held-out accuracy and loss per epoch for each;
* **momentum** annealed from 0.5 to 0.9 against a fixed 0.9;
* **reduce-on-plateau and early stopping** on the loss of a validation split,
  restoring the best weights;
* **weight averaging**: SWA (after a ``swa_anneal`` to a constant rate) and an
  EMA against the final weights; this run is repeated with the NumPy reference
  backend and the largest difference of any parameter or average is printed (0).

Schedules step once per optimizer step (``Scheduler.step()`` after ``opt.step``),
so a "step" below is an update, and an epoch is ``len(batches)`` of them.
"""

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

import fastdescent
from fastdescent import schedules

from .console import Progress, table
from .data import MiniBatches
from .mlp import MLP
from .training import digits_or_none, max_difference, train_epochs

#: plain SGD's rate in the batch-size comparison (the same for every batch size)
BATCH_LR = 0.05
#: full-training-set losses recorded per epoch for the loss paths
TRACES_PER_EPOCH = 25
#: the peak learning rate of every schedule, and SGD's momentum
PEAK_LR = 0.1
MOMENTUM = 0.9
#: the constant rate of the SWA phase: high, so that the trained weights keep moving
SWA_LR = 0.2
#: ReduceLROnPlateau's factor, and the floor of its reductions where early stopping starts counting
PLATEAU_FACTOR = 0.3
LR_FLOOR = 1e-3
#: the parts of this section, in the order they run (names for ``--sections``)
PARTS = ("batch-size", "schedules", "momentum", "plateau", "averaging")


@dataclass
class Setting:
    """What every run of the section shares: the data, the network's shape, the seed."""

    data: object
    hidden: list
    epochs: int
    batch_size: int
    seed: int

    def model(self):
        """A fresh MLP, initialized the same way every time."""
        return MLP([self.data.n_features, *self.hidden, 10], activation="relu", dtype=np.float32, seed=self.seed)

    def batches(self, batch_size=None, x=None, y=None):
        """Shuffled batches of the training set (or of ``x, y``), the same order every time."""
        x = self.data.x_train if x is None else x
        y = self.data.y_train if y is None else y
        return MiniBatches(x, y, batch_size=batch_size or self.batch_size, seed=self.seed)

    @property
    def held_out(self):
        return self.data.x_test, self.data.y_test

    @property
    def steps_per_epoch(self):
        return len(self.batches())

    @property
    def total_steps(self):
        return self.epochs * self.steps_per_epoch


@contextmanager
def default_backend(name):
    """Run a block with ``name`` as the default backend (the averagers follow it)."""
    previous = fastdescent.get_backend()
    fastdescent.set_backend(name)
    try:
        yield
    finally:
        fastdescent.set_backend(previous)


def _percent(x):
    return f"{100 * x:.1f}%"


# ---------------------------------------------------------------- batch size

def batch_sizes(setting, progress):
    """Plain SGD with one batch, ``batch_size`` samples and one sample per step."""
    n = len(setting.data.x_train)
    sizes = {"full batch": n, f"batches of {setting.batch_size}": setting.batch_size, "single samples": 1}
    train_set = (setting.data.x_train, setting.data.y_train)
    runs = {}
    for label, size in sizes.items():
        model = setting.model()
        optimizer = fastdescent.SGD(model.params, lr=BATCH_LR, backend="kernel")
        batches = setting.batches(size)
        every = max(1, len(batches) // TRACES_PER_EPOCH)
        runs[label] = {
            "batch_size": size,
            "steps_per_epoch": len(batches),
            "history": train_epochs(model, optimizer, batches, setting.epochs, setting.held_out,
                                    trace=train_set, trace_every=every, progress=progress, label=label),
        }
    rows = []
    for label, run in runs.items():
        history = run["history"]
        rows.append([label, f"{run['batch_size']}", f"{run['steps_per_epoch']}",
                     f"{1e3 * np.median(history.epoch_seconds):.1f}", f"{1e6 * np.median(history.step_seconds):.1f}",
                     f"{history.trace[-1][2]:.4f}", _percent(history.held_out_accuracy[-1])])
    print()
    print(table(rows, ["batches", "size", "steps/epoch", "ms/epoch", "us/update", "final train loss",
                       "held-out acc"], "<>>>>>>"))
    print(f"(plain SGD, lr {BATCH_LR:g}, {setting.epochs} epochs each; ms/epoch = median time of an epoch's"
          " gradients and updates; us/update = median time of one optimizer.step)")
    return runs


# ---------------------------------------------------------------- schedules

def scheduled_runs(setting, plans, hyperparameter, progress):
    """One run of SGD with momentum (``PEAK_LR``, ``MOMENTUM``) per schedule in
    ``plans`` (label -> schedule), the schedule driving ``hyperparameter`` and
    stepped after every update. Returns label -> ``{"schedule", "history"}``."""
    runs = {}
    for label, schedule in plans.items():
        model = setting.model()
        optimizer = fastdescent.SGD(model.params, lr=PEAK_LR, momentum=MOMENTUM, backend="kernel")
        scheduler = fastdescent.Scheduler(optimizer, schedule, hyperparameter)
        history = train_epochs(model, optimizer, setting.batches(), setting.epochs, setting.held_out,
                               after_step=lambda step, loss, s=scheduler: s.step(), progress=progress, label=label)
        runs[label] = {"schedule": schedule, "history": history}
    return runs


def schedule_catalog(total_steps):
    """The learning-rate schedules compared, each peaking at ``PEAK_LR``, over ``total_steps``."""
    T = total_steps
    half_cycle = max(1, T // 10)  # five triangles
    return {
        "constant": schedules.constant(PEAK_LR),
        "step decay": schedules.step_decay(PEAK_LR, step_size=max(1, -(-T // 4)), gamma=0.3),
        "exponential": schedules.exponential(PEAK_LR, gamma=0.01 ** (1 / T)),
        "cosine": schedules.cosine(PEAK_LR, T_max=T, eta_min=PEAK_LR / 100),
        # periods T0, 2 T0, 4 T0, 8 T0 (15 T0 >= T): the fourth period ends with the run, no fifth begins
        "SGDR (T_mult 2)": schedules.cosine_warm_restarts(PEAK_LR, T_0=-(-T // 15), T_mult=2,
                                                          eta_min=PEAK_LR / 100),
        "triangular": schedules.cyclic(PEAK_LR / 20, PEAK_LR, step_size_up=half_cycle, mode="triangular"),
        "triangular2": schedules.cyclic(PEAK_LR / 20, PEAK_LR, step_size_up=half_cycle, mode="triangular2"),
        "one-cycle": schedules.one_cycle(PEAK_LR, total_steps=T),
    }


def learning_rate_schedules(setting, progress):
    """SGD with momentum under each schedule of :func:`schedule_catalog`."""
    catalog = schedule_catalog(setting.total_steps)
    runs = scheduled_runs(setting, catalog, "lr", progress)
    rows = []
    for label, run in runs.items():
        history = run["history"]
        best = int(np.argmax(history.held_out_accuracy))
        rows.append([label, repr(run["schedule"]).split("(")[0], f"{history.lr[-1]:.2g}",
                     f"{history.train_loss[-1]:.4f}", f"{history.held_out_loss[-1]:.4f}",
                     _percent(history.held_out_accuracy[-1]),
                     f"{_percent(history.held_out_accuracy[best])} (epoch {best + 1})"])
    print()
    print(table(rows, ["schedule", "fastdescent.schedules", "final lr", "train loss", "held-out loss",
                       "held-out acc", "best held-out acc"], "<<>>>>>"))
    print(f"(SGD, momentum {MOMENTUM:g}, peak lr {PEAK_LR:g}, batches of {setting.batch_size},"
          f" {setting.total_steps} steps; schedules advance every step)")
    return runs


# ---------------------------------------------------------------- momentum

def momentum_annealing(setting, progress):
    """Momentum rising linearly from 0.5 to 0.9 over the first quarter, against 0.9 throughout."""
    anneal_steps = max(1, setting.total_steps // 4)
    plans = {
        "annealed 0.5 -> 0.9": schedules.linear(0.5, MOMENTUM, anneal_steps),
        f"fixed {MOMENTUM:g}": schedules.constant(MOMENTUM),
    }
    runs = scheduled_runs(setting, plans, "momentum", progress)
    rows = []
    for label, run in runs.items():
        history = run["history"]
        first = history.train_loss[0]
        rows.append([label, f"{first:.4f}", f"{history.train_loss[-1]:.4f}", f"{history.held_out_loss[-1]:.4f}",
                     _percent(history.held_out_accuracy[-1])])
    print()
    print(table(rows, ["momentum", "epoch 1 train loss", "final train loss", "held-out loss", "held-out acc"],
                "<>>>>"))
    print(f"(SGD, lr {PEAK_LR:g}; the annealed momentum reaches {MOMENTUM:g} after {anneal_steps} of"
          f" {setting.total_steps} steps)")
    return runs


# ---------------------------------------------------------------- plateau and early stopping

def plateau_and_early_stopping(setting, progress):
    """ReduceLROnPlateau and EarlyStopping(restore_best=True) on a validation split's loss.

    The rate is cut by ``PLATEAU_FACTOR`` after every epoch that does not improve
    on the best validation loss, down to ``LR_FLOOR``; at the floor, training stops
    after three epochs without improvement and the best weights are put back.
    The decisions watch a validation set carved out of the training set, so the
    held-out set that reports the result has not steered the training.
    """
    from sklearn.model_selection import train_test_split

    data = setting.data
    x_fit, x_val, y_fit, y_val = train_test_split(data.x_train, data.y_train, test_size=0.2,
                                                  stratify=data.y_train, random_state=setting.seed)
    max_epochs = 3 * setting.epochs
    model = setting.model()
    optimizer = fastdescent.SGD(model.params, lr=PEAK_LR, momentum=MOMENTUM, backend="kernel")
    # reduce at every plateau; once at the floor, stop after `patience` epochs without improvement
    plateau = fastdescent.ReduceLROnPlateau(optimizer, factor=PLATEAU_FACTOR, patience=1, min_lr=LR_FLOOR)
    stopping = fastdescent.EarlyStopping(optimizer, patience=3, min_lr=LR_FLOOR, restore_best=True)
    reductions, test_accuracy, test_loss = [], [], []

    def after_epoch(epoch, history):
        # the held-out set of train_epochs is the validation split here; the test set is scored on the side
        test_accuracy.append(model.accuracy(data.x_test, data.y_test))
        test_loss.append(model.loss(data.x_test, data.y_test))
        validation_loss = history.held_out_loss[-1]
        lr = optimizer.param_groups[0]["lr"]
        if stopping.step(validation_loss):  # restores the best weights, in place
            return True
        if plateau.step(validation_loss):
            reductions.append((epoch, lr, optimizer.param_groups[0]["lr"]))
        return False

    history = train_epochs(model, optimizer, setting.batches(x=x_fit, y=y_fit), max_epochs, (x_val, y_val),
                           after_epoch=after_epoch, progress=progress, label="plateau + early stop")
    if not stopping.should_stop:
        stopping.restore()
    restored = {"test_accuracy": model.accuracy(data.x_test, data.y_test),
                "test_loss": model.loss(data.x_test, data.y_test)}
    print()
    if reductions:
        print(f"Learning-rate reductions (ReduceLROnPlateau, factor {PLATEAU_FACTOR:g}, patience 1,"
              f" floor {LR_FLOOR:g}):")
        for epoch, old, new in reductions:
            print(f"  after epoch {epoch:>3}: {old:.3g} -> {new:.3g}")
    else:
        print("No learning-rate reduction was needed.")
    if stopping.should_stop:
        print(f"Stopped after epoch {history.epochs} of at most {max_epochs}: {stopping.patience} epochs at the"
              f" floor without a better validation loss.")
    else:
        print(f"Ran all {max_epochs} epochs without stopping; restored the best weights anyway.")
    print()
    rows = [["at the stop", f"{history.epochs}", f"{history.held_out_loss[-1]:.4f}", f"{test_loss[-1]:.4f}",
             _percent(test_accuracy[-1])],
            ["restored (best)", f"{stopping.best_epoch}", f"{stopping.best:.4f}", f"{restored['test_loss']:.4f}",
             _percent(restored["test_accuracy"])]]
    print(table(rows, ["weights", "epoch", "validation loss", "held-out loss", "held-out acc"], "<>>>>"))
    print(f"({len(x_fit)} training and {len(x_val)} validation images split from the training set;"
          f" the {len(data.x_test)} held-out images only score the result)")
    return {"history": history, "test_accuracy": test_accuracy, "reductions": reductions,
            "best_epoch": stopping.best_epoch, "stopped": stopping.should_stop, "restored": restored,
            "max_epochs": max_epochs}


# ---------------------------------------------------------------- averaging

def averaged_run(setting, backend, progress):
    """SGD with momentum: cosine for half the epochs, ``swa_anneal`` to the constant
    ``SWA_LR`` over one epoch, then SWA of the weights at every epoch's end; an EMA
    of every step throughout. Returns the model, the averagers and per-epoch scores."""
    spe, T = setting.steps_per_epoch, setting.total_steps
    swa_lr = SWA_LR
    main_steps = max(1, (setting.epochs // 2) * spe)
    anneal_steps = spe
    schedule = schedules.join([
        schedules.cosine(PEAK_LR, T_max=main_steps, eta_min=PEAK_LR / 10),
        schedules.swa_anneal(PEAK_LR / 10, swa_lr, anneal_steps=anneal_steps),
    ], [main_steps])
    model = setting.model()
    optimizer = fastdescent.SGD(model.params, lr=PEAK_LR, momentum=MOMENTUM, backend=backend)
    scheduler = fastdescent.Scheduler(optimizer, schedule)
    swa = fastdescent.SWA(optimizer, start=min(T, main_steps + anneal_steps), every=spe)
    ema = fastdescent.EMA(optimizer, decay=0.995, warmup=True)
    scores = {"swa": [], "ema": []}
    x_test, y_test = setting.held_out

    def after_step(step, loss):
        scheduler.step()
        swa.step()
        ema.step()

    def after_epoch(epoch, history):
        for name, average in (("swa", swa), ("ema", ema)):
            if average.n_averaged:
                with average.swapped():
                    scores[name].append((epoch, model.loss(x_test, y_test), model.accuracy(x_test, y_test)))
        return False

    history = train_epochs(model, optimizer, setting.batches(), setting.epochs, setting.held_out,
                           after_step=after_step, after_epoch=after_epoch, progress=progress,
                           label=f"SWA and EMA [{backend}]")
    return {"model": model, "swa": swa, "ema": ema, "history": history, "scores": scores,
            "schedule": schedule, "swa_start": swa.start, "swa_lr": swa_lr}


def loss_along_line(model, start, end, alphas, data):
    """Training and held-out loss at ``start + alpha * (end - start)`` for each alpha."""
    saved = [p.copy() for p in model.params]
    out = {"train": [], "held_out": []}
    for alpha in alphas:
        for p, a, b in zip(model.params, start, end):
            np.copyto(p, a + alpha * (b - a))
        out["train"].append(model.loss(data.x_train, data.y_train))
        out["held_out"].append(model.loss(data.x_test, data.y_test))
    for p, s in zip(model.params, saved):
        np.copyto(p, s)
    return out


def weight_averaging(setting, progress):
    kernel = averaged_run(setting, "kernel", progress)
    with default_backend("reference"):
        reference = averaged_run(setting, "reference", progress)
    data, model = setting.data, kernel["model"]
    final = [p.copy() for p in model.params]
    rows, evaluated = [], {}
    for label, weights in (("final weights", final), (f"SWA ({kernel['swa'].n_averaged} snapshots)",
                                                      kernel["swa"].averages),
                           (f"EMA (decay {kernel['ema'].decay:g})", kernel["ema"].averages)):
        for p, w in zip(model.params, weights):
            np.copyto(p, w)
        evaluated[label] = (model.loss(data.x_test, data.y_test), model.accuracy(data.x_test, data.y_test))
        rows.append([label, f"{model.loss(data.x_train, data.y_train):.4f}", f"{evaluated[label][0]:.4f}",
                     _percent(evaluated[label][1])])
    for p, w in zip(model.params, final):
        np.copyto(p, w)
    alphas = np.linspace(-1.0, 2.0, 31)
    line = loss_along_line(model, final, kernel["swa"].averages, alphas, data)
    print()
    print(table(rows, ["weights", "train loss", "held-out loss", "held-out acc"], "<>>>"))
    print(f"(SGD, momentum {MOMENTUM:g}: cosine from {PEAK_LR:g} for {setting.epochs // 2} epochs, swa_anneal to"
          f" {kernel['swa_lr']:g} over one epoch, then SWA of each epoch's last weights; EMA of every step)")
    difference = max(
        max_difference(kernel["model"].params, reference["model"].params),
        max_difference(kernel["swa"].averages, reference["swa"].averages),
        max_difference(kernel["ema"].averages, reference["ema"].averages),
    )
    print(f"\nThe same run with the NumPy reference backend (optimizer, SWA and EMA): largest difference of any"
          f" parameter or average = {difference:.3g}")
    return {"kernel": kernel, "evaluated": evaluated, "alphas": alphas, "line": line, "difference": difference}


# ---------------------------------------------------------------- the section

def run_section(args, parts):
    """Run the selected ``parts`` (names from ``PARTS``); returns their results by name."""
    print("\n== 3. Schedules, batch sizes and averaging (digits MLP, kernel backend) ==")
    data = digits_or_none(args.seed)
    if data is None:
        return {}
    setting = Setting(data, list(args.hidden), args.epochs, args.batch_size, args.seed)
    progress = Progress()
    steps = {
        "batch-size": ("3a. Batch size: full batch, mini-batches, single samples", batch_sizes),
        "schedules": ("3b. Learning-rate schedules for SGD with momentum", learning_rate_schedules),
        "momentum": ("3c. Momentum annealed from 0.5 to 0.9, against a fixed 0.9", momentum_annealing),
        "plateau": ("3d. Reduce the rate on a plateau, stop early, restore the best weights",
                    plateau_and_early_stopping),
        "averaging": ("3e. Weight averaging: SWA and EMA against the final weights", weight_averaging),
    }
    results = {}
    for name in PARTS:
        if name in parts:
            title, part = steps[name]
            print(f"\n-- {title}\n")
            results[name] = part(setting, progress)
    return results


__all__ = ["PARTS", "Setting", "run_section", "schedule_catalog"]
