"""The demo's command line: ``add_arguments(parser)`` declares the options and
``run(args)`` runs the selected sections, then draws the pictures."""

import os
import time

import fastdescent

from . import low_precision, plots, recipes
from .contenders import CONTENDERS, METHODS
from .race import race
from .surfaces import SURFACES
from .training import INSTALL_HINT, train

#: what ``--sections`` accepts, in the order the demo runs them
SECTIONS = ("race", "mlp", *recipes.PARTS, "precision")


def draw(args, race_results, training_results, recipe_results, precision_results=None):
    """Write every picture the finished sections can make; returns the file names."""
    if not plots.matplotlib_available():
        print(f"\nmatplotlib is not installed, so no pictures were drawn. To get them: {INSTALL_HINT}")
        return []
    os.makedirs(args.output, exist_ok=True)
    pictures = []
    for name, runs in (race_results or {}).items():
        pictures.append((f"surface_{name}.png", plots.plot_paths, (SURFACES[name], runs)))
    if training_results:
        histories = {name: runs["kernel"]["history"] for name, runs in training_results.items()}
        pictures.append(("training_loss.png", plots.plot_training, (histories,)))
    recipe_pictures = {
        "batch-size": [("batch_size.png", plots.plot_batch_sizes)],
        "schedules": [("schedules.png", plots.plot_schedules), ("schedules_training.png", plots.plot_schedule_runs)],
        "momentum": [("momentum.png", plots.plot_momentum)],
        "plateau": [("plateau.png", plots.plot_plateau)],
        "averaging": [("averaging.png", plots.plot_averaging)],
    }
    for part, result in recipe_results.items():
        for filename, plot in recipe_pictures[part]:
            pictures.append((filename, plot, (result,)))
    if precision_results:
        pictures.append(("precision_mlp.png", plots.plot_precision_mlp, (precision_results["mlp"],)))
        pictures.append(("precision_long.png", plots.plot_precision_long, (precision_results["long"],)))
    written = []
    for filename, plot, inputs in pictures:
        path = os.path.join(args.output, filename)
        plot(*inputs, path)
        written.append(path)
    print(f"\n== 5. Pictures: {len(written)} PNG files in {os.path.abspath(args.output)} ==")
    for path in written:
        print(f"  {os.path.basename(path)}")
    return written


def add_arguments(parser):
    """Declare the demo's options on an ``argparse`` (sub)parser."""
    parser.add_argument("--output", default="fastdescent-demo",
                        help="folder for the PNG pictures (default: ./fastdescent-demo)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), metavar="NAME",
                        help=f"parts to run, from: {' '.join(SECTIONS)} (default: all)")
    parser.add_argument("--optimizers", nargs="+", choices=METHODS, default=list(METHODS), metavar="NAME",
                        help=f"methods raced in the sections race and mlp, from: {' '.join(METHODS)} "
                             "(default: all; newton runs on the surfaces only)")
    parser.add_argument("--surfaces", nargs="+", choices=list(SURFACES), default=list(SURFACES), metavar="NAME",
                        help=f"surfaces to race on, from: {' '.join(SURFACES)} (default: all)")
    parser.add_argument("--epochs", type=int, default=20,
                        help="training epochs of every MLP run (default 20; the plateau run may take up to 3x)")
    parser.add_argument("--batch-size", type=int, default=32, help="mini-batch size (default 32)")
    parser.add_argument("--hidden", type=int, nargs="+", default=[128], metavar="WIDTH",
                        help="hidden layer widths of the MLP (default: 128)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="step budget per run on the surfaces (default: per surface, 1000-3000) and of the "
                             "long runs of the precision section (default: 10000)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the data split, initialization and batches")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for the optimizer kernels (default: all usable cores)")
    return parser


def run(args):
    """Run the demo with parsed ``args`` (see :func:`add_arguments`); returns 0."""
    if args.epochs < 0 or args.batch_size <= 0 or (args.max_steps is not None and args.max_steps < 0):
        raise SystemExit("--epochs and --max-steps must be >= 0 and --batch-size > 0")
    sections = set(args.sections)
    methods = list(dict.fromkeys(args.optimizers))
    contenders = [CONTENDERS[m] for m in methods if m in CONTENDERS]
    started = time.perf_counter()
    with fastdescent.num_threads(args.threads):
        print(f"fastdescent {fastdescent.__version__} demo: kernels '{_variant()}', "
              f"{fastdescent.get_num_threads()} thread(s), seed {args.seed}")
        race_results = race(args, methods) if "race" in sections and args.surfaces and methods else {}
        training = "mlp" in sections and contenders and args.epochs > 0
        training_results = train(args, contenders) if training else None
        parts = [p for p in recipes.PARTS if p in sections]
        recipe_results = recipes.run_section(args, parts) if parts and args.epochs > 0 else {}
        precision = "precision" in sections and args.epochs > 0
        precision_results = low_precision.run(args, contenders) if precision else None
        draw(args, race_results, training_results, recipe_results, precision_results)
    print(f"\ndemo finished in {time.perf_counter() - started:.1f} s")
    return 0


def _variant():
    from .._dispatch import variant

    return variant
