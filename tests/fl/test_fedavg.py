"""fed_avg: exact numbers on a one-parameter toy, equivalence with central SGD, the contract."""

import copy

import pytest
import torch

from fedtext.backends.base import SequentialBackend
from fedtext.data.batching import Batch
from fedtext.errors import FedtextError
from fedtext.fl import aggregators
from fedtext.fl import params as P
from fedtext.fl.algorithm import ServerState, fed_avg
from fedtext.fl.client import ClientConfig, ClientResult
from fedtext.fl.sampling import client_seed
from fedtext.fl.server_optimizers import adam, sgd
from fedtext.model.char_rnn import CharRNN, ModelConfig


def toy_client(global_params, client_data, config, seed):
    """One parameter w, loss (w - y)^2 / 2 per example, one SGD step of lr `config` per example.

    client_data: the targets y. Each example counts as 10 "tokens"."""
    w = global_params["w"].clone()
    for y in client_data:
        w = w - config * (w - y)
    n = len(client_data)
    metrics = {"loss_sum": 1.0 * n, "correct": n, "count": 10 * n, "num_examples": n,
               "num_batches": n, "batch_loss_sum": 2.0 * n, "seed": seed}
    return ClientResult({"w": global_params["w"] - w}, float(10 * n), metrics)


# Client A: y = 3 three times from w = 1, lr 0.5: w = 2, 2.5, 2.75 -> delta = 1 - 2.75 = -1.75.
# Client B: y = -1 once: w = 1 - 0.5 * 2 = 0 -> delta = 1.
CLIENTS = [("A", [3.0, 3.0, 3.0]), ("B", [-1.0])]


def _toy(**kwargs):
    return fed_avg(0.5, client_fn=toy_client, **kwargs)


def _w(v):
    return {"w": torch.tensor([v], dtype=torch.float64)}


@pytest.mark.parametrize("weighting,expected", [
    ("examples", 2.0625),  # weights 3 : 1 -> mean delta (3 * -1.75 + 1) / 4 = -1.0625
    ("tokens", 2.0625),  # 30 : 10, the same ratio
    ("uniform", 1.375),  # (-1.75 + 1) / 2 = -0.375
    (lambda m: m["num_examples"] ** 2, 2.475),  # 9 : 1 -> (9 * -1.75 + 1) / 10 = -1.475
])
def test_fedavg_toy_exact(weighting, expected):
    algorithm = _toy(weighting=weighting)
    state, metrics = algorithm.apply(algorithm.init(_w(1.0)), CLIENTS)
    assert state.params["w"].item() == pytest.approx(expected, abs=1e-15)
    assert state.round == 1 and metrics["round"] == 0
    assert metrics["delta_norm"] == pytest.approx(expected - 1.0, abs=1e-15)


def test_fedavgm_toy_two_rounds_exact():
    algorithm = _toy(server_optimizer=sgd(lr=1.0, momentum=0.5), weighting="examples")
    state = algorithm.init(_w(1.0))
    state, _ = algorithm.apply(state, CLIENTS)
    # Round 1: v = -1.0625, w = 1 + 1.0625 = 2.0625.
    assert state.params["w"].item() == 2.0625
    state, _ = algorithm.apply(state, CLIENTS)
    # Round 2 from w = 2.0625. A: 2.53125, 2.765625, 2.8828125 -> delta -0.8203125.
    # B: 2.0625 - 0.5 * 3.0625 = 0.53125 -> delta 1.53125.
    # mean = (3 * -0.8203125 + 1.53125) / 4 = -0.232421875; v = 0.5 * -1.0625 - 0.232421875.
    assert state.opt_state.momentum["w"].item() == -0.763671875
    assert state.params["w"].item() == 2.0625 + 0.763671875
    assert state.round == 2


def test_round_metrics_pool_sums_and_list_clients():
    algorithm = _toy(seed=5)
    state, m = algorithm.apply(algorithm.init(_w(1.0)), CLIENTS)
    assert m["train_loss"] == 4.0 / 40 and m["train_accuracy"] == 4 / 40
    assert m["train_tff_loss"] == 8.0 / 4
    assert (m["num_examples"], m["num_batches"], m["chars"], m["clients"]) == (4, 4, 40, 2)
    assert [c["client_id"] for c in m["client_metrics"]] == ["A", "B"]
    assert [c["weight"] for c in m["client_metrics"]] == [30.0, 10.0]
    # Per-client seeds come from (seed, round, position): the same on every backend.
    assert [c["seed"] for c in m["client_metrics"]] == [client_seed(5, 0, 0), client_seed(5, 0, 1)]
    _, m2 = algorithm.apply(state, CLIENTS)
    assert m2["client_metrics"][0]["seed"] == client_seed(5, 1, 0)


def test_state_is_a_value():
    params = _w(1.0)
    algorithm = _toy(server_optimizer=adam(lr=0.1))
    state = algorithm.init(params)
    params["w"].fill_(100.0)  # the caller's tensors are not the server's
    assert state.params["w"].item() == 1.0
    saved = copy.deepcopy(state)
    new, _ = algorithm.apply(state, CLIENTS)
    assert state.params["w"].item() == 1.0 and state.opt_state.count == 0
    assert saved.opt_state.count == 0 and new.opt_state.count == 1
    # Same state in, same state out.
    again, _ = algorithm.apply(saved, CLIENTS)
    assert again.params["w"].item() == new.params["w"].item()
    assert isinstance(new, ServerState) and new.agg_state.rounds == 1


class RecordingBackend(SequentialBackend):
    def __init__(self):
        super().__init__()
        self.calls = []

    def map(self, fn, jobs, shared=None, timeout=None):
        self.calls.append((fn, list(jobs), shared))
        return super().map(fn, jobs, shared, timeout)


def test_backend_gets_one_shared_payload_per_round():
    backend = RecordingBackend()
    algorithm = _toy(backend=backend)
    state = algorithm.init(_w(1.0))
    algorithm.apply(state, CLIENTS)
    fn, jobs, shared = backend.calls[0]
    assert fn is toy_client and shared["global_params"] is state.params and shared["config"] == 0.5
    assert [j["client_data"] for j in jobs] == [c for _, c in CLIENTS]


def test_errors():
    algorithm = _toy()
    state = algorithm.init(_w(1.0))
    with pytest.raises(FedtextError, match="at least one client"):
        algorithm.apply(state, [])
    with pytest.raises(FedtextError, match="round 1: every client has weight 0"):
        _toy(weighting=lambda m: 0.0).apply(state, CLIENTS)
    with pytest.raises(FedtextError, match="weighting"):
        _toy(weighting="sequences")


MC = ModelConfig(vocab_size=12, embed_dim=8, hidden_size=16)


def _batch(seed, B=4, T=7):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) > 0.3
    return Batch(torch.randint(0, 12, (B, T), generator=g),
                 torch.randint(0, 12, (B, T), generator=g), mask)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_one_client_one_step_equals_central_sgd(cell):
    mc = ModelConfig(vocab_size=12, embed_dim=8, hidden_size=16, cell=cell)
    torch.manual_seed(0)
    model = CharRNN(mc)
    batch = _batch(1)
    init = P.clone(model.state_dict())
    algorithm = fed_avg(ClientConfig(model=mc, lr=0.5), sgd(lr=1.0))
    state, metrics = algorithm.apply(algorithm.init(model.state_dict()), [("only", [batch])])

    _, loss = model(batch.x, batch.y, batch.mask)  # the central step on the same batch
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(state.params[k], v, atol=1e-6, rtol=0)
    assert P.global_norm(P.sub(state.params, init)) > 1e-2  # the step did move the model
    assert metrics["train_loss"] == pytest.approx(loss.item(), rel=1e-6)


def test_two_clients_fedavg_is_weighted_mean_of_client_models():
    torch.manual_seed(0)
    model = CharRNN(MC)
    clients = [("a", [_batch(1), _batch(2)]), ("b", [_batch(3)])]
    locals_, tokens = [], []
    for _, batches in clients:  # train each client from the global model by hand
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        for b in batches:
            opt.zero_grad()
            m(b.x, b.y, b.mask)[1].backward()
            opt.step()
        locals_.append(m.state_dict())
        tokens.append(sum(int(b.mask.sum()) for b in batches))
    algorithm = fed_avg(ClientConfig(model=MC, lr=0.5))  # default: server sgd(1.0), token weights
    state, metrics = algorithm.apply(algorithm.init(model.state_dict()), clients)
    expected = P.weighted_mean(locals_, tokens)
    for k in expected:
        torch.testing.assert_close(state.params[k], expected[k], atol=1e-6, rtol=0)
    assert metrics["chars"] == sum(tokens) and metrics["num_batches"] == 3


def test_norm_bound_plugs_in():
    torch.manual_seed(0)
    params = CharRNN(MC).state_dict()
    algorithm = fed_avg(ClientConfig(model=MC, lr=0.5), aggregator=aggregators.mean(1e-3))
    state, metrics = algorithm.apply(algorithm.init(params), [("a", [_batch(1)])])
    assert metrics["delta_norm"] == pytest.approx(1e-3, rel=1e-4)
    assert state.agg_state.clipped == 1


def test_docstring_examples_run():
    import doctest

    from fedtext.data import vocab
    from fedtext.fl import algorithm, server_optimizers

    for mod in (algorithm, server_optimizers, aggregators, vocab):
        result = doctest.testmod(mod)
        assert result.attempted > 0 and result.failed == 0, mod.__name__


class ReversedBackend(SequentialBackend):
    """Finishes the jobs last to first, as a parallel backend might."""

    def map(self, fn, jobs, shared=None, timeout=None):
        return reversed(list(super().map(fn, jobs, shared, timeout)))


def test_results_are_aggregated_in_client_order_whatever_the_arrival_order():
    torch.manual_seed(0)
    params = CharRNN(MC).state_dict()
    clients = [(c, [_batch(i)]) for i, c in enumerate("abcde")]
    seen = []
    a = fed_avg(ClientConfig(model=MC, lr=0.5))
    b = fed_avg(ClientConfig(model=MC, lr=0.5), backend=ReversedBackend())
    sa, ma = a.apply(a.init(params), clients)
    sb, mb = b.apply(b.init(params), clients, on_result=lambda i, r: seen.append(i))
    assert seen == [4, 3, 2, 1, 0]  # progress hears of each client as it finishes
    for k in sa.params:
        assert torch.equal(sa.params[k], sb.params[k])  # bit for bit
    assert [c["client_id"] for c in mb["client_metrics"]] == list("abcde")
    assert ma["train_loss"] == mb["train_loss"]


def test_client_lr_schedule_sets_each_rounds_rate():
    from fedtext.fl.schedules import ScheduleConfig, schedule

    lr = schedule(ScheduleConfig(kind="step", step_every=1, step_factor=0.5), 1.0, 10)
    cfg = ClientConfig(model=MC, lr=1.0)
    torch.manual_seed(0)
    params = CharRNN(MC).state_dict()
    algo = fed_avg(cfg, client_lr=lr)
    state = algo.init(params)
    rates = []
    for _ in range(3):
        state, m = algo.apply(state, [("a", [_batch(1)])])
        rates.append(m["client_lr"])
    assert rates == [1.0, 0.5, 0.25]
