r"""Section 4 of the demo: optimizer state and parameters in 16 and 8 bits.

* **State**: the digits MLP trained by every contender with its state in float32,
  bfloat16 and int8 (:mod:`fastdescent.precision`), rounded to nearest and
  stochastically: held-out accuracy and the state's bytes per parameter.
* **Long runs** where rounding decides, :math:`10^4` steps each on
  :math:`f(x) = \frac12 \sum_i \lambda_i x_i^2`:

  - Adam on an ill-conditioned quadratic (:math:`\lambda` from :math:`10^{-3}`
    to 1): with bfloat16 parameters rounded to nearest, an update of the
    learning rate's size is below half a spacing of the parameters near 1, so
    they never move; stochastic rounding moves them right on average, a float32
    master copy exactly as float32; bfloat16 or int8 *state* changes little;
  - plain SGD at a learning rate of :math:`10^{-4}` (every update a small
    fraction of a bfloat16 spacing): the same three, on the slow exponential
    decay of gradient descent.
"""

from dataclasses import dataclass

import numpy as np

import fastdescent

from .console import Progress, table
from .contenders import make_optimizer
from .data import MiniBatches
from .mlp import MLP
from .training import digits_or_none, train_epochs


def storages(seed):
    """The state storages the MLP runs compare: label -> optimizer options."""
    return {
        "float32": {},
        "bfloat16": dict(state_dtype="bfloat16"),
        "bfloat16 stochastic": dict(state_dtype="bfloat16", rounding="stochastic", seed=seed),
        "int8": dict(state_dtype="int8"),
        "int8 stochastic": dict(state_dtype="int8", rounding="stochastic", seed=seed),
    }


#: The long runs: steps, dimension, Adam's and SGD's rates, the quadratics' curvatures.
STEPS = 10_000
DIMENSION = 1_000
ADAM_LR = 1e-3
SGD_LR = 1e-4


@dataclass
class Quadratic:
    r"""``f(x) = 0.5 * sum(curvature * x**2)`` from ``x = start``."""

    curvature: np.ndarray
    start: np.ndarray

    def value(self, x):
        x = x.astype(np.float64)
        return 0.5 * float(np.sum(self.curvature * x * x))

    def gradient(self, x):
        return (self.curvature * x.astype(np.float32)).astype(np.float32)


def quadratics(seed):
    """The two problems: an ill-conditioned one for Adam, a well-conditioned one for SGD."""
    rng = np.random.default_rng(seed)
    start = rng.uniform(0.5, 1.5, DIMENSION).astype(np.float32) * rng.choice([-1, 1], DIMENSION).astype(np.float32)
    return {
        "adam": Quadratic(np.geomspace(1e-3, 1.0, DIMENSION).astype(np.float32), start),
        "sgd": Quadratic(rng.uniform(0.5, 2.0, DIMENSION).astype(np.float32), start),
    }


def long_run_configs(seed):
    """label -> (parameter dtype, optimizer options) of the long runs."""
    import ml_dtypes

    bf16 = ml_dtypes.bfloat16
    return {
        "float32": (np.float32, {}),
        "bfloat16 state": (np.float32, dict(state_dtype="bfloat16")),
        "bfloat16 state, stochastic": (np.float32, dict(state_dtype="bfloat16", rounding="stochastic", seed=seed)),
        "int8 state": (np.float32, dict(state_dtype="int8")),
        "bfloat16 params, nearest": (bf16, dict(rounding="nearest")),
        "bfloat16 params, stochastic": (bf16, dict(rounding="stochastic", seed=seed)),
        "bfloat16 params, float32 master": (bf16, dict(master_weights=True)),
    }


def long_run(problem, rule, lr, dtype, options, steps=STEPS):
    """``steps`` steps of ``rule`` (a fastdescent class name) on ``problem``;
    returns (steps, f at those steps), a hundred times along the run."""
    x = problem.start.astype(dtype)
    optimizer = getattr(fastdescent, rule)([x], lr=lr, backend="kernel", **options)
    record_every = max(1, steps // 100)
    taken, values = [0], [problem.value(x)]
    for step in range(1, steps + 1):
        optimizer.step([problem.gradient(x).astype(dtype) if dtype != np.float32 else problem.gradient(x)])
        if step % record_every == 0:
            taken.append(step)
            values.append(problem.value(x))
    return np.array(taken), np.array(values)


def mlp_runs(args, data, contenders, progress):
    """Every contender with every storage: contender -> storage -> result dict."""
    results = {}
    for contender in contenders:
        results[contender.name] = {}
        for label, options in storages(args.seed).items():
            model = MLP([data.n_features, *args.hidden, 10], activation="relu", dtype=np.float32, seed=args.seed)
            cls = getattr(fastdescent, contender.class_name)
            try:
                optimizer = cls(model.params, lr=contender.mlp_lr, backend="kernel", **contender.hyper, **options)
            except ValueError as error:  # a configuration that cannot keep low-precision state
                results[contender.name][label] = {"refused": str(error)}
                continue
            batches = MiniBatches(data.x_train, data.y_train, batch_size=args.batch_size, seed=args.seed)
            history = train_epochs(model, optimizer, batches, args.epochs, (data.x_test, data.y_test),
                                   progress=progress, label=f"{contender.name} [{label}]")
            state = sum(v.nbytes for s in optimizer.state.values() for v in s.values() if isinstance(v, np.ndarray))
            results[contender.name][label] = {"history": history, "accuracy": history.held_out_accuracy[-1],
                                              "state_bytes": state / model.n_parameters}
    return results


def run(args, contenders):
    """Section 4: print the tables; returns the results for the pictures."""
    print("\n== 4. Optimizer state and parameters in 16 and 8 bits ==")
    data = digits_or_none(args.seed)
    if data is None:
        return None
    progress = Progress()
    print(f"\n-- 4a. The digits MLP with its state in float32, bfloat16 and int8 ({args.epochs} epochs, held-out "
          "accuracy)\n")
    mlp = mlp_runs(args, data, [c for c in contenders if c is not None], progress)
    labels = list(storages(args.seed))
    rows = []
    for name, runs in mlp.items():
        base = runs["float32"].get("accuracy")
        cells = []
        for label in labels:
            run = runs[label]
            if "refused" in run:
                cells.append("refused")
            else:
                delta = "" if label == "float32" else f" ({100 * (run['accuracy'] - base):+.1f})"
                cells.append(f"{100 * run['accuracy']:.1f}%{delta}")
        rows.append([name, *cells])
    print()
    print(table(rows, ["optimizer", *labels], "<" + ">" * len(labels)))
    bytes_rows = {label: max(r[label].get("state_bytes", 0) for r in mlp.values()) for label in labels}
    print("(in brackets: points against float32 state; state bytes per parameter, at most: "
          + ", ".join(f"{label} {b:.2f}" for label, b in bytes_rows.items()) + ")")
    steps = STEPS if args.max_steps is None else args.max_steps
    print(f"\n-- 4b. {steps:,} steps where rounding decides: Adam (lr {ADAM_LR:g}) on an ill-conditioned quadratic, "
          f"SGD (lr {SGD_LR:g}) on a well-conditioned one, {DIMENSION:,} coordinates\n")
    problems = quadratics(args.seed)
    long_runs = {"adam": {}, "sgd": {}}
    for label, (dtype, options) in long_run_configs(args.seed).items():
        long_runs["adam"][label] = long_run(problems["adam"], "Adam", ADAM_LR, dtype, options, steps)
        progress.update(f"Adam [{label}]", 1, 1, f"f = {long_runs['adam'][label][1][-1]:.3g}")
        if "state" not in label:  # plain SGD keeps no state
            long_runs["sgd"][label] = long_run(problems["sgd"], "SGD", SGD_LR, dtype, options, steps)
            progress.update(f"SGD [{label}]", 1, 1, f"f = {long_runs['sgd'][label][1][-1]:.3g}")
    rows = []
    for label in long_run_configs(args.seed):
        sgd = long_runs["sgd"].get(label)
        rows.append([label, f"{long_runs['adam'][label][1][-1]:.4g}", "-" if sgd is None else f"{sgd[1][-1]:.4g}"])
    start = {rule: next(iter(runs.values()))[1][0] for rule, runs in long_runs.items()}
    print()
    print(table(rows, ["parameters / state", f"Adam: f from {start['adam']:.4g} to",
                       f"SGD: f from {start['sgd']:.4g} to"], "<>>"))
    print("(bfloat16 parameters rounded to nearest lose every update below half their spacing; stochastic rounding"
          " keeps them right on average; a float32 master copy keeps them exact)")
    return {"mlp": mlp, "long": long_runs}


__all__ = ["Quadratic", "long_run", "run", "storages"]
