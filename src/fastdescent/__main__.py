"""Command line: ``python -m fastdescent [compare|info|demo|bench] ...``."""

import argparse
import sys
import time

import numpy as np


def _compare(args):
    """Print the configuration, then kernel vs reference per rule on one buffer."""
    from . import show_config
    from .catalog import RULES

    show_config()
    n, dtype = args.size, np.dtype(args.dtype)
    rng = np.random.default_rng(args.seed)
    print(f"\nkernel vs reference, one step on {n:,} {dtype} elements "
          f"(median of {args.repeat}; deviation after {args.steps} steps)")
    print(f"{'rule':<14} {'kernel ms':>10} {'reference ms':>13} {'speedup':>8} {'max |dp|':>10}")
    for rule in RULES.values():
        shape = rule.spec.sample_shape(n)  # 1-D, or a matrix for a rule that sees whole tensors
        param = rng.standard_normal(shape).astype(dtype)
        grads = [rng.standard_normal(shape).astype(dtype) for _ in range(args.steps)]
        state = rule.make_state(rng, n, dtype)
        results, times = {}, {}
        for backend in ("kernel", "reference"):
            p, s = param.copy(), [None if a is None else a.copy() for a in state]
            samples = []
            for t in range(1, max(args.steps, args.repeat) + 1):
                start = time.perf_counter()
                rule.step(p, grads[(t - 1) % args.steps], *s, t=t, backend=backend)
                samples.append(time.perf_counter() - start)
                if t == args.steps:
                    results[backend] = p.copy()
            times[backend] = float(np.median(samples))
        dev = float(np.max(np.abs(results["kernel"] - results["reference"]), initial=0.0))
        print(f"{rule.name:<14} {times['kernel'] * 1e3:>10.3f} {times['reference'] * 1e3:>13.3f} "
              f"{times['reference'] / times['kernel']:>7.1f}x {dev:>10.3g}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastdescent", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    compare = sub.add_parser("compare", help="configuration, then kernel vs reference per rule (default)")
    compare.add_argument("--size", type=int, default=10**6, help="elements per buffer (default 10**6)")
    compare.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    compare.add_argument("--steps", type=int, default=10, help="steps before comparing parameters")
    compare.add_argument("--repeat", type=int, default=21, help="timed steps per backend")
    compare.add_argument("--seed", type=int, default=0)
    sub.add_parser("info", help="print the build and run-time configuration")
    from . import demo

    demo.add_arguments(sub.add_parser("demo", help="optimizers on loss surfaces and on a small MLP, with pictures",
                                      description=demo.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))

    from . import bench

    bench.add_arguments(sub.add_parser("bench", help="throughput against the bandwidth ceiling, the reference and torch",
                                       description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    if args.command in (None, "compare"):
        if args.command is None:
            args = compare.parse_args([])
        _compare(args)
    elif args.command == "info":
        from . import show_config

        show_config()
    elif args.command == "demo":
        return demo.run(args)
    elif args.command == "bench":
        return bench.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
