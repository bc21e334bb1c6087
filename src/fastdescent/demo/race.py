"""Section 1 of the demo: every optimizer and Newton's method on classic loss surfaces.

From each surface's start, every method runs until the gradient norm reaches
``TOLERANCE`` or its step budget runs out; the table gives the steps taken, the
final loss and point, and on the saddles whether it got away. A last check shows
that Nesterov's method with the gradient at the look-ahead point and the kernels'
look-ahead-free form trace the same path.
"""

from dataclasses import dataclass

import numpy as np

from .console import Progress, table
from .contenders import CONTENDERS, make_optimizer
from .newton import lookahead_nesterov, newton
from .surfaces import SURFACES
from .trajectory import run_trajectory

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
    larger). Sign methods (Lion) move every coordinate by exactly ``lr``, so
    they walk a lattice of spacing ``lr`` from the start: they reach the tolerance
    only where a minimum lies on it, and otherwise circle it at about ``lr``.
    Each was picked from a sweep over powers of about 3 as one that reaches the
    tolerance on that surface if any does, without tuning further.
    """

    lr: dict
    max_steps: int = 3000


RACES = {
    "ravine": Race({"sgd": 0.019, "momentum": 0.01, "adagrad": 1.0, "adaptive": 0.1, "sign": 0.01}),
    "rosenbrock": Race({"sgd": 2e-3, "momentum": 1e-3, "adagrad": 1.0, "adaptive": 0.03, "sign": 0.01},
                       max_steps=5000),
    "beale": Race({"sgd": 0.03, "momentum": 3e-3, "adagrad": 1.0, "adaptive": 0.1, "sign": 0.01}),
    "himmelblau": Race({"sgd": 0.01, "momentum": 3e-3, "adagrad": 0.5, "adaptive": 0.1, "sign": 0.01}),
    "saddle": Race({"sgd": 0.01, "momentum": 0.01, "adagrad": 0.1, "adaptive": 0.01, "sign": 0.01}, max_steps=1000),
    "monkey_saddle": Race({"sgd": 0.01, "momentum": 0.01, "adagrad": 0.1, "adaptive": 0.01, "sign": 0.01},
                          max_steps=1000),
    "rastrigin": Race({"sgd": 3e-3, "momentum": 3e-3, "adagrad": 0.1, "adaptive": 0.01, "sign": 0.01}),
}


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
    print(table(rows, headers, "<<>>><<"))
    if "adamw" in methods:
        print("adamw's decoupled weight decay (0.01) pulls towards the origin: its fixed point is not f's minimum.")
    if "lion" in methods:
        print("lion moves every coordinate by exactly lr: it reaches a minimum only if the minimum lies on its lattice"
              " of spacing lr from the start.")
    if any(name.startswith("schedule_free") for name in methods):
        print("schedule_free_*: the averaged iterate x lags ever more behind z at a fixed rate, so y (shown here, where"
              " gradients are taken) slows down near a minimum or a saddle.")
    if "nesterov" in methods:
        steps, deviation = nesterov_check(args)
        print(f"\nNesterov with the gradient at the look-ahead point w + mu*v and the kernels' look-ahead-free"
              f" form\ntrace the same path on the ravine: largest difference over {steps} steps = {deviation:.2g}")
    return results
