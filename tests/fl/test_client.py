import copy
import functools
import pickle

import pytest
import torch

from fedtext.data.batching import Batch
from fedtext.errors import FedtextError
from fedtext.fl import params as P
from fedtext.fl.client import ClientConfig, ClientResult, cached_model, client_update
from fedtext.model.char_rnn import CharRNN, ModelConfig

MC = ModelConfig(vocab_size=12, embed_dim=8, hidden_size=16)


def _batch(seed, B=4, T=6, pad_rows=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 12, (B, T), generator=g)
    y = torch.randint(0, 12, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[B - pad_rows:] = False  # rows that hold no counted target (padding)
    return Batch(x, y, mask)


def _model(seed=0):
    torch.manual_seed(seed)
    return CharRNN(MC)


def _train_by_hand(model, batches, lr, mu=0.0, momentum=0.0):
    """Plain torch training on the model's own loss; returns per-batch pre-step (loss, correct)."""
    start = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    stats = []
    for b in batches:
        logits, loss = model(b.x, b.y, b.mask)
        correct = ((logits.argmax(-1) == b.y) & b.mask).sum().item()
        stats.append((loss.item(), correct))
        prox = sum(((p - s) ** 2).sum() for p, s in zip(model.parameters(), start))
        opt.zero_grad()
        (loss + mu / 2 * prox).backward()
        opt.step()
    return stats


def test_delta_and_metrics_match_plain_training():
    model = _model()
    batches = [_batch(1), _batch(2, pad_rows=1), _batch(3)]
    global_params = P.clone(model.state_dict())
    res = client_update(global_params, batches, ClientConfig(model=MC, lr=0.5), seed=0)

    stats = _train_by_hand(model, batches, lr=0.5)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(res.delta[k], global_params[k] - v, atol=1e-6, rtol=0)
    m = res.metrics
    counts = [int(b.mask.sum()) for b in batches]
    rows = [int(b.mask.any(1).sum()) for b in batches]
    assert m["count"] == sum(counts) and res.weight == float(sum(counts))
    assert m["num_examples"] == sum(rows) == 11 and m["num_batches"] == 3
    assert m["correct"] == sum(c for _, c in stats)
    assert m["loss_sum"] == pytest.approx(sum(l * c for (l, _), c in zip(stats, counts)), rel=1e-5)
    assert m["batch_loss_sum"] == pytest.approx(
        sum(l * r for (l, _), r in zip(stats, rows)), rel=1e-5)
    assert m["loss"] == pytest.approx(m["loss_sum"] / m["count"])
    assert m["accuracy"] == m["correct"] / m["count"]
    assert m["tff_loss"] == pytest.approx(m["batch_loss_sum"] / 11)
    # The first batch's loss is the *initial* model's (pre-step metrics, as TFF).
    first = client_update(global_params, batches[:1], ClientConfig(model=MC),
                          seed=0).metrics["loss"]
    assert first == pytest.approx(_model()(batches[0].x, batches[0].y, batches[0].mask)[1].item())


def test_global_params_untouched_and_no_state_leaks_between_clients():
    gp = P.clone(_model().state_dict())
    saved = P.clone(gp)
    a = client_update(gp, [_batch(1)], ClientConfig(model=MC, momentum=0.9), seed=0)
    client_update(P.scale(gp, 0.5), [_batch(2), _batch(3)], ClientConfig(model=MC, momentum=0.9), 1)
    again = client_update(gp, [_batch(1)], ClientConfig(model=MC, momentum=0.9), seed=0)
    for k in gp:
        assert torch.equal(gp[k], saved[k])
        assert torch.equal(a.delta[k], again.delta[k])
    # The delta is a fresh tensor, not a view into the reused model.
    model = cached_model(MC)
    assert all(a.delta[k].data_ptr() != p.data_ptr() for k, p in model.named_parameters())


def test_epochs_and_max_batches_per_epoch():
    gp = P.clone(_model().state_dict())
    batches = [_batch(i) for i in range(4)]
    res = client_update(gp, batches, ClientConfig(model=MC, local_epochs=3, max_batches=2), seed=0)
    assert res.metrics["num_batches"] == 6  # 2 batches (the .take(2)) in each of 3 epochs
    model = _model()
    _train_by_hand(model, batches[:2] * 3, lr=0.5)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(res.delta[k], gp[k] - v, atol=1e-6, rtol=0)


def _epoch_data(epoch, seed, calls):
    calls.append((epoch, seed))
    return iter([_batch(100 * seed + epoch)])


def test_callable_client_data_gets_epoch_and_seed():
    calls = []
    data = functools.partial(_epoch_data, calls=calls)
    res = client_update(P.clone(_model().state_dict()), data,
                        ClientConfig(model=MC, local_epochs=2), 7)
    assert calls == [(0, 7), (1, 7)] and res.metrics["num_batches"] == 2


def test_fedprox_adds_proximal_gradient():
    batches = [_batch(1), _batch(2), _batch(3)]
    gp = P.clone(_model().state_dict())
    res = client_update(gp, batches, ClientConfig(model=MC, lr=0.5, prox_mu=0.3), seed=0)
    plain = client_update(gp, batches, ClientConfig(model=MC, lr=0.5), seed=0)
    model = _model()
    _train_by_hand(model, batches, lr=0.5, mu=0.3)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(res.delta[k], gp[k] - v, atol=1e-6, rtol=0)
    assert P.global_norm(P.sub(res.delta, plain.delta)) > 1e-4  # mu changed the result


@pytest.mark.parametrize("cfg", [
    ClientConfig(model=MC, optimizer="adam", lr=0.01),
    ClientConfig(model=MC, optimizer="adagrad", lr=0.1),
])
def test_other_optimizers_train(cfg):
    gp = P.clone(_model().state_dict())
    batches = [_batch(1)] * 5
    res = client_update(gp, batches, cfg, seed=0)
    assert all(torch.isfinite(d).all() and d.dtype == torch.float32 for d in res.delta.values())
    assert P.global_norm(res.delta) > 0
    after = client_update(P.sub(gp, res.delta), batches[:1], ClientConfig(model=MC), 0)
    assert after.metrics["loss"] < res.metrics["loss"]  # training on one batch lowers its loss


def _float64_works() -> bool:
    """Does the model train in float64 here (same gradients as float32)?"""
    grads = []
    for dtype in (torch.float32, torch.float64):
        m = _model().to(dtype)
        b = _batch(1)
        m(b.x, b.y, b.mask)[1].backward()
        grads.append(torch.cat([p.grad.reshape(-1).float() for p in m.parameters()]))
    return torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-3)


@pytest.mark.skipif(not _float64_works(), reason="float64 gradients differ from float32 in this "
                    "build: fedtext.gru's C kernel is float32-only and needs a float64 fallback")
def test_float64_precision_agrees_with_float32():
    gp = P.clone(_model().state_dict())
    batches = [_batch(1), _batch(2)]
    r32 = client_update(gp, batches, ClientConfig(model=MC), seed=0)
    r64 = client_update(gp, batches, ClientConfig(model=MC, dtype="float64"), seed=0)
    for k in gp:
        assert r64.delta[k].dtype == torch.float32
        torch.testing.assert_close(r64.delta[k], r32.delta[k], atol=1e-5, rtol=1e-4)


def test_empty_client_has_zero_delta_and_weight():
    gp = P.clone(_model().state_dict())
    res = client_update(gp, [], ClientConfig(model=MC), seed=0)
    assert res.weight == 0.0 and res.metrics["num_batches"] == 0
    assert P.global_norm(res.delta) == 0.0


def test_wrong_params_are_reported():
    gp = P.clone(_model().state_dict())
    del gp["head.bias"]
    with pytest.raises(FedtextError, match="head.bias"):
        client_update(gp, [_batch(1)], ClientConfig(model=MC), seed=0)


def test_everything_pickles():
    cfg = ClientConfig(model=MC, prox_mu=0.1)
    assert pickle.loads(pickle.dumps(client_update)) is client_update
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    res = client_update(P.clone(_model().state_dict()), [_batch(1)], cfg, seed=0)
    back = pickle.loads(pickle.dumps(res))
    assert isinstance(back, ClientResult) and back.metrics == res.metrics


@pytest.mark.parametrize("kwargs", [
    dict(optimizer="rmsprop"), dict(dtype="float16"), dict(local_epochs=0),
    dict(max_batches=0), dict(lr=0.0), dict(prox_mu=-1.0), dict(optimizer="adam", momentum=0.9),
    dict(lr=float("inf")), dict(lr=float("nan")),
])
def test_config_validation(kwargs):
    with pytest.raises(FedtextError):
        ClientConfig(model=MC, **kwargs)


def test_building_the_cached_model_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    cached_model(ModelConfig(vocab_size=7, embed_dim=3, hidden_size=5))
    assert torch.equal(torch.rand(3), expected)
    assert copy.deepcopy(MC) == MC
