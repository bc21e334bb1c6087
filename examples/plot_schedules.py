"""
Learning-rate schedules
=======================

Every schedule in :mod:`fastdescent.schedules` is a pure function of the step,
vectorized over an array of steps, so drawing one is a single call. These are the
schedules the demo compares on the digits MLP, over 1000 steps.
"""

import matplotlib.pyplot as plt
import numpy as np

from fastdescent import schedules

T = 1000
catalog = {
    "step decay (x0.3 every 250)": schedules.step_decay(0.1, step_size=250, gamma=0.3),
    "exponential (x0.01 overall)": schedules.exponential(0.1, gamma=0.01 ** (1 / T)),
    "cosine": schedules.cosine(0.1, T_max=T, eta_min=1e-3),
    "SGDR, T_0=66, T_mult=2": schedules.cosine_warm_restarts(0.1, T_0=66, T_mult=2, eta_min=1e-3),
    "cyclic, triangular": schedules.cyclic(0.005, 0.1, step_size_up=100),
    "cyclic, triangular2": schedules.cyclic(0.005, 0.1, step_size_up=100, mode="triangular2"),
    "one-cycle": schedules.one_cycle(0.1, total_steps=T),
    "warm-up then cosine": schedules.warmup(schedules.cosine(0.1, T_max=T - 100), 100),
}

steps = np.arange(T + 1)
fig, axes = plt.subplots(2, 4, figsize=(12, 5), sharex=True, sharey=True)
for ax, (name, schedule) in zip(axes.flat, catalog.items()):
    ax.plot(steps, schedule(steps), lw=1.6)
    ax.set_title(name, fontsize=9)
    ax.grid(alpha=0.3)
for ax in axes[1]:
    ax.set_xlabel("step")
for ax in axes[:, 0]:
    ax.set_ylabel("learning rate")
fig.tight_layout()

# %%
# A schedule is applied to an optimizer by a :class:`fastdescent.Scheduler`,
# which writes the value into a hyperparameter of every parameter group after
# each step; any hyperparameter works, here the momentum annealed from 0.5 to 0.9:
import fastdescent as fd

params = [np.zeros(3, dtype=np.float32)]
opt = fd.SGD(params, lr=0.1, momentum=0.5)
momentum = fd.Scheduler(opt, schedules.linear(0.5, 0.9, 4), "momentum")
for _ in range(5):
    opt.step([np.ones(3, dtype=np.float32)])
    momentum.step()
    print(round(opt.param_groups[0]["momentum"], 3))
