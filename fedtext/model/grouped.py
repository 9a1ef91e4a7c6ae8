"""G CharRNNs of one architecture in one forward pass: every weight has a leading client dim G.

    W = stack(params, G)                                  # {name: (G, *shape)}
    logits = grouped_forward(W, x, config)                # x (G, B, T) -> (G, T, B, V)

Client g's logits are exactly CharRNN(config) with weights W[name][g] on x[g] (up to float
rounding: the same equations, summed in another order). Every matmul of CharRNN becomes a
batched one over the clients (torch.bmm / baddbmm); the embedding lookup is one F.embedding
into the G stacked lookup tables (client g's ids are offset by g * V). No custom autograd
Function: the recurrences below are model/recurrences.py's "reference" equations written
over (G, B, H) states, step by step, and autograd differentiates them. Because the clients
share no weight, the gradient of sum_g loss_g with respect to W[name][g] is client g's own
gradient, which is how fedtext.fl.batched trains a round's clients together on a GPU.

    idx (G, B, T) --lookup--> xp (G, T, B, 3H|4H) --GRU/LSTM--> (G, T, B, H) --head--> (G, T, B, V)

Layout (G, T, B, .): client first, so every matmul outside the time loop is one bmm over
(G, T*B, .) rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedtext.model.char_rnn import ModelConfig


def stack(params: dict[str, torch.Tensor], G: int) -> dict[str, torch.Tensor]:
    """G copies of one model's params, as fresh (G, *shape) tensors."""
    return {k: v.detach().unsqueeze(0).expand(G, *v.shape).clone() for k, v in params.items()}


def grouped_gru(xp: torch.Tensor, h0: torch.Tensor, w_hh: torch.Tensor,
                b_hh: torch.Tensor | None, reset_after: bool = True) -> torch.Tensor:
    """All hidden states (G, T, B, H) of G GRUs over input projections xp (G, T, B, 3H).

    h0 (G, B, H); w_hh (G, 3H, H) in torch's gate order [r|z|n]; b_hh (G, 3H), or None for
    reset_after=False. recurrences.reference_recurrence, with h @ W^T as a bmm per step.
    """
    H = h0.shape[-1]
    w_t = w_hh.transpose(1, 2)  # (G, H, 3H): h (G, B, H) @ w_t -> (G, B, 3H)
    h, out = h0, []
    # unbind, not xp[:, t]: the backward of T slices would fill T full-size zero gradients
    for x_t in xp.unbind(1):
        x_rz, x_n = x_t[..., : 2 * H], x_t[..., 2 * H:]  # (G, B, 2H), (G, B, H)
        if reset_after:
            g = torch.baddbmm(b_hh.unsqueeze(1), h, w_t)  # h W_hh^T + b_hh: (G, B, 3H)
            r, z = torch.sigmoid(x_rz + g[..., : 2 * H]).chunk(2, dim=-1)  # one kernel for both
            n = torch.tanh(x_n + r * g[..., 2 * H:])
        else:  # r multiplies h before the candidate's matmul (the TF1-era Keras GRU)
            r, z = torch.sigmoid(x_rz + torch.bmm(h, w_t[..., : 2 * H])).chunk(2, dim=-1)
            n = torch.tanh(x_n + torch.bmm(r * h, w_t[..., 2 * H:]))
        h = (1 - z) * n + z * h
        out.append(h)
    return torch.stack(out, dim=1)


def grouped_lstm(xp: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
                 w_hh: torch.Tensor) -> torch.Tensor:
    """All hidden states (G, T, B, H) of G LSTMs over xp (G, T, B, 4H) (bias included).

    w_hh (G, 4H, H), gates [i|f|g|o]; recurrences.reference_lstm with a bmm per step.
    """
    w_t = w_hh.transpose(1, 2)  # (G, H, 4H)
    h, c, out = h0, c0, []
    for x_t in xp.unbind(1):  # (G, B, 4H) per step (see grouped_gru)
        i, f, g, o = (x_t + torch.bmm(h, w_t)).chunk(4, dim=-1)  # (G, B, H) each
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        out.append(h)
    return torch.stack(out, dim=1)


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x (G, N, In) @ w^T + b for w (G, Out, In), b (G, Out) -> (G, N, Out)."""
    return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))


def grouped_forward(W: dict[str, torch.Tensor], x: torch.Tensor,
                    config: ModelConfig) -> torch.Tensor:
    """Logits (G, T, B, V) of G CharRNN(config) models, client g's weights W[name][g], on its
    ids x[g] (x: (G, B, T) int64). Note the time-major output: client g's CharRNN logits
    (B, T, V) are out[g].transpose(0, 1).

    Layer 0 folds Embedding and W_ih into one (V, 3H) table per client, as CharRNN.run does.
    """
    G, B, T = x.shape
    V, H, L = config.vocab_size, config.hidden_size, config.num_layers
    gru = config.cell == "gru"
    h0 = W["head.weight"].new_zeros(G, B, H)
    # Client g's ids index rows g*V .. g*V + V-1 of the stacked tables (ids must be < V: the
    # caller checks them, or a bad id would read another client's table).
    idx = x.transpose(1, 2) + torch.arange(G, device=x.device).view(G, 1, 1) * V  # (G, T, B)
    hs = None
    for k in range(L):
        w_ih, w_hh = W[f"rnn.weight_ih_l{k}"], W[f"rnn.weight_hh_l{k}"]
        b_in = W[f"rnn.bias_ih_l{k}"] if gru else W[f"rnn.bias_l{k}"]
        if k == 0:
            table = _linear(W["embedding.weight"], w_ih, b_in)  # (G, V, 3H|4H)
            xp = F.embedding(idx, table.reshape(G * V, -1))  # (G, T, B, 3H|4H)
        else:
            xp = _linear(hs.reshape(G, T * B, H), w_ih, b_in).view(G, T, B, -1)
        if gru:
            hs = grouped_gru(xp, h0, w_hh, W.get(f"rnn.bias_hh_l{k}"), config.reset_after)
        else:
            hs = grouped_lstm(xp, h0, h0, w_hh)
    logits = _linear(hs.reshape(G, T * B, H), W["head.weight"], W["head.bias"])  # (G, TB, V)
    return logits.view(G, T, B, V)
