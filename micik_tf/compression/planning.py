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

import contextlib
import dataclasses
import math
import time


from micik_tf.compression import allocation as alloc
from micik_tf.compression import decomposition

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
    # (site name, r_c) -> the whitened residual's Spectrum on `bases`' first
    # r_c components (or on no basis, r_c = 0), to reuse when factorizing.
    spectra: dict = dataclasses.field(default_factory=dict)


def group_name(index, side, members):
    s = members[0]
    if side == "output":
        shape = f"out{s.n}"
    elif s.kind == "dense" or s.contracts_last_axis():
        shape = f"dense{s.m}"
    elif s.kind == "einsum":
        shape = f"einsum{s.m}"
    else:
        # e.g. 3x3x64 (Conv2D) or 5x64 (Conv1D): kernel size, then C_in.
        shape = "x".join(str(d) for d in tuple(s.layer.kernel_size) + (s.layer.kernel.shape[-2],))
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


# When the allocator stops at a layer's rank cap, the cap is doubled plus this
# many ranks, so that a cap of 0 (a layer that had no unique curve yet) grows.
CAP_GROWTH = 8
# Step 2 computes each member's curve on top of a basis up to its step-1 unique
# rank plus this many: on top of a basis a layer may want a few more unique
# ranks than alone, and the growth rounds extend a curve that proves short.
UNIQUE_HEADROOM = 8
# A layer's first rank cap: twice its proportional share of the budget, and at
# least this many ranks, which costs little and usually suffices.
MIN_START_CAP = 16


class _Layer:
    """One site's kernel, metric and cached error curves.

    Attributes:
        site, side, matrix, metric: the site, its group's shared side, its
            kernel matrix and its (optional) `InputMetric`.
        max_rank: the rank beyond which a factorization costs more than the
            dense kernel.
        start_cap: the unique rank up to which step 1 computes its curve.
        budget: the `allocation.LayerBudget` the allocator reads; its
            `errors[r_c]` is the curve for each common rank tried.
        caps: `{r_c: highest unique rank computed}`.
    """

    def __init__(self, site, side, matrix, metric, min_rank, unique, share, seed, objective):
        self.site, self.side, self.matrix, self.metric = site, side, matrix, metric
        self.seed, self.objective = seed, objective
        m, n = site.m, site.n
        # Beyond m*n/(m+n) a factorization costs more than the dense kernel.
        self.max_rank = min(min(m, n), math.ceil(m * n / (m + n)))
        self.budget = alloc.LayerBudget(
            site.name, m, n, side, {},
            min_rank=min(int(min_rank), min(m, n)), unique=unique,
        )
        self.start_cap = (
            max(MIN_START_CAP, 2 * math.ceil(share), self.budget.min_rank) if unique else 0
        )
        self.caps = {}
        # {r_c: the whitened residual's Spectrum}, for the final factorization.
        self.spectra = {}
        # The whitened kernel's Gram, once, for every candidate basis's curve.
        self.grams = None

    def curve(self, rank_common, basis, cap):
        """The error curve on the first `rank_common` vectors of the group's
        `basis` (the whole basis at the largest candidate), up to rank `cap`."""
        cap = max(0, min(cap, self.max_rank))
        if rank_common in self.caps and self.caps[rank_common] >= cap:
            return
        if self.grams is None:
            self.grams = decomposition.ResidualGrams(self.matrix, self.side, self.metric)
        errors, reference, found = decomposition.residual_spectrum(
            self.matrix, basis, cap, self.side, self.metric, self.seed, grams=self.grams,
            rank_common=rank_common, start=self._nearest_vectors(rank_common))
        self.budget.errors[rank_common] = alloc.layer_cost(errors / max(reference, 1e-30),
                                                           self.objective)
        self.caps[rank_common] = cap
        self.spectra[rank_common] = found

    def _nearest_vectors(self, rank_common):
        """The singular vectors computed at the nearest common rank (the same
        one for a grown cap), to start the next subspace iteration from."""
        if not self.spectra:
            return None
        nearest = min(self.spectra, key=lambda rc: (abs(rc - rank_common), -rc))
        return self.spectra[nearest].vectors

    def common_curve(self, basis, ranks):
        """The common part alone at each of `ranks` (no unique part), from one
        projection on the basis: what common_only mode chooses among."""
        errors, reference = decomposition.common_rank_errors(
            self.matrix, basis, self.side, self.metric)
        for rc in ranks:
            self.budget.errors[rc] = alloc.layer_cost(errors[rc:rc + 1] / max(reference, 1e-30),
                                                      self.objective)
            self.caps[rc] = 0

    def at_cap(self, choice):
        # Without unique parts a curve is the common part alone: no cap to grow.
        if choice == alloc.DENSE or not self.budget.unique:
            return False
        rc, ru = choice
        return ru >= self.caps[rc] and self.caps[rc] < self.max_rank

    def grown_cap(self, rank_common):
        return 2 * self.caps[rank_common] + CAP_GROWTH

    def per_layer_cost(self, choice):
        """Parameters of this layer's step-1 choice (dense or `r_u` unique ranks)."""
        if choice == alloc.DENSE:
            return self.budget.dense_cost
        return choice[1] * self.budget.unique_cost


@dataclasses.dataclass
class _Group:
    """A group being planned: its name, shared side, layers and basis metric."""

    name: str
    side: str
    layers: list
    metric: object  # the metric its basis is computed in (see group_metrics)

    @property
    def basis_size(self):
        """Basis parameters per unit of common rank."""
        site = self.layers[0].site
        return site.m if self.side == "input" else site.n

    @property
    def coefficient_size(self):
        """Coefficient parameters per unit of common rank, over all members."""
        return sum(l.site.n if self.side == "input" else l.site.m for l in self.layers)


def allocate(grouped, kernels, metrics, budget, mode, min_rank, seed, log,
             objective="log_energy", clock=None):
    """Runs the three steps and returns a `Plan` (see the module docstring).

    Args:
        objective: the allocator's cost of each layer's relative error, one
            of `allocation.OBJECTIVES`.
        clock: optional `clock(step)` context manager that times the steps
            (`per_layer_spectra`, `common_ranks`, `allocation`).

    Raises:
        Infeasible: if even the minimum ranks exceed `budget`.
    """
    clock = clock or (lambda step: contextlib.nullcontext())
    unique = mode != "common_only"
    groups = _groups(grouped, kernels, metrics, budget, min_rank, unique, seed, objective)
    with clock("per_layer_spectra"):
        per_layer = _per_layer_step(groups, budget, unique, log)
    bases, candidates = {}, {}
    with clock("common_ranks"):
        for group in groups:
            # 0 (no basis) stays a candidate in common_only mode too: a group
            # whose members are all best kept dense at some budget is feasible.
            candidates[group.name] = [0]
            if mode == "common_only" or (mode == "micik" and len(group.layers) > 1):
                ranks, bases[group.name] = _common_rank_step(group, per_layer, budget, unique,
                                                             seed, log)
                candidates[group.name] += ranks
    with clock("allocation"):
        result = _grow(groups, budget, lambda g: candidates[g.name], bases)
    spectra = {(layer.site.name, rc): found for group in groups for layer in group.layers
               for rc, found in layer.spectra.items()}
    return Plan([g.name for g in groups], result.rank_common, result.layers, bases, spectra)


def _groups(grouped, kernels, metrics, budget, min_rank, unique, seed, objective):
    total_size = sum(s.m * s.n for _, members in grouped for s in members)
    groups = []
    for index, (side, members) in enumerate(grouped):
        layer_metrics, group_metric = metrics[index]
        layers = []
        for s, metric in zip(members, layer_metrics):
            floor = min_rank if min_rank is not None else default_min_rank(s.m, s.n)
            # The ranks this layer would get if the budget were spread in
            # proportion to the kernels' sizes.
            share = budget * s.m * s.n / total_size / (s.m + s.n)
            layers.append(_Layer(s, side, kernels[s.name], metric, floor, unique, share, seed,
                                 objective))
        groups.append(_Group(group_name(index, side, members), side, layers, group_metric))
    return groups


def _per_layer_step(groups, budget, unique, log):
    """Step 1: per-layer curves, caps grown where the allocator hits them.

    Returns the per-layer allocation (None in common_only mode, where only
    the rank-0 point is computed, so that "no basis, kept dense" can be
    chosen).
    """
    tic = time.perf_counter()
    for group in groups:
        for layer in group.layers:
            layer.curve(0, None, layer.start_cap)
    if not unique:
        return None
    result = _grow(groups, budget, lambda g: [0])
    log(f"per-layer spectra of {sum(len(g.layers) for g in groups)} layers: "
        f"{time.perf_counter() - tic:.1f}s")
    return result


def _common_rank_step(group, per_layer, budget, unique, seed, log):
    """Step 2 for one group: its common-rank candidates and their curves.

    Returns `(candidate ranks, the basis at the largest candidate)`.
    """
    tic = time.perf_counter()
    size = group.basis_size + group.coefficient_size
    if per_layer is not None:
        spent = sum(l.per_layer_cost(per_layer.layers[l.site.name]) for l in group.layers)
    else:
        spent = budget
    # Without a per-layer answer to compare with (common_only mode) the
    # basis is all a group has, so it may take the whole budget.
    reach = SHARING_REACH if per_layer is not None else 1.0
    rc_max = min(
        group.basis_size, group.coefficient_size,
        max(1, math.ceil(reach * spent / size)),
        max(1, int(budget // size)),
    )
    basis = decomposition.shared_basis(
        [l.matrix for l in group.layers], rc_max, group.side, group.metric, seed
    )
    if not unique:
        # Without unique parts the common rank is all a group can spend, and
        # every rank's error costs one projection: offer them all, so the
        # budget is met as closely as the model allows.
        ranks = list(range(1, rc_max + 1))
        for layer in group.layers:
            layer.common_curve(basis, ranks)
        log(f"group {group.name}: {len(group.layers)} layers, common ranks 1..{rc_max}, "
            f"{time.perf_counter() - tic:.1f}s")
        return ranks, basis
    ranks = sorted({max(1, rc_max >> k) for k in range(CANDIDATES)})
    for layer in group.layers:
        cap = 0
        if per_layer is not None:
            choice = per_layer.layers[layer.site.name]
            cap = layer.max_rank if choice == alloc.DENSE else choice[1] + UNIQUE_HEADROOM
        for rc in ranks:
            layer.curve(rc, basis, cap)
    log(f"group {group.name}: {len(group.layers)} layers, common ranks tried {ranks}, "
        f"{time.perf_counter() - tic:.1f}s")
    return ranks, basis


def _budgets(groups, candidates):
    out = []
    for group in groups:
        usable = [rc for rc in candidates(group)
                  if all(rc in l.budget.errors for l in group.layers)]
        out.append(alloc.GroupBudget(
            group.name, group.basis_size, [l.budget for l in group.layers], usable or [0]))
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
        for group in groups:
            for layer in group.layers:
                choice = result.layers[layer.site.name]
                if layer.at_cap(choice):
                    rc = choice[0]
                    layer.curve(rc, (bases or {}).get(group.name), layer.grown_cap(rc))
                    grown = True
        if not grown:
            return result
    return result


def cost(grouped, plan):
    """Parameters of a plan's factorized layers: the bases its members use,
    coefficients, unique factors and kernels kept dense (biases excluded)."""
    total = 0
    for (side, members), name in zip(grouped, plan.group_names):
        used = False
        for s in members:
            choice = plan.layers[s.name]
            if choice == alloc.DENSE:
                total += s.m * s.n
                continue
            rc, ru = choice
            used = used or rc > 0
            total += rc * (s.n if side == "input" else s.m) + ru * (s.m + s.n)
        if used:
            s = members[0]
            total += plan.rank_common[name] * (s.m if side == "input" else s.n)
    return total


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
