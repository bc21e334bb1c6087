"""Pictures for the demo: optimizer paths over contour plots, training-loss curves.

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
    optimizer. ``histories`` maps a label to ``{"loss": [...], "held_out": [...]}``."""
    figure = _figure(11.0, 4.6)
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    for color, (label, history) in zip(_colors(len(histories)), histories.items()):
        epochs = np.arange(1, len(history["loss"]) + 1)
        loss_axes.plot(epochs, history["loss"], "-o", ms=3, color=color, label=label)
        accuracy_axes.plot(epochs, 100 * np.asarray(history["held_out"]), "-o", ms=3, color=color, label=label)
    loss_axes.set(yscale="log", xlabel="epoch", ylabel="mean training loss (cross-entropy)",
                  title="training loss")
    accuracy_axes.set(xlabel="epoch", ylabel="held-out accuracy (%)", title="held-out accuracy")
    from matplotlib.ticker import MaxNLocator

    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    accuracy_axes.legend(fontsize=8, loc="lower right")
    figure.suptitle(title)
    figure.savefig(filename)


def _colors(n):
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]
