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
        return Value(self.data @ other.data, (self, other),
                     lambda g: (_unbroadcast(g @ np.swapaxes(other.data, -1, -2), self.shape),
                                _unbroadcast(np.swapaxes(self.data, -1, -2) @ g, other.shape)))

    def __neg__(self):
        return self * -1.0

    def __sub__(self, other):
        return self + (-other if isinstance(other, Value) else Value(-np.asarray(other)))

    def __truediv__(self, other):
        other = other if isinstance(other, Value) else Value(other)
        return self * other ** -1.0

    __radd__ = __add__
    __rmul__ = __mul__

    def __pow__(self, exponent: float):
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
