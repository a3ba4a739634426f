"""Planning a compression: error curves per layer, then the rank allocation.

Computing a layer's residual spectrum for every common-rank candidate at the
largest rank the budget could allow is what makes a naive implementation slow
(minutes on VGG-16). The planner works in three cheap steps instead:

1. Per-layer curves (no sharing) up to a modest rank cap per layer: twice its
   proportional share of the budget. Allocate; wherever the allocator stops at
   a cap, double that cap and allocate again.
2. For groups of two or more layers, common-rank candidates up to half the
   rank at which a shared basis costs as much as the per-layer ranks of
   step 1 (beyond it sharing cannot pay), each with residual curves up to the
   step-1 rank.
3. The global allocation over all groups and candidates.
"""

import dataclasses
import math
import time


from micik_tf import allocation as alloc
from micik_tf import decomposition

CANDIDATES = 5  # common ranks tried per group: r_max, r_max/2, ..., r_max/16
# r_max is this fraction of the rank at which a basis costs as much as the
# per-layer ranks of step 1. Near that point the members would still need
# their unique ranks, so sharing cannot pay; stopping at half of it saves the
# largest SVDs (minutes on VGG-16 at low ratios).
SHARING_REACH = 0.5


@dataclasses.dataclass
class Plan:
    """What to build: per group its r_c and basis, per layer its ranks."""

    group_names: list  # one per group, in grouped order
    rank_common: dict  # group name -> r_c
    layers: dict  # site name -> alloc.DENSE or (r_c, r_u)
    bases: dict  # group name -> basis with at least r_c components


def group_name(index, side, members):
    s = members[0]
    if side == "output":
        shape = f"out{s.n}"
    elif s.kind == "dense":
        shape = f"dense{s.m}"
    else:
        k = s.layer.kernel_size
        shape = f"{k[0]}x{k[1]}x{s.layer.kernel.shape[2]}"
    return f"shared_basis_{index}_{shape}"


def group_metrics(side, members, covariances):
    """Per-layer metrics, and the one the group's basis is computed in.

    A group uses output-error metrics only if every member has calibration
    statistics; otherwise all members fall back to the weight error, so that
    their errors stay comparable. Input-side bases live in the members' common
    input space, whitened by the pooled covariance; output-side bases are
    computed from each member's whitened kernel.
    """
    if not covariances or any(s.name not in covariances for s in members):
        return [None] * len(members), None
    metrics = [
        decomposition.InputMetric.from_covariance(covariances[s.name]) for s in members
    ]
    if side == "input":
        pooled = decomposition.InputMetric.pooled([covariances[s.name] for s in members])
        return metrics, pooled
    return metrics, metrics


def default_min_rank(m, n):
    """8, capped at a sixteenth of the smaller side (at least 1).

    A floor keeps deep layers from being starved to rank 1 at high ratios;
    scaling it with the width keeps small models compressible.
    """
    return max(1, min(8, min(m, n) // 16))


def slice_basis(basis, rank, side):
    if not rank or basis is None:
        return None
    return basis[:, :rank] if side == "input" else basis[:rank]


class _Layer:
    """One site's kernel, metric and cached error curves."""

    def __init__(self, site, side, matrix, metric, min_rank, unique, seed):
        self.site, self.side, self.matrix, self.metric = site, side, matrix, metric
        self.seed = seed
        m, n = site.m, site.n
        # Beyond m*n/(m+n) a factorization costs more than the dense kernel.
        self.max_rank = min(min(m, n), math.ceil(m * n / (m + n)))
        self.budget = alloc.LayerBudget(
            site.name, m, n, side, {},
            min_rank=min(int(min_rank), min(m, n)), unique=unique,
        )
        self.caps = {}

    def curve(self, rank_common, basis, cap):
        cap = max(0, min(cap, self.max_rank))
        if rank_common in self.caps and self.caps[rank_common] >= cap:
            return
        errors, reference = decomposition.residual_spectrum(
            self.matrix, basis, cap, self.side, self.metric, self.seed
        )
        self.budget.errors[rank_common] = errors / max(reference, 1e-30)
        self.caps[rank_common] = cap

    def at_cap(self, choice):
        if choice == alloc.DENSE:
            return False
        rc, ru = choice
        return ru >= self.caps[rc] and self.caps[rc] < self.max_rank


def allocate(grouped, kernels, metrics, budget, mode, min_rank, seed, log):
    """Runs the three steps and returns a `Plan` (see the module docstring).

    Raises:
        alloc.Infeasible: if even the minimum ranks exceed `budget`.
    """
    unique = mode != "common_only"
    groups, total_size = [], sum(s.m * s.n for _, members in grouped for s in members)
    for index, (side, members) in enumerate(grouped):
        layer_metrics, group_metric = metrics[index]
        layers = []
        for s, metric in zip(members, layer_metrics):
            floor = min_rank if min_rank is not None else default_min_rank(s.m, s.n)
            layer = _Layer(s, side, kernels[s.name], metric, floor, unique, seed)
            share = budget * s.m * s.n / total_size / (s.m + s.n)
            layer.start_cap = max(16, 2 * math.ceil(share), layer.budget.min_rank) if unique else 0
            layers.append(layer)
        groups.append((group_name(index, side, members), side, layers, group_metric))

    # Step 1: per-layer curves, caps grown where the allocator hits them.
    tic = time.perf_counter()
    if unique:
        for _, _, layers, _ in groups:
            for layer in layers:
                layer.curve(0, None, layer.start_cap)
        result = _grow(groups, budget, lambda g: [0])
        log(f"per-layer spectra of {sum(len(g[2]) for g in groups)} layers: "
            f"{time.perf_counter() - tic:.1f}s")
    else:
        # Only the rank-0 point, so that "no basis, kept dense" can be chosen.
        for _, _, layers, _ in groups:
            for layer in layers:
                layer.curve(0, None, 0)
        result = None

    # Step 2: common-rank candidates for groups that may share.
    bases, candidates = {}, {}
    for name, side, layers, group_metric in groups:
        # 0 (no basis) stays a candidate in common_only mode too: a group
        # whose members are all best kept dense at some budget is feasible.
        candidates[name] = [0]
        shareable = mode == "common_only" or (mode == "micik" and len(layers) > 1)
        if not shareable:
            continue
        tic = time.perf_counter()
        basis_size = layers[0].site.m if side == "input" else layers[0].site.n
        coef_size = sum(l.site.n if side == "input" else l.site.m for l in layers)
        if result is not None:
            per_layer = sum(
                l.budget.dense_cost if result.layers[l.site.name] == alloc.DENSE
                else result.layers[l.site.name][1] * l.budget.unique_cost
                for l in layers
            )
        else:
            per_layer = budget
        rc_max = min(
            basis_size, coef_size,
            max(1, math.ceil(SHARING_REACH * per_layer / (basis_size + coef_size))),
            max(1, int(budget // (basis_size + coef_size))),
        )
        ranks = sorted({max(1, rc_max >> k) for k in range(CANDIDATES)})
        candidates[name] += ranks
        basis = decomposition.shared_basis(
            [l.matrix for l in layers], rc_max, side, group_metric, seed
        )
        bases[name] = basis
        for layer in layers:
            cap = 0
            if unique and result is not None:
                choice = result.layers[layer.site.name]
                cap = layer.max_rank if choice == alloc.DENSE else choice[1] + 8
            for rc in ranks:
                layer.curve(rc, slice_basis(basis, rc, side), cap)
        log(f"group {name}: {len(layers)} layers, common ranks tried {ranks}, "
            f"{time.perf_counter() - tic:.1f}s")

    # Step 3: the global allocation.
    result = _grow(groups, budget, lambda g: candidates[g[0]] or [0], bases)
    return Plan([g[0] for g in groups], result.rank_common, result.layers, bases)


def _budgets(groups, candidates):
    out = []
    for group in groups:
        name, side, layers, _ = group
        basis_size = layers[0].site.m if side == "input" else layers[0].site.n
        usable = [rc for rc in candidates(group) if all(rc in l.budget.errors for l in layers)]
        out.append(alloc.GroupBudget(name, basis_size, [l.budget for l in layers], usable or [0]))
    return out


class Infeasible(ValueError):
    """The budget is below the cheapest allocation; `floor` says by how much."""

    def __init__(self, floor):
        super().__init__(f"needs at least {floor} parameters")
        self.floor = floor


def _grow(groups, budget, candidates, bases=None, rounds=6):
    """Allocates, doubling the rank cap of any layer the answer is stuck at."""
    for _ in range(rounds):
        budgets = _budgets(groups, candidates)
        floor = alloc.minimum_cost(budgets)
        if floor > budget:
            raise Infeasible(floor)
        result = alloc.allocate_ranks(budgets, budget)
        grown = False
        for name, side, layers, _ in groups:
            for layer in layers:
                choice = result.layers[layer.site.name]
                if layer.at_cap(choice):
                    rc = choice[0]
                    basis = slice_basis((bases or {}).get(name), rc, side)
                    layer.curve(rc, basis, 2 * layer.caps[rc] + 8)
                    grown = True
        if not grown:
            return result
    return result


def explicit(grouped, by_name):
    """A `Plan` from user-given `{site name: (r_c, r_u)}`."""
    layers, rank_common, names = {}, {}, []
    for index, (side, members) in enumerate(grouped):
        name = group_name(index, side, members)
        names.append(name)
        common = {by_name[s.name][0] for s in members if by_name[s.name][0]}
        if len(common) > 1:
            raise ValueError(
                f"Layers {[s.name for s in members]} share one basis, so their "
                f"rank_common must agree. Received: {sorted(common)}"
            )
        rank_common[name] = common.pop() if common else 0
        for s in members:
            layers[s.name] = by_name[s.name]
    return Plan(names, rank_common, layers, {})
