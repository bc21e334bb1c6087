"""
A NumPy MLP on handwritten digits
=================================

A small multilayer perceptron (:class:`fastdescent.demo.mlp.MLP`, forward and
backward pass in NumPy) on scikit-learn's bundled 8x8 digits, trained with three
optimizers on the same mini-batches from the same initialization. The optimizer
objects take the model's list of parameter arrays and its list of gradients.
"""

import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import fastdescent as fd
from fastdescent.demo.data import MiniBatches
from fastdescent.demo.mlp import MLP

digits = load_digits()
x = (digits.data / 16).astype(np.float32)
x_train, x_test, y_train, y_test = train_test_split(x, digits.target, test_size=0.25, random_state=0,
                                                    stratify=digits.target)

optimizers = {
    "SGD + momentum 0.9 (lr 0.05)": lambda params: fd.SGD(params, lr=0.05, momentum=0.9),
    "Adam (lr 1e-3)": lambda params: fd.Adam(params, lr=1e-3),
    "Adagrad (lr 0.05)": lambda params: fd.Adagrad(params, lr=0.05),
}
epochs = 12
curves = {}
for name, make in optimizers.items():
    model = MLP([64, 64, 10], seed=0)
    opt = make(model.params)
    batches = MiniBatches(x_train, y_train, batch_size=32, seed=0)
    accuracy = []
    for epoch in range(epochs):
        for xb, yb in batches:
            loss, grads = model.loss_and_gradients(xb, yb)
            opt.step(grads)
        accuracy.append(model.accuracy(x_test, y_test))
    curves[name] = accuracy

fig, ax = plt.subplots(figsize=(7, 4.2))
for name, accuracy in curves.items():
    ax.plot(np.arange(1, epochs + 1), 100 * np.array(accuracy), "-o", ms=3, label=name)
ax.set(xlabel="epoch", ylabel="held-out accuracy (%)", title="MLP 64-64-10 on the digits")
ax.grid(alpha=0.3)
ax.legend()
fig.tight_layout()
