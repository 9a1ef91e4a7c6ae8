import collections

import pytest

from fedtext.errors import FedtextError
from fedtext.fl.sampling import (
    FixedSampler,
    UniformSampler,
    WeightedSampler,
    client_seed,
)

IDS = [f"client{i}" for i in range(20)]


def test_uniform_is_deterministic_in_seed_and_round():
    a = UniformSampler(IDS, 5, seed=7)
    rounds = [a.sample(r) for r in range(10)]
    # A fresh sampler (a resumed run) gives the same clients, in any order of calls.
    b = UniformSampler(IDS, 5, seed=7)
    assert [b.sample(r) for r in reversed(range(10))] == rounds[::-1]
    assert b.sample(3) == rounds[3]
    # Rounds differ from each other, and another seed gives other clients.
    assert len({tuple(r) for r in rounds}) == 10
    assert [UniformSampler(IDS, 5, seed=8).sample(r) for r in range(10)] != rounds


def test_uniform_without_replacement_and_covers_everyone():
    s = UniformSampler(IDS, 20, seed=0)
    assert sorted(s.sample(0)) == sorted(IDS)
    counts = collections.Counter(c for r in range(200) for c in UniformSampler(IDS, 3).sample(r))
    assert set(counts) == set(IDS)
    for r in range(50):
        picked = UniformSampler(IDS, 3).sample(r)
        assert len(set(picked)) == 3 and set(picked) <= set(IDS)


def test_weighted_sampler_follows_weights():
    w = [0.0] * 10 + [1.0] * 5 + [9.0] * 5  # 10 clients without data never come up
    s = WeightedSampler(IDS, 3, weights=w, seed=1)
    counts = collections.Counter(c for r in range(400) for c in s.sample(r))
    assert all(counts[c] == 0 for c in IDS[:10])
    heavy, light = sum(counts[c] for c in IDS[15:]), sum(counts[c] for c in IDS[10:15])
    assert heavy > 3 * light > 0
    for r in range(20):
        assert len(set(s.sample(r))) == 3
    assert WeightedSampler(IDS, 3, weights=w, seed=1).sample(5) == s.sample(5)


def test_fixed_sampler():
    s = FixedSampler(IDS[:3])
    assert s.sample(0) == s.sample(99) == IDS[:3]


def test_client_seeds_are_stable_and_distinct():
    seeds = {(r, i): client_seed(0, r, i) for r in range(20) for i in range(20)}
    assert len(set(seeds.values())) == len(seeds)
    assert all(0 <= s < 2**31 for s in seeds.values())
    assert client_seed(0, 3, 2) == seeds[(3, 2)] and client_seed(1, 3, 2) != seeds[(3, 2)]


def test_bad_arguments():
    with pytest.raises(FedtextError):
        UniformSampler(IDS, 21)
    with pytest.raises(FedtextError):
        UniformSampler(IDS, 0)
    with pytest.raises(FedtextError):
        UniformSampler(IDS, 2, seed=-1)
    with pytest.raises(FedtextError):
        WeightedSampler(IDS, 3, weights=[1.0] * 2 + [0.0] * 18)
    with pytest.raises(FedtextError):
        WeightedSampler(IDS, 3, weights=[1.0] * 19)
