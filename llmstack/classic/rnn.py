"""Recurrent networks written out: the Elman RNN (with backpropagation through time by hand), LSTM, GRU.

A recurrent layer reads a sequence one step at a time and carries a state h_t from step
to step; every step applies the same weights:

    RNN:   h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)
    LSTM:  i, f, g, o = split(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)      (4 gates)
           c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)               the cell: added to, not rewritten
           h_t = sigmoid(o) * tanh(c_t)
    GRU:   r, z, n_x = split(W_ih x_t + b_ih),  r_h, z_h, n_h = split(W_hh h_{t-1} + b_hh)
           r = sigmoid(r + r_h),  z = sigmoid(z + z_h),  n = tanh(n_x + r * n_h)
           h_t = (1 - z) * n + z * h_{t-1}

The gradient that reaches h_{t-k} from h_t is a product of k Jacobians. In the RNN each is
diag(1 - h^2) W_hh, so it shrinks (or grows) geometrically with k: the long-range problem.
The LSTM's cell and the GRU's interpolation add the old state to the new one, and the
Jacobian of that path is the forget gate (or z) itself, which the network can hold near 1.

Parameter names, shapes and gate order are torch's (`weight_ih_l0`, ..., LSTM i f g o, GRU
r z n), so `ours.load_state_dict(nn.LSTM(...).state_dict())` loads as is and the outputs
agree (`tests/test_classic.py`). Shapes: T steps, B batch, I input size, H hidden size,
L layers; states are (L, B, H), as in torch.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # h (L, B, H), or (h, c) for the LSTM


def rnn_cell(xw: torch.Tensor, h: torch.Tensor, w_hh: torch.Tensor, b_hh: Optional[torch.Tensor]) -> torch.Tensor:
    """One Elman step. xw = W_ih x_t + b_ih (B, H), computed for all steps at once by the caller."""
    return torch.tanh(xw + F.linear(h, w_hh, b_hh))


def lstm_cell(xw: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor], w_hh: torch.Tensor,
              b_hh: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM step; xw = W_ih x_t + b_ih (B, 4H). Returns (h_t, c_t)."""
    h, c = state
    i, f, g, o = (xw + F.linear(h, w_hh, b_hh)).chunk(4, dim=-1)  # each (B, H)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def gru_cell(xw: torch.Tensor, h: torch.Tensor, w_hh: torch.Tensor, b_hh: Optional[torch.Tensor]) -> torch.Tensor:
    """One GRU step; xw = W_ih x_t + b_ih (B, 3H). The reset gate r scales the *projected* old
    state (W_hh h + b_hh), as torch and cuDNN do, not h before the projection (the paper's)."""
    x_r, x_z, x_n = xw.chunk(3, dim=-1)
    h_r, h_z, h_n = F.linear(h, w_hh, b_hh).chunk(3, dim=-1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return (1 - z) * n + z * h


class _Recurrent(nn.Module):
    """Stacked recurrent layers with torch's parameters, state layout and dropout between layers.

    forward(x, state=None, mask=None) -> (output, state): x (T, B, I), or (B, T, I) with
    batch_first; output is the last layer's h at every step. `mask` (B, T), False at steps
    that must leave the state as it was (left padding in a batch of unequal prompts)."""

    gates = 1

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, *, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0):
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, dropout
        G = self.gates * hidden_size
        for k in range(num_layers):
            inputs = input_size if k == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(torch.empty(G, inputs)))
            self.register_parameter(f"weight_hh_l{k}", nn.Parameter(torch.empty(G, hidden_size)))
            if bias:
                self.register_parameter(f"bias_ih_l{k}", nn.Parameter(torch.empty(G)))
                self.register_parameter(f"bias_hh_l{k}", nn.Parameter(torch.empty(G)))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """torch's default: every weight and bias uniform in +-1/sqrt(hidden_size)."""
        bound = 1 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def layer_weights(self, k: int) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor],
                                             Optional[torch.Tensor]]:
        """Layer k's (weight_ih, weight_hh, bias_ih, bias_hh); biases None without bias."""
        return (getattr(self, f"weight_ih_l{k}"), getattr(self, f"weight_hh_l{k}"),
                getattr(self, f"bias_ih_l{k}", None), getattr(self, f"bias_hh_l{k}", None))

    def cell(self, xw, state, w_hh, b_hh):
        raise NotImplementedError

    def initial_state(self, batch_size: int, like: torch.Tensor) -> State:
        return like.new_zeros(self.num_layers, batch_size, self.hidden_size)

    def forward(self, x: torch.Tensor, state: Optional[State] = None,
                mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, State]:
        if self.batch_first:
            x = x.transpose(0, 1)  # (T, B, I): the loop runs over the first axis
        T, B, _ = x.shape
        if state is None:
            state = self.initial_state(B, x)
        keep = None if mask is None else mask.t()[..., None].to(torch.bool)  # (T, B, 1)
        lstm = isinstance(state, tuple)
        finals = []
        for k in range(self.num_layers):
            w_ih, w_hh, b_ih, b_hh = self.layer_weights(k)
            s = (state[0][k], state[1][k]) if lstm else state[k]  # this layer's (B, H)
            xw = F.linear(x, w_ih, b_ih)  # (T, B, G*H): the input's part of every step in one product
            outs = []
            for t in range(T):
                new = self.cell(xw[t], s, w_hh, b_hh)
                if keep is not None:  # a masked step leaves the state where it was
                    new = (tuple(torch.where(keep[t], a, b) for a, b in zip(new, s)) if lstm
                           else torch.where(keep[t], new, s))
                s = new
                outs.append(s[0] if lstm else s)
            x = torch.stack(outs)  # (T, B, H)
            finals.append(s)
            if self.dropout and self.training and k < self.num_layers - 1:
                x = F.dropout(x, self.dropout, training=True)
        if lstm:
            state = (torch.stack([h for h, _ in finals]), torch.stack([c for _, c in finals]))
        else:
            state = torch.stack(finals)  # (L, B, H)
        return (x.transpose(0, 1) if self.batch_first else x), state


class RNN(_Recurrent):
    """The Elman RNN with tanh, as `nn.RNN(nonlinearity="tanh")`."""

    gates = 1

    def cell(self, xw, h, w_hh, b_hh):
        return rnn_cell(xw, h, w_hh, b_hh)


class LSTM(_Recurrent):
    """Long short-term memory (Hochreiter & Schmidhuber 1997, with the forget gate of Gers et al.
    2000), as `nn.LSTM`. The state is (h, c), each (L, B, H)."""

    gates = 4

    def cell(self, xw, state, w_hh, b_hh):
        return lstm_cell(xw, state, w_hh, b_hh)

    def initial_state(self, batch_size, like):
        h = like.new_zeros(self.num_layers, batch_size, self.hidden_size)
        return h, torch.zeros_like(h)


class GRU(_Recurrent):
    """The gated recurrent unit (Cho et al. 2014), as `nn.GRU`."""

    gates = 3

    def cell(self, xw, h, w_hh, b_hh):
        return gru_cell(xw, h, w_hh, b_hh)


# ---------------------------------------------------------------- backpropagation through time

def rnn_forward(x: torch.Tensor, h0: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
                b_ih: torch.Tensor, b_hh: torch.Tensor) -> torch.Tensor:
    """One Elman layer unrolled: hidden states hs (T, B, H) for inputs x (T, B, I) from h0 (B, H)."""
    xw = F.linear(x, w_ih, b_ih)  # (T, B, H)
    hs, h = [], h0
    for t in range(x.shape[0]):
        h = rnn_cell(xw[t], h, w_hh, b_hh)
        hs.append(h)
    return torch.stack(hs)


def rnn_bptt(x: torch.Tensor, h0: torch.Tensor, hs: torch.Tensor, grad_hs: torch.Tensor, w_ih: torch.Tensor,
             w_hh: torch.Tensor) -> dict[str, torch.Tensor]:
    """Backpropagation through time for `rnn_forward`, by hand.

    x (T, B, I), h0 (B, H), hs (T, B, H) the forward's states, grad_hs (T, B, H) the loss's
    gradient with respect to each h_t directly (zero where the loss does not read h_t).
    Returns the gradients of the weights, biases, x and h0, and "h" (T, B, H): the *total*
    gradient reaching each h_t, from its own use and from every later step through the
    recurrence. Its norm against t shows how far back a loss at the end still reaches.

    Walking back from the last step: dh_t = grad_hs[t] + (what step t+1 sent back);
    through tanh, da_t = dh_t * (1 - h_t^2); the weights, used at every step, add up
    da_t's contributions; and step t sends da_t @ W_hh back to h_{t-1}."""
    T = x.shape[0]
    g = {"weight_ih": torch.zeros_like(w_ih), "weight_hh": torch.zeros_like(w_hh),
         "bias_ih": x.new_zeros(w_ih.shape[0]), "bias_hh": x.new_zeros(w_hh.shape[0]),
         "x": torch.zeros_like(x), "h": torch.zeros_like(hs)}
    from_later = torch.zeros_like(h0)  # (B, H): the gradient step t+1 sent back to h_t
    for t in reversed(range(T)):
        dh = grad_hs[t] + from_later
        g["h"][t] = dh
        da = dh * (1 - hs[t] ** 2)  # (B, H): through the tanh
        h_prev = hs[t - 1] if t > 0 else h0
        g["weight_ih"] += da.t() @ x[t]
        g["weight_hh"] += da.t() @ h_prev
        g["bias_ih"] += da.sum(0)
        g["x"][t] = da @ w_ih
        from_later = da @ w_hh
    g["bias_hh"] = g["bias_ih"].clone()  # both biases enter the same sum
    g["h0"] = from_later
    return g
