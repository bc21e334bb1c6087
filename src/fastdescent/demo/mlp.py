r"""A small multilayer perceptron in NumPy, with its backward pass written out.

::

    model = MLP([64, 128, 10], activation="relu", dtype=np.float32, seed=0)
    optimizer = fastdescent.Adam(model.params, lr=1e-3)
    for xb, yb in MiniBatches(X, y, batch_size=32, seed=0):
        loss, grads = model.loss_and_gradients(xb, yb)
        optimizer.step(grads)

Layers :math:`z_l = a_{l-1} W_l + b_l`, :math:`a_l = \sigma(z_l)` (ReLU or tanh)
for the hidden layers, logits :math:`z_L` and the mean softmax cross-entropy
:math:`\ell = -\frac1B \sum_n \log \mathrm{softmax}(z_L^{(n)})_{y_n}`.
Backward (backpropagation, Rumelhart, Hinton & Williams 1986):

.. math::
   \frac{\partial \ell}{\partial z_L} = \frac{\mathrm{softmax}(z_L) - \mathrm{onehot}(y)}{B},\quad
   \frac{\partial \ell}{\partial W_l} = a_{l-1}^\top \frac{\partial \ell}{\partial z_l},\quad
   \frac{\partial \ell}{\partial b_l} = \sum_n \frac{\partial \ell}{\partial z_l},\quad
   \frac{\partial \ell}{\partial z_{l-1}} = \frac{\partial \ell}{\partial z_l} W_l^\top \odot \sigma'(z_{l-1}).
"""

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

ACTIVATIONS = ("relu", "tanh")


class MLP:
    """Fully connected network with softmax cross-entropy, parameters in NumPy arrays.

    Parameters
    ----------
    sizes : sequence of int
        Widths from input to output, e.g. ``[64, 128, 10]``.
    activation : {"relu", "tanh"}
        Hidden-layer nonlinearity.
    dtype : float32 or float64
        Dtype of every parameter and gradient array.
    seed : int, numpy.random.Generator or None
        Initialization as ``torch.nn.Linear``: weights and biases uniform in
        ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]``.

    Attributes
    ----------
    params : list of ndarray
        ``[W1, b1, W2, b2, ...]``, C-contiguous, ``W_l`` of shape ``(fan_in, fan_out)``:
        hand these to an optimizer.
    grads : list of ndarray
        Same shapes; :meth:`loss_and_gradients` overwrites them in place.
    """

    def __init__(self, sizes: Sequence[int], activation: str = "relu", dtype: npt.DTypeLike = np.float32,
                 seed: int | np.random.Generator | None = None) -> None:
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"sizes must list at least two positive widths, got {sizes}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {self.dtype}")
        self.sizes, self.activation = sizes, activation
        rng = np.random.default_rng(seed)
        self.params = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            bound = 1.0 / np.sqrt(fan_in)
            self.params.append(rng.uniform(-bound, bound, (fan_in, fan_out)).astype(self.dtype))
            self.params.append(rng.uniform(-bound, bound, fan_out).astype(self.dtype))
        self.grads = [np.zeros_like(p) for p in self.params]

    @property
    def n_parameters(self) -> int:
        return sum(p.size for p in self.params)

    def _forward(self, x):
        """Logits, and the activations of every layer's input (for the backward pass)."""
        a = np.asarray(x, dtype=self.dtype)
        inputs = []
        n_layers = len(self.params) // 2
        for layer in range(n_layers):
            weight, bias = self.params[2 * layer], self.params[2 * layer + 1]
            inputs.append(a)
            z = a @ weight + bias
            if layer < n_layers - 1:
                a = np.maximum(z, 0) if self.activation == "relu" else np.tanh(z)
            else:
                a = z
        return a, inputs

    def forward(self, x: npt.ArrayLike) -> npt.NDArray[Any]:
        """Logits, shape ``(n, n_classes)``."""
        return self._forward(x)[0]

    def predict(self, x: npt.ArrayLike) -> npt.NDArray[np.intp]:
        return np.argmax(self.forward(x), axis=1)

    def accuracy(self, x: npt.ArrayLike, y: npt.ArrayLike) -> float:
        return float(np.mean(self.predict(x) == np.asarray(y)))

    def loss(self, x: npt.ArrayLike, y: npt.ArrayLike) -> float:
        """Mean softmax cross-entropy of the labels ``y`` (integers in ``[0, n_classes)``)."""
        return self._loss_and_dlogits(self.forward(x), y)[0]

    def _loss_and_dlogits(self, logits, y):
        y = np.asarray(y)
        n = len(y)
        if logits.shape[0] != n:
            raise ValueError(f"{logits.shape[0]} samples but {n} labels")
        if n == 0:
            raise ValueError("empty batch")
        shifted = logits - logits.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        total = exp.sum(axis=1, keepdims=True)
        rows = np.arange(n)
        loss = float(np.mean(np.log(total[:, 0]) - shifted[rows, y]))
        dlogits = exp / total
        dlogits[rows, y] -= 1
        dlogits /= n
        return loss, dlogits

    def loss_and_gradients(self, x: npt.ArrayLike, y: npt.ArrayLike) -> tuple[float, list[npt.NDArray[Any]]]:
        """Mean cross-entropy on the batch, and its gradient with respect to each
        parameter (written into ``self.grads``, which is returned)."""
        logits, inputs = self._forward(x)
        loss, dz = self._loss_and_dlogits(logits, y)
        for layer in reversed(range(len(inputs))):
            weight = self.params[2 * layer]
            a = inputs[layer]
            np.matmul(a.T, dz, out=self.grads[2 * layer])
            np.sum(dz, axis=0, out=self.grads[2 * layer + 1])
            if layer:
                da = dz @ weight.T
                # a is the previous layer's output: relu'(z) = [a > 0], tanh'(z) = 1 - a^2
                dz = da * (a > 0) if self.activation == "relu" else da * (1 - a * a)
        return loss, self.grads


__all__ = ["ACTIVATIONS", "MLP"]
