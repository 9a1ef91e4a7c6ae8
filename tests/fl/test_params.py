import pytest
import torch

from fedtext.fl import params as P


def _p(a, b):
    return {"w": torch.tensor(a, dtype=torch.float64), "b": torch.tensor(b, dtype=torch.float64)}


def test_elementwise_ops_are_exact_and_pure():
    a, b = _p([1.0, 2.0], [3.0]), _p([0.5, -1.0], [1.0])
    a0 = P.clone(a)
    assert P.add(a, b)["w"].tolist() == [1.5, 1.0] and P.add(a, b)["b"].tolist() == [4.0]
    assert P.sub(a, b)["w"].tolist() == [0.5, 3.0] and P.sub(a, b)["b"].tolist() == [2.0]
    assert P.scale(a, 2.0)["w"].tolist() == [2.0, 4.0]
    assert P.zeros_like(a)["w"].tolist() == [0.0, 0.0]
    assert P.full_like(a, 0.1)["b"].tolist() == [0.1]
    for k in a:  # nothing wrote into the inputs
        assert torch.equal(a[k], a0[k])


def test_clone_does_not_alias():
    a = _p([1.0], [2.0])
    c = P.clone(a)
    c["w"].add_(1.0)
    assert a["w"].item() == 1.0


def test_weighted_mean():
    ps = [_p([1.0, 0.0], [4.0]), _p([-1.0, 2.0], [0.0])]
    m = P.weighted_mean(ps, [3.0, 1.0])  # (3 * p0 + 1 * p1) / 4
    assert m["w"].tolist() == [0.5, 0.5] and m["b"].tolist() == [3.0]
    assert ps[0]["w"].tolist() == [1.0, 0.0]  # inputs untouched
    assert P.weighted_mean(ps, [0.0, 2.0])["b"].tolist() == [0.0]


@pytest.mark.parametrize("weights", [[0.0, 0.0], [1.0, -1.0], [1.0]])
def test_weighted_mean_rejects_bad_weights(weights):
    with pytest.raises(ValueError):
        P.weighted_mean([_p([1.0], [1.0]), _p([2.0], [2.0])], weights)


def test_global_norm_and_clip():
    a = _p([3.0, 0.0], [4.0])  # norm 5
    assert P.global_norm(a) == 5.0
    clipped, norm = P.clip_by_global_norm(a, 1.0)
    assert norm == 5.0
    assert clipped["w"].tolist() == pytest.approx([0.6, 0.0], abs=1e-15)
    assert clipped["b"].tolist() == pytest.approx([0.8], abs=1e-15)
    same, norm = P.clip_by_global_norm(a, 10.0)
    assert norm == 5.0 and same["b"].tolist() == [4.0]
    zero, norm = P.clip_by_global_norm(P.zeros_like(a), 1.0)
    assert norm == 0.0 and zero["w"].tolist() == [0.0, 0.0]


def test_flatten_unflatten_round_trip():
    a = {"m": torch.arange(6.0).view(2, 3), "v": torch.tensor([7.0])}
    vec = P.flatten(a)
    assert vec.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 7.0]
    back = P.unflatten(vec, a)
    assert list(back) == ["m", "v"] and torch.equal(back["m"], a["m"])
    with pytest.raises(ValueError):
        P.unflatten(vec[:-1], a)


def test_assert_same_structure():
    a = _p([1.0], [2.0])
    P.assert_same_structure(a, P.zeros_like(a))
    with pytest.raises(ValueError, match="missing"):
        P.assert_same_structure(a, {"w": a["w"]})
    with pytest.raises(ValueError, match="shape"):
        P.assert_same_structure(a, {"w": torch.zeros(2), "b": a["b"]})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_names_each_tensor_with_a_nan_or_an_inf(dtype, bad):
    p = {"a": torch.zeros(3, 4, dtype=dtype), "b": torch.ones(1000, dtype=dtype),
         "empty": torch.zeros(0, dtype=dtype), "steps": torch.tensor([3, 4])}
    assert P.nonfinite(p) == []
    p["b"][517] = bad
    assert P.nonfinite(p) == ["b"]
    p["a"][2, 1] = bad
    assert P.nonfinite(p) == ["a", "b"]
    big = {"w": torch.full((10,), torch.finfo(dtype).max, dtype=dtype)}  # finite, however big
    assert P.nonfinite(big) == []
