"""The character-level language model: Embedding -> GRU or LSTM -> Linear.

    idx (B, T) --embedding--> (T, B, E) --GRU/LSTM--> (T, B, H) --head--> logits (B, T, V)

Defaults are the tutorial's model (Embedding 256, GRU 1024, Dense over the vocabulary). The GRU
comes in the two variants Keras has: reset_after=True (what torch.nn.GRU computes, current
Keras' default) and reset_after=False (the TF1-era GRU of the tutorial's pre-trained model,
where the reset gate multiplies h *before* the recurrent matmul). The LSTM has Keras' single
bias per layer (the research benchmark's Embedding(90, 8) -> 2 x LSTM 256 -> Dense(90) has
820,522 parameters, as in TFF; torch.nn.LSTM's two biases would make it 822,570). The
recurrences themselves live in fedtext/model/recurrences.py, which runs the implementation
`Compute` names (by default the fastest exact one available). The vocabulary is not the
model's business: it maps ids to ids (`vocab_size` of them) and whoever feeds it (a task, a
checkpoint) carries the Vocab.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fedtext.data.vocab import TUTORIAL
from fedtext.model import recurrences
from fedtext.model.kernel import VARIANTS

NN_INFERENCE_ROWS = 64  # "auto" LSTMs run torch's own LSTM under no_grad from this batch size


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = TUTORIAL.size  # 86 tutorial chars + PAD + OOV
    embed_dim: int = 256  # the tutorial's Embedding(…, 256)
    hidden_size: int = 1024  # the tutorial's GRU(1024)
    num_layers: int = 1  # the tutorial uses one recurrent layer
    cell: str = "gru"  # "gru" or "lstm" (embed 8, 2 x LSTM 256 is the LEAF/McMahan benchmark)
    reset_after: bool = True  # GRU variant (False = the tutorial's pre-trained model); GRU only

    def __post_init__(self):
        if self.cell not in ("gru", "lstm"):
            raise ValueError(f"cell must be 'gru' or 'lstm', not {self.cell!r}")
        for f in ("vocab_size", "embed_dim", "hidden_size", "num_layers"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be >= 1, not {getattr(self, f)}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Compute:
    """How the recurrence is computed (not what: every choice gives the same model).

    Part of the model and client configuration, passed to where it is used, so a worker
    process, a Ray actor or a Flower node computes exactly what its config says.
    """

    impl: str = "auto"  # auto | kernel | torch | nn | reference (fedtext.model.recurrences)
    precision: str = "fp32"  # fp32 (exact) | bf16 (recurrent matmuls in bfloat16)
    kernel: str = "auto"  # C kernel variant: auto ($FEDTEXT_KERNEL, else the CPU's best) | avx512
    # | avx2 | neon | scalar (fedtext.model.kernel)

    def __post_init__(self):
        if self.impl not in recurrences.IMPLS:
            raise ValueError(f"impl must be one of {', '.join(recurrences.IMPLS)}, "
                             f"not {self.impl!r}")
        if self.precision not in recurrences.PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(recurrences.PRECISIONS)}, "
                             f"not {self.precision!r}")
        if self.kernel not in ("auto", *VARIANTS):
            raise ValueError(f"kernel must be auto or one of {', '.join(VARIANTS)}, "
                             f"not {self.kernel!r}")


def _input_projection(x, w_ih, b, table_idx=None):
    """x (T, B, In) -> x W_ih^T + b (T, B, G*H). With table_idx (T, B) given, x is the
    embedding table (V, E): Embedding and the input projection fold into one (V, G*H) lookup
    table, one small matmul over the vocabulary instead of one per token."""
    if table_idx is not None:
        return F.embedding(table_idx, torch.addmm(b, x, w_ih.t()))
    T, B = x.shape[:2]
    return torch.addmm(b, x.reshape(T * B, -1), w_ih.t()).view(T, B, -1)


class GRU(nn.Module):
    """A multi-layer GRU holding its weights in torch.nn.GRU's names and gate order [r|z|n].

    weight_ih_l{k}: (3H, In), weight_hh_l{k}: (3H, H), bias_ih_l{k}: (3H,), and, for
    reset_after=True only, bias_hh_l{k}: (3H,). (reset_after=False has one bias, as in Keras.)
    Time-major: x (T, B, In), h0 (L, B, H) -> (T, B, H), (L, B, H).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 reset_after: bool = True, init: bool = True, compute: Compute = Compute()):
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.num_layers, self.reset_after = num_layers, reset_after
        self.compute = compute
        for k in range(num_layers):
            n_in = input_size if k == 0 else hidden_size
            H = hidden_size
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(torch.empty(3 * H, n_in)))
            self.register_parameter(f"weight_hh_l{k}", nn.Parameter(torch.empty(3 * H, H)))
            self.register_parameter(f"bias_ih_l{k}", nn.Parameter(torch.zeros(3 * H)))
            if reset_after:
                self.register_parameter(f"bias_hh_l{k}", nn.Parameter(torch.zeros(3 * H)))
        if init:  # skipped when weights are about to be loaded: orthogonal init costs seconds
            self.reset_parameters()

    def reset_parameters(self):
        # Keras' defaults (glorot_uniform kernel, orthogonal recurrent kernel, zero biases):
        # they train char-RNNs well and make our from-scratch runs comparable to TFF's.
        H = self.hidden_size
        for k in range(self.num_layers):
            w_ih, w_hh = self.layer_weights(k)[:2]
            bound = math.sqrt(6.0 / (w_ih.shape[1] + 3 * H))
            with torch.no_grad():
                w_ih.uniform_(-bound, bound)
                for g in range(3):
                    nn.init.orthogonal_(w_hh[g * H:(g + 1) * H])
            for b in self.layer_weights(k)[2:]:
                if b is not None:
                    nn.init.zeros_(b)

    def layer_weights(self, k: int):
        """(weight_ih, weight_hh, bias_ih, bias_hh or None) of layer k."""
        return (getattr(self, f"weight_ih_l{k}"), getattr(self, f"weight_hh_l{k}"),
                getattr(self, f"bias_ih_l{k}"), getattr(self, f"bias_hh_l{k}", None))

    def forward(self, x: torch.Tensor, h0: torch.Tensor | None = None, *,
                table_idx: torch.Tensor | None = None):
        """x: (T, B, In) inputs, or, with `table_idx` (T, B) given, x is the embedding table (V, E)
        and layer 0 looks up `x[table_idx] @ W_ih^T + b_ih` through one (V, 3H) table."""
        T, B = table_idx.shape if table_idx is not None else x.shape[:2]
        if h0 is None:
            h0 = x.new_zeros(self.num_layers, B, self.hidden_size)
        c = self.compute
        path = recurrences.resolve(h0.device, "gru", self.reset_after, c.precision, c.impl,
                                   self.weight_hh_l0.dtype, c.kernel)
        if path.impl == "nn":
            # torch's own GRU (cuDNN on a GPU): exact for reset_after=True, fp32.
            if table_idx is not None:
                x = F.embedding(table_idx, x)  # (T, B, E)
            weights = [w for k in range(self.num_layers) for w in self.layer_weights(k)]
            out, h_n = torch._VF.gru(x, h0.contiguous(), weights, True, self.num_layers, 0.0,
                                     self.training, False, False)
            return out, h_n
        finals = []
        for k in range(self.num_layers):
            w_ih, w_hh, b_ih, b_hh = self.layer_weights(k)
            xp = _input_projection(x, w_ih, b_ih, table_idx if k == 0 else None)  # (T, B, 3H)
            x = recurrences.gru_recurrence(xp, h0[k], w_hh, b_hh, self.reset_after, c.precision,
                                           path.impl, c.kernel)  # (T, B, H)
            finals.append(x[-1])
        return x, torch.stack(finals)


class LSTM(nn.Module):
    """A multi-layer LSTM with Keras' one bias per layer, weights in torch's gate order [i|f|g|o].

    weight_ih_l{k}: (4H, In), weight_hh_l{k}: (4H, H), bias_l{k}: (4H,). Time-major:
    x (T, B, In), state (h0, c0) each (L, B, H) -> (T, B, H), (h_n, c_n).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 init: bool = True, compute: Compute = Compute()):
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.compute = compute
        H = hidden_size
        for k in range(num_layers):
            n_in = input_size if k == 0 else H
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(torch.empty(4 * H, n_in)))
            self.register_parameter(f"weight_hh_l{k}", nn.Parameter(torch.empty(4 * H, H)))
            self.register_parameter(f"bias_l{k}", nn.Parameter(torch.zeros(4 * H)))
        if init:
            self.reset_parameters()

    def reset_parameters(self):
        # Keras' LSTM defaults: glorot_uniform kernel, orthogonal recurrent kernel (one
        # orthogonal (H, 4H) matrix, as Keras draws it; ours is its transpose), zero bias but
        # 1 for the forget gate (unit_forget_bias=True), so that early training remembers.
        H = self.hidden_size
        for k in range(self.num_layers):
            w_ih, w_hh, b = self.layer_weights(k)
            bound = math.sqrt(6.0 / (w_ih.shape[1] + 4 * H))
            with torch.no_grad():
                w_ih.uniform_(-bound, bound)
                nn.init.orthogonal_(w_hh)
                b.zero_()
                b[H: 2 * H] = 1.0

    def layer_weights(self, k: int):
        """(weight_ih, weight_hh, bias) of layer k."""
        return (getattr(self, f"weight_ih_l{k}"), getattr(self, f"weight_hh_l{k}"),
                getattr(self, f"bias_l{k}"))

    def forward(self, x: torch.Tensor, state=None, *, table_idx: torch.Tensor | None = None):
        """x: (T, B, In), or the embedding table (V, E) with `table_idx` (T, B), as GRU."""
        T, B = table_idx.shape if table_idx is not None else x.shape[:2]
        L, H = self.num_layers, self.hidden_size
        h0, c0 = state if state is not None else (x.new_zeros(L, B, H), x.new_zeros(L, B, H))
        c = self.compute
        path = recurrences.resolve(h0.device, "lstm", True, c.precision, c.impl,
                                   self.weight_hh_l0.dtype, c.kernel)
        if path.impl == "kernel" and c.impl == "auto" and B >= NN_INFERENCE_ROWS and \
                not torch.is_grad_enabled():
            # Evaluation's big batches: torch's LSTM (oneDNN) forward beats the kernel there
            # (256 x 80 rows, 2 x LSTM 256: ~1.7x, BENCHMARKS.md); training's 4 rows do not.
            path = recurrences.Path("nn")
        if path.impl == "nn":
            # torch's own LSTM (cuDNN on a GPU) with b_hh = 0: the same function, exactly.
            if table_idx is not None:
                x = F.embedding(table_idx, x)  # (T, B, E)
            weights = []
            for k in range(L):
                w_ih, w_hh, b = self.layer_weights(k)
                weights += [w_ih, w_hh, b, torch.zeros_like(b)]
            out, h_n, c_n = torch._VF.lstm(x, (h0.contiguous(), c0.contiguous()), weights, True,
                                           L, 0.0, self.training, False, False)
            return out, (h_n, c_n)
        h_n, c_n = [], []
        for k in range(L):
            w_ih, w_hh, b = self.layer_weights(k)
            xp = _input_projection(x, w_ih, b, table_idx if k == 0 else None)  # (T, B, 4H)
            x, c_last = recurrences.lstm_recurrence(xp, h0[k], c0[k], w_hh, c.precision,
                                                    path.impl, c.kernel)  # (T, B, H), (B, H)
            h_n.append(x[-1])
            c_n.append(c_last)
        return x, (torch.stack(h_n), torch.stack(c_n))


class CharRNN(nn.Module):
    """Embedding -> GRU or LSTM -> Linear, over character ids.

    forward(idx, targets=None, mask=None) -> (logits (B, T, V), loss or None), nanoGPT's shape.
    run(idx, state) -> (logits, state) carries the recurrent state (text generation).
    """

    def __init__(self, config: ModelConfig = ModelConfig(), init: bool = True,
                 compute: Compute = Compute()):
        """init=False skips the (slow, for GRU 1024) initialisation: for weights about to be
        loaded from a checkpoint or broadcast by the server. `compute` picks the recurrence's
        implementation and precision."""
        super().__init__()
        self.config = c = config
        self.compute = compute
        self.embedding = nn.Embedding(c.vocab_size, c.embed_dim)
        if c.cell == "gru":
            self.rnn = GRU(c.embed_dim, c.hidden_size, c.num_layers, c.reset_after, init,
                           compute)
        else:
            self.rnn = LSTM(c.embed_dim, c.hidden_size, c.num_layers, init, compute)
        self.head = nn.Linear(c.hidden_size, c.vocab_size)
        if not init:
            return
        nn.init.uniform_(self.embedding.weight, -0.05, 0.05)  # Keras' Embedding default
        nn.init.xavier_uniform_(self.head.weight)  # Keras' Dense default
        nn.init.zeros_(self.head.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def run(self, idx: torch.Tensor, state=None):
        """idx (B, T) -> logits (B, T, V), final recurrent state (pass it back to continue):
        h (L, B, H) for a GRU, (h, c) for an LSTM."""
        idx_t = idx.t()  # (T, B): time-major is what the recurrence wants
        h, state = self.rnn(self.embedding.weight, state, table_idx=idx_t)  # (T, B, H)
        logits = self.head(h).transpose(0, 1)  # (B, T, V)
        return logits, state

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                mask: torch.Tensor | None = None):
        """Loss = mean cross-entropy over counted targets (mask; None = every target)."""
        logits, _ = self.run(idx)
        if targets is None:
            return logits, None
        loss_sum, _, count = token_stats(logits, targets, mask)
        return logits, loss_sum / count.clamp(min=1)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 state=None, banned: tuple[int, ...] = ()):
        """Sample `max_new_tokens` ids after the prompt idx (B, T). Yields (B,) id tensors one at
        a time, carrying the recurrent state: constant work per new character. `banned` ids
        (padding, say) are never sampled."""
        logits, state = self.run(idx, state)
        for _ in range(max_new_tokens):
            logits = logits[:, -1, :] / max(temperature, 1e-8)  # (B, V)
            logits[:, list(banned)] = -float("inf")
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            probs = F.softmax(logits, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
            yield nxt[:, 0]
            logits, state = self.run(nxt, state)


def token_stats(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None):
    """Sums over counted targets: (loss_sum, correct, count). The tutorial's accuracy is
    argmax == target over counted targets (FlattenedCategoricalAccuracy). mask None: all count."""
    if mask is None:
        mask = torch.ones_like(targets, dtype=torch.bool)
    mask = mask.reshape(-1).to(logits.dtype)
    flat = logits.reshape(-1, logits.size(-1))
    nll = F.cross_entropy(flat, targets.reshape(-1), reduction="none")
    loss_sum = (nll * mask).sum()
    correct = ((flat.argmax(-1) == targets.reshape(-1)).to(logits.dtype) * mask).sum()
    return loss_sum, correct.detach(), mask.sum()
