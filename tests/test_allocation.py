import numpy as np
import pytest

from micik_tf.compression import allocation as alloc


def _layer(name, m, n, errors, **kw):
    return alloc.LayerBudget(name, m, n, "input", errors, **kw)


def _geometric(decay, length):
    # Relative squared error after r ranks for a spectrum s_i^2 ~ decay^i.
    energy = decay ** np.arange(length)
    tail = np.concatenate([[energy.sum()], energy.sum() - np.cumsum(energy)])
    return tail / energy.sum()


def test_budget_is_respected_and_spent():
    layers = [_layer(f"l{i}", 100, 100, {0: _geometric(0.9, 50)}) for i in range(3)]
    group = alloc.GroupBudget("g", 100, layers, [0])
    for budget in (3000, 6000, 12000):
        result = alloc.allocate_ranks([group], budget)
        assert result.cost <= budget
        assert result.cost >= budget - 200  # a unique rank costs m + n = 200


def test_balances_relative_errors():
    # A wide and a narrow layer with the same spectrum shape get ranks in
    # proportion to what a rank buys, not all to one layer.
    wide = _layer("wide", 1000, 1000, {0: _geometric(0.8, 60)})
    narrow = _layer("narrow", 50, 50, {0: _geometric(0.8, 25)})
    result = alloc.allocate_ranks([alloc.GroupBudget("g", 1000, [wide, narrow], [0])], 30000)
    assert result.layers["wide"][1] >= 8 and result.layers["narrow"] != (0, 1)


def test_min_rank_and_infeasible_budget():
    layer = _layer("l", 100, 100, {0: _geometric(0.5, 40)}, min_rank=6)
    group = alloc.GroupBudget("g", 100, [layer], [0])
    result = alloc.allocate_ranks([group], 100 * 200)
    assert result.layers["l"] == alloc.DENSE or result.layers["l"][1] >= 6
    assert alloc.minimum_cost([group]) == 6 * 200
    with pytest.raises(ValueError, match="below the smallest allocation"):
        alloc.allocate_ranks([group], 5 * 200)


def test_common_rank_zero_when_sharing_does_not_pay():
    # A basis helps nothing (same curves with and without it) and costs m*r_c.
    curves = {0: _geometric(0.9, 40), 8: _geometric(0.9, 40)}
    layers = [_layer(f"l{i}", 100, 100, dict(curves)) for i in range(2)]
    result = alloc.allocate_ranks([alloc.GroupBudget("g", 100, layers, [0, 8])], 6000)
    assert result.rank_common["g"] == 0


def test_common_rank_chosen_when_sharing_pays():
    # With the basis, the residual is tiny: sharing wins.
    curves = {0: _geometric(0.9, 40), 8: 0.01 * _geometric(0.5, 40)}
    layers = [_layer(f"l{i}", 100, 100, dict(curves)) for i in range(4)]
    result = alloc.allocate_ranks([alloc.GroupBudget("g", 100, layers, [0, 8])], 8000)
    assert result.rank_common["g"] == 8
    assert all(choice[0] == 8 for choice in result.layers.values())
