"""Reference SGD family: NumPy, straight from the equations.

Same signature and in-place contract as the kernel ``sgd`` in src/kernels/sgd.pxi,
and the same operations in the same order, so both backends agree bit for bit.
NumPy rounds a Python float to the array dtype before using it (NEP 50), exactly
as the kernel casts its double scalars.
"""


def sgd(params, grads, momentum_buffer=None, *, lr, grad_scale, weight_decay, momentum,
        dampening, nesterov, classical, first_step, n_threads=None):
    for i, (p, g) in enumerate(zip(params, grads)):
        d = grad_scale * g
        if weight_decay != 0.0:
            d = d + weight_decay * p
        if momentum_buffer is None:
            p -= lr * d
            continue
        buf = momentum_buffer[i]
        if classical:
            buf[...] = momentum * buf - lr * d
            if nesterov:
                p += momentum * buf - lr * d
            else:
                p += buf
            continue
        if first_step:
            buf[...] = d
        else:
            buf[...] = momentum * buf + (1.0 - dampening) * d
        if nesterov:
            d = d + momentum * buf
        else:
            d = buf
        p -= lr * d
