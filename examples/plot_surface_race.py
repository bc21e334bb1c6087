"""
Optimizers racing on the Rosenbrock valley
==========================================

Rosenbrock's function :math:`(1 - x)^2 + 100 (y - x^2)^2` has its minimum at
(1, 1), at the end of a long, curved, flat-bottomed valley: the gradient points
at the steep walls, not along the floor. Plain SGD, at a rate large enough to
get anywhere, is thrown across the valley by the steep walls before it settles
and then crawls along the floor; momentum builds up speed along the floor;
Adam rescales each coordinate and takes steps of nearly constant size.
"""

from functools import partial

import matplotlib.pyplot as plt
import numpy as np

import fastdescent as fd
from fastdescent.demo.surfaces import ROSENBROCK
from fastdescent.demo.trajectory import run_trajectory

optimizers = {
    "SGD, lr 2e-3": partial(fd.SGD, lr=2e-3),
    "SGD + momentum 0.9, lr 1e-3": partial(fd.SGD, lr=1e-3, momentum=0.9),
    "Adam, lr 0.03": partial(fd.Adam, lr=0.03),
}
runs = {name: run_trajectory(ROSENBROCK, make, max_steps=3000, tol=1e-6) for name, make in optimizers.items()}

xs, ys, z = ROSENBROCK.grid(300)
fig, ax = plt.subplots(figsize=(8, 5.5))
ax.contourf(xs, ys, z + 1e-3, levels=np.geomspace(1e-3, z.max(), 30), norm="log", cmap="viridis", alpha=0.8)
for name, run in runs.items():
    ax.plot(run.path[:, 0], run.path[:, 1], lw=1.8, label=f"{name}: {run.steps} steps, {run.stop}")
ax.plot(*ROSENBROCK.start, "o", color="white", mec="black", label="start")
ax.plot(1, 1, "*", color="gold", mec="black", ms=16, label="minimum")
ax.set(xlabel="x", ylabel="y", title="Rosenbrock: paths to |grad| <= 1e-6 (at most 3000 steps)")
ax.legend(fontsize=8, loc="lower right")
fig.tight_layout()

# %%
# The final loss of each run:
for name, run in runs.items():
    print(f"{name:<30} steps {run.steps:>5}  loss {run.final_value:.2e}")
