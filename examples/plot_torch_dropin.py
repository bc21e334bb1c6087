"""
The PyTorch drop-in
===================

``fastdescent.torch.Adam`` replaces ``torch.optim.Adam`` without any other
change to the training loop. Here the same network, from the same
initialization, is trained on the same batches by both: the loss curves lie on
top of each other, and the parameters differ only by rounding (PyTorch fuses
multiply-adds, the kernels do not).
"""

import copy

import matplotlib.pyplot as plt
import numpy as np
import torch

import fastdescent.torch as fdt

torch.manual_seed(0)
x = torch.randn(512, 20)
y = (x[:, :5].sum(dim=1, keepdim=True) > 0).float()
template = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))


def train(optimizer_class):
    model = copy.deepcopy(template)
    optimizer = optimizer_class(model.parameters(), lr=3e-3, weight_decay=1e-4)
    losses = []
    for step in range(200):
        batch = slice(32 * (step % 16), 32 * (step % 16 + 1))
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x[batch]), y[batch])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return model, losses


torch_model, torch_losses = train(torch.optim.Adam)
fd_model, fd_losses = train(fdt.Adam)
difference = max((p - q).abs().max().item() for p, q in zip(torch_model.parameters(), fd_model.parameters()))

fig, ax = plt.subplots(figsize=(7, 4.2))
ax.plot(torch_losses, lw=3, alpha=0.5, label="torch.optim.Adam")
ax.plot(fd_losses, lw=1, color="black", label="fastdescent.torch.Adam")
ax.set(yscale="log", xlabel="step", ylabel="training loss",
       title=f"same loop, two optimizers: largest parameter difference {difference:.1e}")
ax.grid(alpha=0.3)
ax.legend()
fig.tight_layout()
