"""``python -m fastdescent demo``: the optimizers on loss surfaces and on a real model.

1. A race on classic loss surfaces (a ravine, Rosenbrock, Beale, Himmelblau, two
   saddles, Rastrigin): every optimizer and Newton's method from the same start;
   steps to reach the gradient tolerance, final loss, whether it left the saddle.
2. A small NumPy MLP trained on scikit-learn's bundled handwritten digits (no
   download) with every optimizer, once with the kernel backend and once with the
   NumPy reference: accuracies, optimizer time per step in each mode, and the
   largest parameter difference between the two runs (0: the backends agree bit
   for bit).
3. With matplotlib, PNG pictures of both in an output folder.

``add_arguments(parser)`` declares the options and ``run(args)`` runs the demo.
"""

import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

import fastdescent

from . import plots
from .data import MiniBatches
from .mlp import MLP
from .newton import lookahead_nesterov, newton
from .rules import SPECS
from .surfaces import SURFACES
from .trajectory import run_trajectory

INSTALL_HINT = 'pip install "fastdescent[demo]"  (matplotlib and scikit-learn)'


@dataclass(frozen=True)
class Contender:
    """A first-order optimizer configuration raced in the demo."""

    name: str
    #: the optimizer class, an attribute of ``fastdescent``
    class_name: str
    #: hyperparameters besides the learning rate
    hyper: dict = field(default_factory=dict)
    #: which learning rate it takes on the surfaces (a key of ``Race.lr``)
    family: str = "sgd"
    #: learning rate for the MLP
    mlp_lr: float = 0.1


#: The rules' examples marked for the demo (``Example.demo``), in the order of their papers.
CONTENDERS = {
    example.name: Contender(example.name, spec.title, {k: v for k, v in example.options.items() if k != "lr"},
                            *example.demo)
    for spec in SPECS.values() for example in spec.examples if example.demo is not None
}
#: everything ``--optimizers`` accepts; Newton runs on the surfaces only
METHODS = (*CONTENDERS, "newton")
#: a race is won when the gradient norm falls to this
TOLERANCE = 1e-6


@dataclass(frozen=True)
class Race:
    """Per-surface settings: a learning rate per optimizer family, and a step budget.

    Plain and momentum SGD take steps proportional to the gradient, so their
    rates are set by the curvature (plain SGD is stable below 2 / the largest
    Hessian eigenvalue, momentum 0.9 needs about half of that for Nesterov);
    adaptive methods step about ``lr`` per coordinate, so theirs are set by the
    size of the window (Adagrad's steps shrink as its sums grow, so it starts
    larger). Each was picked from a sweep over powers of about 3 as one that
    reaches the tolerance on that surface if any does, without tuning further.
    """

    lr: dict
    max_steps: int = 3000


RACES = {
    "ravine": Race({"sgd": 0.019, "momentum": 0.01, "adagrad": 1.0, "adaptive": 0.1}),
    "rosenbrock": Race({"sgd": 2e-3, "momentum": 1e-3, "adagrad": 1.0, "adaptive": 0.03}, max_steps=5000),
    "beale": Race({"sgd": 0.03, "momentum": 3e-3, "adagrad": 1.0, "adaptive": 0.1}),
    "himmelblau": Race({"sgd": 0.01, "momentum": 3e-3, "adagrad": 0.5, "adaptive": 0.1}),
    "saddle": Race({"sgd": 0.01, "momentum": 0.01, "adagrad": 0.1, "adaptive": 0.01}, max_steps=1000),
    "monkey_saddle": Race({"sgd": 0.01, "momentum": 0.01, "adagrad": 0.1, "adaptive": 0.01}, max_steps=1000),
    "rastrigin": Race({"sgd": 3e-3, "momentum": 3e-3, "adagrad": 0.1, "adaptive": 0.01}),
}


def make_optimizer(contender, params, lr, backend="kernel", n_threads=None):
    """A ``fastdescent`` optimizer for ``contender`` over ``params``."""
    cls = getattr(fastdescent, contender.class_name)
    return cls(params, lr=lr, backend=backend, n_threads=n_threads, **contender.hyper)


# ---------------------------------------------------------------- output helpers

class Progress:
    """A progress bar redrawn in place on a terminal; one line per finished task otherwise."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.live = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, label, done, total, note=""):
        if self.live:
            filled = round(20 * done / total) if total else 20
            self.stream.write(f"\r  {label:<22} [{'#' * filled}{'.' * (20 - filled)}] {done}/{total} {note}")
            if done == total:
                self.stream.write("\n")
            self.stream.flush()
        elif done == total:
            print(f"  {label:<22} done: {note}", file=self.stream, flush=True)


def _table(rows, headers, aligns):
    """Rows of strings as a fixed-width table; ``aligns`` is a string of '<'/'>'."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(f"{h:{a}{w}}" for h, a, w in zip(headers, aligns, widths))
    out = [line, "-" * len(line)]
    out += ["  ".join(f"{c:{a}{w}}" for c, a, w in zip(r, aligns, widths)) for r in rows]
    return "\n".join(line.rstrip() for line in out)


# ---------------------------------------------------------------- 1. surfaces

def race_surface(surface, methods, args):
    """Run every method on ``surface`` from its start; returns the trajectories."""
    race = RACES[surface.name]
    max_steps = race.max_steps if args.max_steps is None else args.max_steps
    # generous box: escaping a saddle ends the run there, and so does blowing up
    bounds = [(lo - (hi - lo), hi + (hi - lo)) for lo, hi in surface.window]
    runs = []
    for name in methods:
        if name == "newton":
            runs.append(newton(surface, tol=TOLERANCE, max_steps=min(max_steps, 200), bounds=bounds))
            continue
        contender = CONTENDERS[name]
        lr = race.lr[contender.family]
        runs.append(run_trajectory(
            surface, lambda params, c=contender, lr=lr: make_optimizer(c, params, lr),
            tol=TOLERANCE, max_steps=max_steps, bounds=bounds, label=name))
    return runs


def _race_rows(surface, runs):
    rows = []
    for run in runs:
        escaped = run.escaped(surface)
        steps = f"{run.steps}" if run.converged else f"({run.steps})"
        note = run.stop + (f", {run.fallbacks} gradient fallbacks" if run.fallbacks else "")
        x, y = run.final_point[:2]
        rows.append([surface.name if not rows else "", run.label, steps, f"{run.final_value:.3g}",
                     f"({x:.3g}, {y:.3g})", {None: "", True: "yes", False: "no"}[escaped], note])
    return rows


def nesterov_check(args):
    """Look-ahead Nesterov vs the kernels' look-ahead-free form on the ravine."""
    surface = SURFACES["ravine"]
    lr = RACES["ravine"].lr["momentum"]
    steps = 200 if args.max_steps is None else min(args.max_steps, 200)
    lookahead = lookahead_nesterov(surface, lr=lr, momentum=0.9, tol=0.0, max_steps=steps)
    kernel = run_trajectory(surface, lambda params: make_optimizer(CONTENDERS["nesterov"], params, lr),
                            tol=0.0, max_steps=steps)
    deviation = np.max(np.abs(lookahead.extras["lookahead"] - kernel.path))
    return steps, deviation


def race(args, methods):
    names = args.surfaces
    print(f"\n== 1. The race on loss surfaces ({len(names)} surfaces, {len(methods)} methods) ==")
    print(f"steps to reach |grad| <= {TOLERANCE:g} (in parentheses: stopped without reaching it), loss and point"
          " where the run ended, and for the saddles whether it got away.\n")
    headers = ["surface", "method", "steps", "final loss", "final point", "escaped", "stop"]
    results, rows = {}, []
    progress = Progress()
    for i, name in enumerate(names, 1):
        surface = SURFACES[name]
        results[name] = race_surface(surface, methods, args)
        rows += _race_rows(surface, results[name])
        progress.update("racing", i, len(names), name)
    print()
    print(_table(rows, headers, "<<>>><<"))
    if "adamw" in methods:
        print("adamw's decoupled weight decay (0.01) pulls towards the origin: its fixed point is not f's minimum.")
    if "nesterov" in methods:
        steps, deviation = nesterov_check(args)
        print(f"\nNesterov with the gradient at the look-ahead point w + mu*v and the kernels' look-ahead-free"
              f" form\ntrace the same path on the ravine: largest difference over {steps} steps = {deviation:.2g}")
    return results


# ---------------------------------------------------------------- 2. the MLP

def load_digits_split(seed):
    """scikit-learn's 8x8 digits, pixels scaled to [0, 1], split 75/25 stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    return train_test_split(x, digits.target, test_size=0.25, stratify=digits.target, random_state=seed)


def train_once(contender, backend, data, args, progress):
    """Train a fresh MLP (same seed every time) with one optimizer and backend."""
    x_train, x_test, y_train, y_test = data
    model = MLP([x_train.shape[1], *args.hidden, 10], activation="relu", dtype=np.float32, seed=args.seed)
    optimizer = make_optimizer(contender, model.params, contender.mlp_lr, backend=backend)
    batches = MiniBatches(x_train, y_train, batch_size=args.batch_size, seed=args.seed)
    history = {"loss": [], "held_out": []}
    step_seconds = []
    label = f"{contender.name} [{backend}]"
    for epoch in range(1, args.epochs + 1):
        losses = []
        for xb, yb in batches:
            loss, grads = model.loss_and_gradients(xb, yb)
            start = time.perf_counter()
            optimizer.step(grads)
            step_seconds.append(time.perf_counter() - start)
            losses.append(loss)
        history["loss"].append(float(np.mean(losses)))
        history["held_out"].append(model.accuracy(x_test, y_test))
        progress.update(label, epoch, args.epochs,
                        f"loss {history['loss'][-1]:.4f}  held-out {100 * history['held_out'][-1]:.1f}%")
    return {
        "model": model,
        "history": history,
        # the median resists the pauses of a shared machine better than the mean
        "seconds_per_step": float(np.median(step_seconds)) if step_seconds else float("nan"),
        "train_accuracy": model.accuracy(x_train, y_train),
        "held_out_accuracy": history["held_out"][-1] if history["held_out"] else model.accuracy(x_test, y_test),
    }


def train(args, contenders):
    print("\n== 2. A multilayer perceptron on handwritten digits, kernel vs reference ==")
    try:
        data = load_digits_split(args.seed)
    except ImportError:
        print(f"scikit-learn is not installed, so there is no dataset: skipping the training.\n"
              f"To run it: {INSTALL_HINT}")
        return None
    x_train, x_test = data[0], data[1]
    sizes = [x_train.shape[1], *args.hidden, 10]
    model = MLP(sizes)
    print(f"scikit-learn's bundled digits: {len(x_train)} training and {len(x_test)} held-out 8x8 images;"
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
        pairs = zip(kernel["model"].params, reference["model"].params)
        difference = max(float(np.max(np.abs(p - q))) for p, q in pairs)
        rows.append([name, f"{CONTENDERS[name].mlp_lr:g}", f"{100 * kernel['train_accuracy']:.1f}%",
                     f"{100 * kernel['held_out_accuracy']:.1f}%",
                     f"{1e6 * kernel['seconds_per_step']:.1f}", f"{1e6 * reference['seconds_per_step']:.1f}",
                     f"{reference['seconds_per_step'] / kernel['seconds_per_step']:.1f}x", f"{difference:.3g}"])
    print()
    print(_table(rows, headers, "<>>>>>>>"))
    print("(accuracies after the kernel run; us/step = median wall time of one optimizer.step;"
          " param diff = kernel run vs reference run)")
    return results


# ---------------------------------------------------------------- 3. pictures

def draw(args, race_results, training_results):
    if not plots.matplotlib_available():
        print(f"\nmatplotlib is not installed, so no pictures were drawn. To get them: {INSTALL_HINT}")
        return []
    os.makedirs(args.output, exist_ok=True)
    written = []
    for name, runs in (race_results or {}).items():
        filename = os.path.join(args.output, f"surface_{name}.png")
        plots.plot_paths(SURFACES[name], runs, filename)
        written.append(filename)
    if training_results:
        filename = os.path.join(args.output, "training_loss.png")
        plots.plot_training({name: runs["kernel"]["history"] for name, runs in training_results.items()}, filename)
        written.append(filename)
    print(f"\n== 3. Pictures: {len(written)} PNG files in {os.path.abspath(args.output)} ==")
    for filename in written:
        print(f"  {os.path.basename(filename)}")
    return written


# ---------------------------------------------------------------- command line

def add_arguments(parser):
    """Declare the demo's options on an ``argparse`` (sub)parser."""
    parser.add_argument("--output", default="fastdescent-demo",
                        help="folder for the PNG pictures (default: ./fastdescent-demo)")
    parser.add_argument("--optimizers", nargs="+", choices=METHODS, default=list(METHODS), metavar="NAME",
                        help=f"methods to run, from: {' '.join(METHODS)} "
                             "(default: all; newton runs on the surfaces only)")
    parser.add_argument("--surfaces", nargs="+", choices=list(SURFACES), default=list(SURFACES), metavar="NAME",
                        help=f"surfaces to race on, from: {' '.join(SURFACES)} (default: all)")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs per optimizer and backend (default 20)")
    parser.add_argument("--batch-size", type=int, default=32, help="mini-batch size (default 32)")
    parser.add_argument("--hidden", type=int, nargs="+", default=[128], metavar="WIDTH",
                        help="hidden layer widths of the MLP (default: 128)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="step budget per run on the surfaces (default: per surface, 1000-3000)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the data split, initialization and batches")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for the optimizer kernels (default: all usable cores)")
    return parser


def run(args):
    """Run the demo with parsed ``args`` (see :func:`add_arguments`); returns 0."""
    if args.epochs < 0 or args.batch_size <= 0 or (args.max_steps is not None and args.max_steps < 0):
        raise SystemExit("--epochs and --max-steps must be >= 0 and --batch-size > 0")
    methods = list(dict.fromkeys(args.optimizers))
    contenders = [CONTENDERS[m] for m in methods if m in CONTENDERS]
    started = time.perf_counter()
    with fastdescent.num_threads(args.threads):
        print(f"fastdescent {fastdescent.__version__} demo: kernels '{_variant()}', "
              f"{fastdescent.get_num_threads()} thread(s), seed {args.seed}")
        race_results = race(args, methods) if args.surfaces and methods else {}
        training_results = train(args, contenders) if contenders and args.epochs > 0 else None
        draw(args, race_results, training_results)
    print(f"\ndemo finished in {time.perf_counter() - started:.1f} s")
    return 0


def _variant():
    from ._dispatch import variant

    return variant
