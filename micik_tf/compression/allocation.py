"""Rank allocation: spend a parameter budget across groups and layers.

The allocator minimises a sum over layers of a cost of each layer's
*relative* squared error `e` (weight error, or output error with calibration
data). Two costs (`OBJECTIVES`):

- `"log_energy"` (the default): `-log(1 - e)`, minus the log of the energy the
  layer retains, so the allocator maximises the product of the retained
  energies (Zhang et al. 2015, "Accelerating Very Deep Convolutional
  Networks", select ranks by that product). The cost grows without bound as a
  layer loses all its energy, so no layer is starved to rank 1 to make
  another slightly better: the failure measured in MICIK.md sections 2 and 5.
- `"sum_error"`: `e` itself. Spending ranks where a rank is cheap is what it
  rewards, which starves wide layers at high ratios; kept for comparison.

A minimum rank per layer is kept in both.

It solves the Lagrangian relaxation `min sum_l c(e_l) + lambda * cost` (`c`
the layer cost above) exactly per group for a given `lambda`, finds the smallest `lambda` whose solution fits the
budget by bisection, then greedily spends what is left. Per group it picks the
common rank `r_c` among candidates that include 0, so sharing is used only
where it pays; each layer may still opt out of the group's basis, or stay
dense when factorizing it would not save anything.
"""

import dataclasses
import math

import numpy as np

DENSE = "dense"
OBJECTIVES = ("log_energy", "sum_error")
# The smallest retained energy the log-energy cost distinguishes: a layer
# that keeps less costs as much as one that keeps this.
_MIN_RETAINED = 1e-6


def layer_cost(relative_errors, objective):
    """The allocator's cost of relative squared errors (an array) under
    `objective` (one of `OBJECTIVES`)."""
    errors = np.asarray(relative_errors, dtype=np.float64)
    if objective == "sum_error":
        return errors
    return -np.log(np.maximum(1.0 - errors, _MIN_RETAINED))


@dataclasses.dataclass
class LayerBudget:
    """What the allocator needs to know about one compressible layer.

    Attributes:
        name: the layer's name (path).
        m, n: the kernel matrix shape.
        side: `"input"` or `"output"`: which side the group's basis spans.
        errors: `{r_c: array}` with the allocator's cost (`layer_cost` of the
            relative squared error) for `r_u = 0, 1, ...` on top of a common
            part of rank `r_c`.
        min_rank: the smallest total rank `r_c + r_u` the layer may get (0:
            the layer may keep no low-rank part, only a sparse one).
        unique: whether the layer may have a unique part.
        allow_dense: whether the layer may stay uncompressed.
    """

    name: str
    m: int
    n: int
    side: str
    errors: dict
    min_rank: int = 1
    unique: bool = True
    allow_dense: bool = True

    @property
    def dense_cost(self):
        return self.m * self.n

    @property
    def unique_cost(self):
        return self.m + self.n

    def coefficient_cost(self, rank_common):
        return rank_common * (self.n if self.side == "input" else self.m)

    def options(self, rank_common):
        """`(costs, errors, unique ranks)` of the factored choices at `r_c`."""
        errors = self.errors[rank_common]
        ranks = np.arange(len(errors))
        # Rank 0 (a zero kernel) only where a sparse part stands beside it.
        low = max(self.min_rank - rank_common, 0 if rank_common or not self.min_rank else 1)
        high = len(errors) - 1 if self.unique else 0
        keep = (ranks >= low) & (ranks <= high)
        costs = self.coefficient_cost(rank_common) + ranks * self.unique_cost
        return costs[keep], errors[keep], ranks[keep]


@dataclasses.dataclass
class GroupBudget:
    """A group of layers that may share one basis.

    Attributes:
        name: the group's name.
        basis_size: parameters of the basis per unit of common rank (`m` for
            input-side sharing, `n` for output-side).
        layers: the members' `LayerBudget`s.
        candidates: the common ranks to consider (0 means no sharing).
    """

    name: str
    basis_size: int
    layers: list
    candidates: list


@dataclasses.dataclass
class Allocation:
    """The allocator's answer.

    Attributes:
        rank_common: `{group name: r_c}` (0 where the group shares nothing).
        layers: `{layer name: DENSE or (r_c, r_u)}`; a layer's `r_c` is its
            group's or 0 if it does not use the basis.
        cost: parameters of the compressible part (basis, coefficients,
            unique factors, dense kernels), biases excluded.
        error: the objective, the sum of the layers' costs.
    """

    rank_common: dict
    layers: dict
    cost: int
    error: float


def _best_layer_choice(layer, rank_common, lam):
    """Cheapest `error + lam * cost` choice of one layer, given the group's r_c."""
    best = (0.0 + lam * layer.dense_cost, DENSE, layer.dense_cost, 0.0) if layer.allow_dense else None
    for rc in {0, rank_common}:
        if rc not in layer.errors:
            continue
        costs, errors, ranks = layer.options(rc)
        if not len(costs):
            continue
        objective = errors + lam * costs
        i = int(np.argmin(objective))
        if best is None or objective[i] < best[0]:
            best = (objective[i], (rc, int(ranks[i])), int(costs[i]), float(errors[i]))
    return best


def _solve(groups, lam):
    """The Lagrangian solution at `lam`: per group, the best r_c and choices."""
    rank_common, choices, cost, error = {}, {}, 0, 0.0
    for group in groups:
        best = None
        for rc in group.candidates:
            picks = [_best_layer_choice(layer, rc, lam) for layer in group.layers]
            if any(p is None for p in picks):
                continue
            uses_basis = rc > 0 and any(p[1] != DENSE and p[1][0] == rc for p in picks)
            if rc > 0 and not uses_basis:
                continue
            shared = group.basis_size * rc
            total = sum(p[0] for p in picks) + lam * shared
            if best is None or total < best[0]:
                best = (total, rc, picks, shared)
        if best is None:
            raise ValueError(f"Group '{group.name}' has no feasible choice.")
        _, rc, picks, shared = best
        rank_common[group.name] = rc
        cost += shared
        for layer, pick in zip(group.layers, picks):
            choices[layer.name] = pick[1]
            cost += pick[2]
            error += pick[3]
    return Allocation(rank_common, choices, int(cost), float(error))


def minimum_cost(groups):
    """The fewest parameters any allocation can use (every layer at its floor)."""
    return _solve(groups, lam=1e30).cost


def allocate_ranks(groups, budget):
    """Chooses `r_c` per group and `r_u` per layer to fit `budget` parameters.

    Args:
        groups: `GroupBudget`s covering every compressible layer.
        budget: the parameters the compressible part may use (biases and
            untouched layers already subtracted).

    Returns:
        An `Allocation` whose cost is at most `budget`.

    Raises:
        ValueError: if even the smallest allocation exceeds `budget`.
    """
    floor = minimum_cost(groups)
    if floor > budget:
        raise ValueError(
            f"A budget of {int(budget)} parameters is below the smallest "
            f"allocation ({floor})."
        )
    # A layer's cost is at most -log(1e-6) ~ 14 (1 for sum_error) and costs
    # are parameter counts, so every useful exchange rate lies well inside
    # [1e-16, 1e4].
    low, high = math.log(1e-16), math.log(1e4)
    best = _solve(groups, math.exp(high))
    for _ in range(60):
        mid = (low + high) / 2
        candidate = _solve(groups, math.exp(mid))
        if candidate.cost <= budget:
            best, high = candidate, mid
        else:
            low = mid
    return _fill(groups, best, budget)


def _fill(groups, allocation, budget):
    """Greedily spends the budget left by the Lagrangian step.

    Moves: one more unique rank on a layer, a layer back to dense, or one more
    common rank for a group (where its curves have that rank); the move with
    the largest error reduction per parameter that still fits goes first.
    """
    layers = {layer.name: layer for group in groups for layer in group.layers}
    choices = dict(allocation.layers)
    rank_common = dict(allocation.rank_common)
    cost, error = allocation.cost, allocation.error

    def state(layer, choice):
        if choice == DENSE:
            return layer.dense_cost, 0.0
        rc, ru = choice
        return (
            layer.coefficient_cost(rc) + ru * layer.unique_cost,
            float(layer.errors[rc][ru]),
        )

    while True:
        moves = _layer_moves(layers, choices, state) + _group_moves(groups, choices, rank_common, state)
        best = None
        for extra, gain, apply in moves:
            if extra <= 0 or gain <= 0 or cost + extra > budget:
                continue
            if best is None or gain / extra > best[0]:
                best = (gain / extra, extra, gain, apply)
        if best is None:
            break
        _, extra, gain, apply = best
        apply()
        cost += extra
        error -= gain
    # A group whose members all left its basis no longer needs it.
    for group in groups:
        rc = rank_common[group.name]
        if rc and not any(
            choices[l.name] != DENSE and choices[l.name][0] == rc for l in group.layers
        ):
            rank_common[group.name] = 0
            cost -= group.basis_size * rc
    return Allocation(rank_common, choices, int(cost), float(error))


def _layer_moves(layers, choices, state):
    """`(extra cost, error gain, apply)` for one more unique rank or dense."""
    moves = []
    for name, choice in choices.items():
        layer = layers[name]
        if choice == DENSE:
            continue
        now_cost, now_error = state(layer, choice)
        rc, ru = choice
        targets = []
        if layer.unique and ru + 1 < len(layer.errors[rc]):
            targets.append((rc, ru + 1))
        if layer.allow_dense:
            targets.append(DENSE)
        for target in targets:
            new_cost, new_error = state(layer, target)

            def apply(name=name, target=target):
                choices[name] = target

            moves.append((new_cost - now_cost, now_error - new_error, apply))
    return moves


def _group_moves(groups, choices, rank_common, state):
    """`(extra cost, error gain, apply)` for one more common rank of a group,
    for its members on the basis, where every one has a curve at that rank."""
    moves = []
    for group in groups:
        rc = rank_common[group.name]
        members = [l for l in group.layers if choices[l.name] != DENSE and choices[l.name][0] == rc]
        if not rc or rc + 1 not in group.candidates or not members:
            continue
        if not all(rc + 1 in l.errors for l in members):
            continue
        extra, gain = group.basis_size, 0.0
        for layer in members:
            ru = choices[layer.name][1]
            if ru >= len(layer.errors[rc + 1]):
                break
            now_cost, now_error = state(layer, (rc, ru))
            new_cost, new_error = state(layer, (rc + 1, ru))
            extra += new_cost - now_cost
            gain += now_error - new_error
        else:

            def apply(group=group, members=members, rc=rc):
                rank_common[group.name] = rc + 1
                for layer in members:
                    choices[layer.name] = (rc + 1, choices[layer.name][1])

            moves.append((extra, gain, apply))
    return moves
