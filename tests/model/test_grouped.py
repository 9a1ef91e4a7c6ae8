"""The grouped CharRNN (fedtext.model.grouped): G models in one pass == each model on its own."""

import pytest
import torch

from fedtext.model.char_rnn import CharRNN, Compute, ModelConfig
from fedtext.model.grouped import grouped_forward, stack

CONFIGS = [ModelConfig(vocab_size=12, embed_dim=8, hidden_size=16, num_layers=L, cell=cell,
                       reset_after=ra)
           for cell, ra, L in (("gru", True, 1), ("gru", True, 2), ("gru", False, 2),
                               ("lstm", True, 1), ("lstm", True, 2))]


@pytest.mark.parametrize("mc", CONFIGS, ids=lambda c: f"{c.cell}-{c.reset_after}-{c.num_layers}")
@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_logits_and_grads_equal_charrnn(mc, impl):
    G = 3
    models = []
    for g in range(G):  # different weights per client
        torch.manual_seed(g)
        models.append(CharRNN(mc, compute=Compute(impl=impl)).double())
    names = [k for k, _ in models[0].named_parameters()]
    W = {k: torch.stack([dict(m.named_parameters())[k].detach() for m in models])
         .requires_grad_() for k in names}
    x = torch.randint(0, 12, (G, 4, 7))
    out = grouped_forward(W, x, mc)  # (G, T, B, V)
    assert out.shape == (G, 7, 4, 12)
    out.square().sum().backward()
    for g, m in enumerate(models):
        logits, _ = m(x[g])
        logits.square().sum().backward()
        torch.testing.assert_close(out[g].transpose(0, 1), logits, rtol=1e-12, atol=1e-12)
        for k, p in m.named_parameters():
            torch.testing.assert_close(W[k].grad[g], p.grad, rtol=1e-10, atol=1e-12)


def test_stack_copies():
    p = {"a": torch.ones(2, 3)}
    s = stack(p, 4)
    assert s["a"].shape == (4, 2, 3)
    s["a"][0] += 1
    assert p["a"].sum() == 6 and s["a"][1].sum() == 6
