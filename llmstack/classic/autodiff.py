"""Reverse-mode automatic differentiation on NumPy arrays, in one small class.

Every operation records its inputs and a function that turns the gradient of
its output into gradients of its inputs (the chain rule, one node at a time).
`backward()` orders the graph topologically and runs those functions from the
output back to the leaves. This is what `torch.autograd` does, minus the speed.

    x = Value(np.random.randn(4, 3)); w = Value(np.random.randn(3, 2))
    loss = (x @ w).relu().sum()
    loss.backward()            # fills x.grad and w.grad
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np


def _unbroadcast(grad: np.ndarray, shape: tuple) -> np.ndarray:
    """Sum a gradient over the axes that broadcasting added or stretched."""
    while grad.ndim > len(shape):
        grad = grad.sum(axis=0)
    for axis, size in enumerate(shape):
        if size == 1 and grad.shape[axis] != 1:
            grad = grad.sum(axis=axis, keepdims=True)
    return grad


class Value:
    def __init__(self, data, parents: Iterable["Value"] = (), backward: Callable[[np.ndarray], tuple] | None = None):
        self.data = np.asarray(data, dtype=np.float64)
        self.grad = np.zeros_like(self.data)
        self._parents = tuple(parents)
        self._backward = backward  # grad of output -> grads of parents (same order)

    shape = property(lambda self: self.data.shape)

    def __repr__(self) -> str:
        return f"Value(shape={self.data.shape})"

    # -------------------------------------------------------------- operations

    def __add__(self, other):
        other = other if isinstance(other, Value) else Value(other)
        return Value(self.data + other.data, (self, other),
                     lambda g: (_unbroadcast(g, self.shape), _unbroadcast(g, other.shape)))

    def __mul__(self, other):
        other = other if isinstance(other, Value) else Value(other)
        return Value(self.data * other.data, (self, other),
                     lambda g: (_unbroadcast(g * other.data, self.shape), _unbroadcast(g * self.data, other.shape)))

    def __matmul__(self, other):
        other = other if isinstance(other, Value) else Value(other)
        # NumPy's rules: a 1-D left operand is a row (K,) -> (1, K), a 1-D right one a column
        # (K,) -> (K, 1), and the added axis is dropped from the result. The gradients are the
        # 2-D ones, computed on those views and reshaped back.
        a = self.data[None, :] if self.data.ndim == 1 else self.data
        b = other.data[:, None] if other.data.ndim == 1 else other.data

        def backward(g):
            if other.data.ndim == 1:
                g = g[..., None]
            if self.data.ndim == 1:
                g = g[..., None, :]
            ga = _unbroadcast(g @ np.swapaxes(b, -1, -2), a.shape)
            gb = _unbroadcast(np.swapaxes(a, -1, -2) @ g, b.shape)
            return ga.reshape(self.shape), gb.reshape(other.shape)

        return Value(self.data @ other.data, (self, other), backward)

    def __rmatmul__(self, other):
        return Value(other) @ self

    def __neg__(self):
        return self * -1.0

    def __sub__(self, other):
        return self + (-other if isinstance(other, Value) else Value(-np.asarray(other)))

    def __truediv__(self, other):
        other = other if isinstance(other, Value) else Value(other)
        return self * other ** -1.0

    __radd__ = __add__
    __rmul__ = __mul__

    # Reflected operators: Python calls these for `1 - x`, `2 / x`, `2 ** x`, where the left
    # operand is a number that does not know about Value.
    def __rsub__(self, other):
        return Value(other) - self

    def __rtruediv__(self, other):
        return Value(other) / self

    def __rpow__(self, base):
        return Value(base) ** self

    def __pow__(self, exponent):
        if isinstance(exponent, Value):  # d(a^b)/da = b a^(b-1),  d(a^b)/db = a^b ln a
            out = self.data**exponent.data
            return Value(out, (self, exponent),
                         lambda g: (_unbroadcast(g * exponent.data * self.data ** (exponent.data - 1), self.shape),
                                    _unbroadcast(g * out * np.log(self.data), exponent.shape)))
        return Value(self.data**exponent, (self,), lambda g: (g * exponent * self.data ** (exponent - 1),))

    def exp(self):
        out = np.exp(self.data)
        return Value(out, (self,), lambda g: (g * out,))

    def log(self):
        return Value(np.log(self.data), (self,), lambda g: (g / self.data,))

    def tanh(self):
        out = np.tanh(self.data)
        return Value(out, (self,), lambda g: (g * (1 - out**2),))

    def relu(self):
        return Value(np.maximum(self.data, 0), (self,), lambda g: (g * (self.data > 0),))

    def sum(self, axis=None, keepdims=False):
        def backward(g):
            if axis is not None and not keepdims:
                g = np.expand_dims(g, axis)
            return (np.broadcast_to(g, self.shape).copy(),)

        return Value(self.data.sum(axis=axis, keepdims=keepdims), (self,), backward)

    def mean(self, axis=None):
        n = self.data.size if axis is None else self.data.shape[axis]
        return self.sum(axis=axis) * (1.0 / n)

    def log_softmax(self, axis=-1):
        """x - logsumexp(x), shifted by the max first so exp never overflows."""
        shifted = self.data - self.data.max(axis=axis, keepdims=True)
        out = shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))
        softmax = np.exp(out)
        return Value(out, (self,), lambda g: (g - softmax * g.sum(axis=axis, keepdims=True),))

    def softmax(self, axis=-1):
        return self.log_softmax(axis).exp()

    def cross_entropy(self, targets: np.ndarray):
        """Mean negative log-likelihood of integer targets under softmax(self) over the last axis."""
        logp = self.log_softmax(-1)
        onehot = np.zeros_like(self.data)
        onehot[np.arange(len(targets)), targets] = 1.0
        return -(logp * onehot).sum() * (1.0 / len(targets))

    # -------------------------------------------------------------- backward

    def zero_grad(self) -> None:
        """Forget the gradient: `backward` adds to what a leaf holds, as torch does, so a
        training loop clears its parameters' gradients before each step."""
        self.grad = np.zeros_like(self.data)

    def backward(self) -> None:
        order, seen = [], set()

        def visit(node):  # iterative DFS: deep graphs (long RNN unrolls) exceed Python's recursion limit
            stack = [(node, False)]
            while stack:
                n, done = stack.pop()
                if done:
                    order.append(n)
                elif id(n) not in seen:
                    seen.add(id(n))
                    stack.append((n, True))
                    stack.extend((p, False) for p in n._parents)

        visit(self)
        self.grad = np.ones_like(self.data)
        for node in reversed(order):  # outputs before inputs
            if node._backward is None:
                continue
            for parent, g in zip(node._parents, node._backward(node.grad)):
                parent.grad = parent.grad + g


class MLP:
    """A multi-layer perceptron on Values: tanh between layers, linear output. Enough to train a
    small classifier with `backward()` and plain gradient descent:

        mlp = MLP([2, 16, 3], np.random.default_rng(0))
        for x, y in batches:
            mlp.zero_grad()
            loss = mlp(Value(x)).cross_entropy(y)
            loss.backward()
            for p in mlp.parameters():
                p.data -= lr * p.grad
    """

    def __init__(self, sizes: list[int], rng: np.random.Generator):
        # Weights stored (in, out) so a batch (B, in) multiplies from the left; uniform in
        # +-1/sqrt(fan_in), torch's nn.Linear default.
        self.layers = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            bound = 1 / np.sqrt(fan_in)
            self.layers.append((Value(rng.uniform(-bound, bound, (fan_in, fan_out))),
                                Value(rng.uniform(-bound, bound, fan_out))))

    def __call__(self, x: Value) -> Value:
        for i, (w, b) in enumerate(self.layers):
            x = x @ w + b  # (B, out)
            if i < len(self.layers) - 1:
                x = x.tanh()
        return x

    def parameters(self) -> list[Value]:
        return [p for layer in self.layers for p in layer]

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.zero_grad()
