"""Pictures for the demo: optimizer paths over contour plots, training curves, schedules, averages.

matplotlib is optional (the ``demo`` extra) and imported only when a picture is
drawn. Figures are built on matplotlib's ``Figure`` with the Agg canvas, never
through ``pyplot``, so no window opens and no global backend is changed.
"""

import numpy as np


def matplotlib_available():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(width, height):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_paths(surface, trajectories, filename, title=None):
    """Contours of a 2-D ``surface`` over its window, each trajectory's path on
    top (start marked with a dot, end with a cross), known minima as stars and
    saddle points as diamonds. Writes a PNG to ``filename``."""
    figure = _figure(10.0, 6.2)
    axes = figure.add_subplot()
    xs, ys, z = surface.grid(200)
    if surface.minimum_value is not None:
        # log-spaced levels: valleys such as Rosenbrock's span orders of magnitude
        shifted = z - surface.minimum_value + 1e-3
        levels = np.geomspace(shifted.min(), shifted.max(), 30)
        axes.contourf(xs, ys, shifted, levels=levels, norm="log", cmap="viridis", alpha=0.85)
        axes.contour(xs, ys, shifted, levels=levels, norm="log", colors="white", linewidths=0.3, alpha=0.5)
    else:
        axes.contourf(xs, ys, z, levels=30, cmap="viridis", alpha=0.85)
        axes.contour(xs, ys, z, levels=30, colors="white", linewidths=0.3, alpha=0.5)
        # the level of the saddle: below it lies the way out
        axes.contour(xs, ys, z, levels=np.unique(surface.value(surface.saddles)), colors="black",
                     linewidths=0.8, linestyles="--")
    colors = _colors(len(trajectories))
    # earlier paths drawn wider, so a path that another one retraces still shows
    widths = np.linspace(3.2, 1.2, len(trajectories)) if len(trajectories) > 1 else [1.6]
    for color, width, run in zip(colors, widths, trajectories):
        path = run.path
        axes.plot(path[:, 0], path[:, 1], "-", color=color, lw=width, label=f"{run.label} ({run.steps} steps)")
        axes.plot(*path[0, :2], "o", color=color, ms=5)
        axes.plot(*path[-1, :2], "x", color=color, ms=8, mew=2)
    if len(surface.minima):
        axes.plot(surface.minima[:, 0], surface.minima[:, 1], "*", color="gold", mec="black", ms=15,
                  label="minimum" if len(surface.minima) == 1 else "minima", zorder=5)
    if len(surface.saddles):
        axes.plot(surface.saddles[:, 0], surface.saddles[:, 1], "D", color="white", mec="black", ms=8,
                  label="saddle", zorder=5)
    (x0, x1), (y0, y1) = surface.window
    axes.set(xlim=(x0, x1), ylim=(y0, y1), xlabel="x", ylabel="y",
             title=title or f"{surface.name}: {surface.description}")
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, framealpha=0.9)
    figure.savefig(filename)


def plot_training(histories, filename, title="MLP on scikit-learn's digits"):
    """Training loss per epoch (log scale) and held-out accuracy, one line per
    optimizer. ``histories`` maps a label to a :class:`~fastdescent.demo.training.History`."""
    figure = _figure(11.0, 4.6)
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    for color, (label, history) in zip(_colors(len(histories)), histories.items()):
        epochs = _epochs(history)
        loss_axes.plot(epochs, history.train_loss, "-o", ms=3, color=color, label=label)
        accuracy_axes.plot(epochs, 100 * np.asarray(history.held_out_accuracy), "-o", ms=3, color=color,
                           label=label)
    loss_axes.set(yscale="log", xlabel="epoch", ylabel="mean training loss (cross-entropy)",
                  title="training loss")
    accuracy_axes.set(xlabel="epoch", ylabel="held-out accuracy (%)", title="held-out accuracy")
    _finish(loss_axes, accuracy_axes)
    accuracy_axes.legend(fontsize=8, loc="lower right")
    figure.suptitle(title)
    figure.savefig(filename)


def plot_batch_sizes(runs, filename):
    """The loss on the whole training set as training goes, per batch size: against
    epochs and against wall time (log-log: single samples take far longer per epoch)."""
    figure = _figure(12.0, 4.8)
    epoch_axes, time_axes = figure.subplots(1, 2)
    for color, (label, run) in zip(_colors(len(runs)), runs.items()):
        steps, seconds, losses = np.array(run["history"].trace).T
        epochs = steps / run["steps_per_epoch"]
        per_epoch = 1e3 * np.median(run["history"].epoch_seconds)
        style = dict(color=color, lw=0.9 if run["batch_size"] == 1 else 1.6)
        epoch_axes.plot(epochs, losses, "-", label=f"{label} ({run['steps_per_epoch']} steps/epoch)", **style)
        time_axes.plot(seconds[1:], losses[1:], "-", label=f"{label} ({per_epoch:.1f} ms/epoch)", **style)
    epoch_axes.set(yscale="log", xlabel="epoch", ylabel="loss on the whole training set",
                   title="the same number of epochs")
    time_axes.set(xscale="log", yscale="log", xlabel="training time (s, log scale)",
                  ylabel="loss on the whole training set", title="against wall time")
    _finish(epoch_axes, time_axes)
    epoch_axes.legend(fontsize=8)
    time_axes.legend(fontsize=8)
    figure.suptitle("Plain SGD with one batch, mini-batches and single samples: fewer, exact steps or "
                    "many noisy ones")
    figure.savefig(filename)


def plot_schedules(runs, filename):
    """Each learning-rate schedule's curve over the run, one small panel each."""
    n = len(runs)
    columns = 4
    rows = -(-n // columns)
    figure = _figure(3.2 * columns, 2.5 * rows)
    axes_grid = figure.subplots(rows, columns, sharex=True, sharey=True, squeeze=False)
    for axes, color, (label, run) in zip(axes_grid.flat, _colors(n), runs.items()):
        _schedule_curve(axes, run, color=color, lw=1.6)
        axes.set_title(f"{label}\n{run['schedule'].name}", fontsize=9)
        axes.grid(alpha=0.3)
    for axes in axes_grid[-1]:
        axes.set_xlabel("epoch")
    for axes in axes_grid[:, 0]:
        axes.set_ylabel("learning rate")
    for axes in list(axes_grid.flat)[n:]:
        axes.set_visible(False)
    figure.suptitle("Learning-rate schedules (fastdescent.schedules), stepped once per update")
    figure.savefig(filename)


def plot_schedule_runs(runs, filename):
    """Held-out accuracy and loss per epoch of SGD with momentum under each schedule."""
    figure = _figure(12.0, 4.8)
    accuracy_axes, loss_axes = figure.subplots(1, 2)
    for color, (label, run) in zip(_colors(len(runs)), runs.items()):
        history = run["history"]
        epochs = _epochs(history)
        accuracy_axes.plot(epochs, 100 * np.asarray(history.held_out_accuracy), "-o", ms=2.5, color=color,
                           label=label)
        loss_axes.plot(epochs, history.held_out_loss, "-o", ms=2.5, color=color, label=label)
    accuracy_axes.set(xlabel="epoch", ylabel="held-out accuracy (%)", title="held-out accuracy")
    loss_axes.set(yscale="log", xlabel="epoch", ylabel="held-out loss (cross-entropy)", title="held-out loss")
    low = min(min(run["history"].held_out_accuracy) for run in runs.values())
    accuracy_axes.set_ylim(max(100 * low - 1, 80), 100)
    _finish(accuracy_axes, loss_axes)
    loss_axes.legend(fontsize=8, ncol=2)
    figure.suptitle("SGD with momentum under each learning-rate schedule")
    figure.savefig(filename)


def plot_momentum(runs, filename):
    """The momentum coefficient over the run, and the training loss of each run."""
    figure = _figure(12.0, 4.4)
    momentum_axes, loss_axes = figure.subplots(1, 2)
    for color, (label, run) in zip(_colors(len(runs)), runs.items()):
        history = run["history"]
        _schedule_curve(momentum_axes, run, color=color, lw=1.8, label=label)
        loss_axes.plot(_epochs(history), history.train_loss, "-o", ms=3, color=color, label=f"{label}: training")
        loss_axes.plot(_epochs(history), history.held_out_loss, "--", color=color, label=f"{label}: held-out")
    momentum_axes.set(xlabel="epoch", ylabel="momentum coefficient", title="momentum", ylim=(0.4, 1.0))
    loss_axes.set(yscale="log", xlabel="epoch", ylabel="loss (cross-entropy)", title="loss per epoch")
    _finish(momentum_axes, loss_axes)
    momentum_axes.legend(fontsize=8, loc="lower right")
    loss_axes.legend(fontsize=8)
    figure.suptitle("Annealing the momentum from 0.5 to 0.9 against a fixed 0.9 (SGD)")
    figure.savefig(filename)


def plot_plateau(result, filename):
    """Training and validation loss per epoch, the learning rate (log), the
    reductions, the best epoch whose weights were restored and the stop."""
    history = result["history"]
    figure = _figure(11.0, 4.8)
    loss_axes = figure.add_subplot()
    epochs = _epochs(history)
    loss_axes.plot(epochs, history.train_loss, "-o", ms=3, color="tab:blue", label="training loss")
    loss_axes.plot(epochs, history.held_out_loss, "-o", ms=3, color="tab:orange", label="validation loss")
    loss_axes.axvline(result["best_epoch"], color="tab:green", ls="--",
                      label=f"best validation loss: epoch {result['best_epoch']} (restored)")
    if result["stopped"]:
        loss_axes.axvline(history.epochs, color="black", ls=":", label=f"stopped after epoch {history.epochs}")
    loss_axes.set(yscale="log", xlabel="epoch", ylabel="loss (cross-entropy)",
                  title="ReduceLROnPlateau and EarlyStopping(restore_best=True) on the validation loss")
    lr_axes = loss_axes.twinx()
    # history.lr[e - 1], recorded before the plateau decides, is the rate of epoch e: draw it over (e - 1, e]
    lr_axes.step(np.concatenate([[0], epochs]), [*history.lr, history.lr[-1]], where="post", color="tab:red",
                 lw=1.5, label="learning rate (right; triangles: reductions)")
    for epoch, _old, new in result["reductions"]:
        lr_axes.plot(epoch, new, "v", color="tab:red", ms=7)
    lr_axes.set(yscale="log", ylabel="learning rate")
    _finish(loss_axes)
    handles = loss_axes.get_legend_handles_labels()
    more = lr_axes.get_legend_handles_labels()
    loss_axes.legend(handles[0] + more[0], handles[1] + more[1], fontsize=8, loc="upper right")
    figure.savefig(filename)


def plot_averaging(result, filename):
    """Held-out accuracy per epoch of the running, SWA and EMA weights; and the loss
    along the line from the final weights through the SWA average."""
    kernel = result["kernel"]
    history = kernel["history"]
    figure = _figure(12.0, 4.8)
    accuracy_axes, line_axes = figure.subplots(1, 2)
    accuracy_axes.plot(_epochs(history), 100 * np.asarray(history.held_out_accuracy), "-o", ms=3,
                       color="tab:blue", label="the weights being trained")
    for name, color in (("swa", "tab:red"), ("ema", "tab:green")):
        if kernel["scores"][name]:
            epochs, _losses, accuracies = np.array(kernel["scores"][name]).T
            accuracy_axes.plot(epochs, 100 * accuracies, "-s", ms=3, color=color, label=f"{name.upper()} average")
    swa_epoch = kernel["swa_start"] / (len(history.step_seconds) / history.epochs)
    accuracy_axes.axvline(swa_epoch, color="gray", ls=":", label="SWA starts")
    low = min(history.held_out_accuracy[len(history.held_out_accuracy) // 4:], default=0.9)
    accuracy_axes.set(xlabel="epoch", ylabel="held-out accuracy (%)", title="held-out accuracy",
                      ylim=(max(100 * low - 1, 80), 100))
    alphas = result["alphas"]
    line_axes.plot(alphas, result["line"]["train"], color="tab:blue", label="training loss")
    line_axes.plot(alphas, result["line"]["held_out"], color="tab:orange", label="held-out loss")
    for alpha, label, marker in ((0.0, "final weights", "o"), (1.0, "SWA average", "*")):
        i = int(np.argmin(np.abs(alphas - alpha)))
        line_axes.plot(alpha, result["line"]["held_out"][i], marker, color="black", ms=9, label=label)
    line_axes.set(yscale="log", xlabel=r"$\alpha$ in $\theta_{final} + \alpha(\theta_{SWA} - \theta_{final})$",
                  ylabel="loss (cross-entropy)", title="the loss along the line through both")
    _finish(accuracy_axes, line_axes)
    accuracy_axes.legend(fontsize=8, loc="lower right")
    line_axes.legend(fontsize=8)
    figure.suptitle("Stochastic weight averaging and an exponential moving average against the final weights")
    figure.savefig(filename)


def plot_precision_mlp(results, filename):
    """Held-out accuracy of each optimizer with its state in every storage
    (grouped bars), from the demo's low-precision section."""
    figure = _figure(12.0, 5.0)
    axes = figure.add_subplot()
    names = [name for name, runs in results.items() if not any("refused" in r for r in runs.values())]
    labels = list(next(iter(results.values())))
    width = 0.8 / len(labels)
    for k, (color, label) in enumerate(zip(_colors(len(labels)), labels)):
        values = [100 * results[name][label].get("accuracy", np.nan) for name in names]
        axes.bar(np.arange(len(names)) + (k - (len(labels) - 1) / 2) * width, values, width, color=color,
                 label=label)
    finite = [100 * r.get("accuracy") for runs in results.values() for r in runs.values() if "accuracy" in r]
    axes.set(xticks=np.arange(len(names)), ylabel="held-out accuracy (%)",
             ylim=(max(0.0, min(finite) - 2.0), min(100.0, max(finite) + 1.0)))
    figure.suptitle("the digits MLP with the optimizer's state in float32, bfloat16 and int8")
    axes.set_xticklabels(names, rotation=20, ha="right")
    axes.grid(alpha=0.3, axis="y")
    axes.legend(fontsize=8, ncol=len(labels), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    figure.savefig(filename)


def plot_precision_long(results, filename):
    """The objective along the long runs (log scale): Adam on the ill-conditioned
    quadratic, SGD at a tiny rate, per parameter/state storage."""
    figure = _figure(12.0, 4.8)
    titles = {"adam": "Adam, ill-conditioned quadratic", "sgd": "SGD at a tiny learning rate"}
    labels = list(dict.fromkeys(label for runs in results.values() for label in runs))
    colors = dict(zip(labels, _colors(len(labels))))  # one colour per storage in both panels
    for axes, (rule, runs) in zip(figure.subplots(1, 2), results.items()):
        for label, (steps, values) in runs.items():
            color = colors[label]
            axes.plot(steps, values, color=color, lw=2.4 if label == "float32" else 1.4, label=label,
                      ls="--" if "state" in label else "-")
        axes.set(yscale="log", xlabel="step", ylabel="f(x)", title=titles[rule])
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle("bfloat16 parameters: round to nearest stalls; stochastic rounding and a float32 master "
                    "copy follow float32")
    figure.savefig(filename)


def _schedule_curve(axes, run, **style):
    """A run's schedule at every step it took, against epochs."""
    history = run["history"]
    steps = np.arange(len(history.step_seconds) + 1)
    axes.plot(steps / (len(history.step_seconds) / history.epochs), run["schedule"](steps), **style)


def _epochs(history):
    return np.arange(1, history.epochs + 1)


def _finish(*axes_list):
    """Grid and integer epoch ticks on the x axis."""
    from matplotlib.ticker import MaxNLocator

    for axes in axes_list:
        axes.grid(alpha=0.3)
        if axes.get_xscale() == "linear":
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))


def _colors(n):
    """``n`` distinct colours (up to 20: beyond ten methods, tab20's lighter shades join)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]
