"""`compress()`: a trained Keras model in, a new MICIK-compressed model out."""

import contextlib
import dataclasses
import math
import numbers
import sys
import time

import keras

from micik_tf.compression import allocation as alloc
from micik_tf.compression import calibration, decomposition, graph, planning, sparse
from micik_tf.compression.sequential import refit as sequential_refit
from micik_tf.compression.grouping import (
    SHARE_CHOICES,
    find_sites,
    group_sites,
    resolve_names,
    site_side,
    walk_deep,
)
from micik_tf.layers import (
    FACTORIZED,
    CompressedBlock,
    FactorizedConv1D,
    FactorizedConv2D,
    FactorizedDense,
    FactorizedEinsumDense,
    SharedBasis,
)
from micik_tf.validation import first_error, float_above, fraction, one_of, positive_int

DEFAULT_RATIO = 4.0
MODES = ("micik", "per_layer", "common_only")
# What each layer keeps of its own beyond the shared part: a low-rank part
# (MICIK), or a low-rank part plus a sparse one (see `sparse`).
UNIQUE_KINDS = ("low_rank", "sparse")
# The allocator's objective by unique kind. Low rank: the curve measured the
# sum of errors 0.2-5.5 points ahead of the log-energy cost at every limited
# ratio (benchmarks/results/curve.json, ablation "log-energy allocator").
# Sparse: the log-energy cost, under which the nonzeros are spent as global
# LAMP pruning spends them (see `sparse`).
DEFAULT_OBJECTIVES = {"low_rank": "sum_error", "sparse": "log_energy"}

# Why compress() left a compressible layer whole. Only the progress log names
# them: `report()` reads everything from the model, and a plain Dense/Conv2D
# in a compressed model carries no record of which of these applied.
KEPT_DENSE = "kept dense by the rank allocator: its full kernel fits the budget"
EXCLUDED = "excluded by the user (`exclude`)"
NOT_RANKED = "not listed in `ranks`"


def compress(
    model,
    ratio=None,
    *,
    mode="micik",
    unique="low_rank",
    sparse_share=None,
    share="auto",
    groups=None,
    exclude=None,
    ranks=None,
    calibration_data=None,
    calibration_batches=8,
    min_rank=None,
    objective=None,
    sequential=False,
    recalibrate_batchnorm=True,
    verbose=1,
    seed=0,
    timings=None,
):
    """Compresses a Keras model with MICIK's shared + unique factorization.

    Dense, EinsumDense, Conv1D and Conv2D layers whose kernels share a dimension are grouped; each
    group gets one shared basis (a `SharedBasis` layer) and each layer its
    coefficients on it plus a small unique low-rank part. A global allocator
    picks the ranks that reach `ratio` with the least relative error.

    Args:
        model: a built Keras 3 Sequential, Functional (nested models
            allowed) or subclassed model. It is never modified. Layers held
            inside composite layers (MultiHeadAttention's projections, a
            user's block) and subclassed models are compressed in place in a
            copy (`micik_tf.layers.CompressedBlock`).
        ratio: target `params_before / params_after` for the whole model,
            untouched layers and biases included; a float > 1. Defaults to
            4.0, a ratio that a short recovery fine-tune usually brings back
            to the teacher's accuracy; go higher with recovery training.
        mode: `"micik"` (shared + unique parts), `"per_layer"` (the same
            allocator with sharing off: per-layer SVD, the baseline) or
            `"common_only"` (shared part only, an ablation).
        unique: what each layer keeps of its own beside the shared part:
            `"low_rank"` (MICIK's `U_l V_l`) or `"sparse"` (`U_l V_l` plus a
            sparse residual `S_l`, its mask chosen by magnitude, whitened
            with calibration data; one budget for ranks and nonzeros, split
            by the allocator). Sparse parts save bytes after gzip, not
            runtime memory or time: `report()` counts their nonzeros.
        sparse_share: with `unique="sparse"`, the share of the layers'
            budget spent on nonzeros, in [0, 1] (0: plain MICIK, 1: global
            LAMP pruning); None (the default) lets the allocator choose it
            from `sparse.SHARES` by its objective.
        share: which side of the kernel matrix a group shares: `"auto"` (the
            larger side of each layer, usually the input side), `"input"`
            or `"output"`.
        groups: lists of layer names to put in one group (overrides the
            automatic grouping for those layers).
        exclude: layer names to leave uncompressed.
        ranks: instead of `ratio`, explicit `{layer name: (rank_common,
            rank_unique)}`; members of one group must agree on rank_common.
            Layers not listed are left uncompressed. With `unique="sparse"`,
            `ratio` is given too and the nonzeros take what the ranks leave
            ((0, 0) everywhere is pure pruning).
        calibration_data: optional inputs (`tf.data.Dataset` of `x` or
            `(x, y)`, or an array). Enables the data-aware initialisation
            (minimising the error on each layer's outputs) and re-estimates
            BatchNorm statistics of the compressed model.
        calibration_batches: how many batches of `calibration_data` to use.
        min_rank: smallest total rank per compressed layer. Default: 8,
            capped at a sixteenth of the layer's smaller side (at least 1).
            With `unique="sparse"` it may be 0: the allocator may then leave
            a layer (in `"common_only"` mode, a group) with no low-rank part,
            only nonzeros, where ranks buy too little (high ratios).
        objective: what the allocator minimises over the layers' relative
            errors `e`: `"sum_error"` (the sum of `e`; the default for
            low-rank parts, measured better on the curve) or `"log_energy"`
            (the sum of `-log(1 - e)`, which never starves a layer; the
            default for sparse parts, where it makes the nonzeros LAMP's).
        sequential: with `calibration_data`, fit each layer, in the graph's
            order, to the original layer's outputs from the inputs that the
            already-compressed layers before it produce (Zhang et al. 2015's
            asymmetric reconstruction), so errors stop accumulating. Ranks,
            nonzero counts and shared bases stay as planned; each layer's
            coefficients and unique parts are refit. Costs about one pass
            of the calibration data through both models per layer.
        recalibrate_batchnorm: re-estimate BatchNorm statistics on
            `calibration_data` (when given).
        verbose: 0 silences progress; 1 prints a line per group.
        seed: seed of the randomized SVD.
        timings: optional dict, filled with the seconds each step took
            (`calibration`, `per_layer_spectra`, `common_ranks`, `allocation`,
            `building`, `batchnorm`), to see where the time goes.

    Returns:
        A new `keras.Model` (Functional; for a subclassed model, a Functional
        model around its compressed copy). The names of compressed layers are
        kept at their outputs. See `micik_tf.report()` for what was done.
    """
    _check_model(model)
    model = graph.as_graph(model)
    mode = one_of("mode", mode, MODES)
    unique, sparse_share = _check_unique(unique, sparse_share)
    objective = one_of("objective", DEFAULT_OBJECTIVES[unique] if objective is None
                       else objective, alloc.OBJECTIVES)
    _check_sequential(sequential, calibration_data)
    calibration_batches = positive_int("calibration_batches", calibration_batches)
    if min_rank is not None:
        min_rank = _check_min_rank(min_rank, unique)
    share = one_of("share", share, SHARE_CHOICES)
    if ranks is None:
        ratio = _check_ratio(DEFAULT_RATIO if ratio is None else ratio)
    elif unique == "sparse":
        if ratio is None:
            raise ValueError(
                "With unique='sparse' and explicit `ranks`, give `ratio` too: the "
                "nonzeros take the budget that the ranks leave.")
        ratio = _check_ratio(ratio)
    elif ratio is not None:
        raise ValueError(
            "Give either `ratio` (the allocator picks the ranks) or `ranks` "
            f"(explicit ranks), not both. Received: ratio={ratio!r}, ranks=..."
        )
    log = _Progress(verbose)
    clock = _Clock(timings)
    start = time.perf_counter()
    sites, untouched, grouped = _select(model, mode, share, groups, exclude, ranks)
    params_before = int(model.count_params())
    fixed = params_before - sum(s.m * s.n for s in sites)
    covariances = {}
    if calibration_data is not None:
        log(f"calibrating {len(sites)} layers on up to {calibration_batches} batches")
        with clock("calibration"):
            covariances = calibration.collect_covariances(
                model, sites, calibration_data, max_batches=calibration_batches, seed=seed)
    kernels = {s.name: decomposition.kernel_matrix(s.kernel()) for s in sites}
    # Whitening metrics per group (a Cholesky factor each): computed once,
    # used by the error curves and by the final factorization.
    metrics = [planning.group_metrics(side, m, covariances) for side, m in grouped]
    explicit = planning.explicit(
        grouped, _check_ranks(ranks, sites, allow_zero=unique == "sparse")) if ranks else None
    if unique == "sparse":
        plan, factorization = _allocate_sparse(
            grouped, kernels, metrics, params_before, fixed, ratio, mode, min_rank, seed, log,
            objective, clock, sparse_share, explicit)
    else:
        plan = explicit or _allocate(grouped, kernels, metrics, params_before, fixed, ratio,
                                     mode, min_rank, seed, log, objective, clock)
        with clock("factorizing"):
            factorization = _factorize(grouped, plan, kernels, metrics, seed)
    if sequential:
        log(f"sequential calibration of {len(factorization.factors)} layers")
        with clock("sequential"):
            sequential_refit(model, sites, factorization.factors, kernels, calibration_data,
                             calibration_batches, seed)
    with clock("building"):
        new_model, reasons = _build(model, grouped, plan, factorization, metrics, untouched)
    if calibration_data is not None and recalibrate_batchnorm:
        with clock("batchnorm"):
            calibration.recalibrate_batchnorm(new_model, calibration_data, calibration_batches)
    kept = [f"{name} ({why})" for name, why in reasons.items()
            if why in (KEPT_DENSE, EXCLUDED, NOT_RANKED)]
    if kept:
        log("left whole: " + "; ".join(kept))
    fallbacks = [s.name for s in sites if covariances.get(s.name) is not None
                 and covariances[s.name].ndim == 1]
    if fallbacks:
        log(f"diagonal input covariance (wider than {calibration.FULL_COVARIANCE_MAX} "
            f"inputs): {', '.join(fallbacks)}")
    params_after = int(new_model.count_params()) - _sparse_zeros(new_model)
    log(
        f"done in {time.perf_counter() - start:.1f}s: {params_before:,} -> "
        f"{params_after:,} parameters ({params_before / params_after:.2f}x)"
    )
    return new_model


def _select(model, mode, share, groups, exclude, ranks):
    """The sites to compress, the untouched layers (with reasons) and the
    groups: `(sites, {name: reason}, [(side, [Site, ...]), ...])`."""
    sites, untouched = find_sites(model)
    if not sites:
        raise ValueError(
            f"Model '{model.name}' has no compressible layers: compress() "
            "factorizes Dense, EinsumDense, Conv1D and Conv2D "
            "(channels_last, groups=1) layers. "
            "Untouched: " + _format_untouched(untouched)
        )
    excluded = {s.name for s in resolve_names(_names(exclude, "exclude"), sites, "exclude")}
    forced = [resolve_names(_names(g, "groups"), sites, "groups") for g in (groups or [])]
    for members in forced:
        clash = [s.name for s in members if s.name in excluded]
        if clash:
            raise ValueError(f"Layers {clash} are both in `groups` and in `exclude`.")
    if forced and mode == "per_layer":
        raise ValueError(
            "`groups` asks for shared bases, but mode='per_layer' turns sharing "
            "off. Use mode='micik' with `groups`, or drop `groups`."
        )
    ranked = {s.name for s in resolve_names(list(ranks), sites, "ranks")} if ranks else None
    for s in sites:
        if s.name in excluded:
            untouched[s.name] = EXCLUDED
        elif ranked is not None and s.name not in ranked:
            untouched[s.name] = NOT_RANKED
    sites = [s for s in sites if s.name not in untouched]
    if not sites:
        raise ValueError(
            "No layer is left to compress once `exclude`/`ranks` are applied. "
            "Exclude fewer layers."
        )
    if mode == "per_layer":
        return sites, untouched, [(site_side(s, share), [s]) for s in sites]
    return sites, untouched, group_sites(sites, share, forced)


def _allocate(grouped, kernels, metrics, params_before, fixed, ratio, mode, min_rank, seed,
              log, objective, clock):
    """The allocator's plan for the budget `ratio` leaves; a ValueError naming
    the largest reachable ratio if even the minimum ranks do not fit."""
    budget = params_before / ratio - fixed
    try:
        return planning.allocate(grouped, kernels, metrics, budget, mode, min_rank, seed, log,
                                 objective, clock)
    except planning.Infeasible as error:
        reachable = params_before / (fixed + error.floor)
        raise ValueError(
            f"ratio={ratio:g} cannot be reached: {fixed:,} of the model's "
            f"{params_before:,} parameters are in untouched layers and "
            f"biases, and the compressed layers need at least "
            f"{error.floor:,} at their minimum ranks. The largest reachable "
            f"ratio is {math.floor(reachable * 100) / 100:.2f}. Lower "
            "`ratio`, compress more layers (fewer `exclude`), or lower "
            "`min_rank`."
        ) from None


class _Clock:
    """`with clock("step"):` adds the block's seconds to `timings["step"]`."""

    def __init__(self, timings):
        self.timings = timings

    @contextlib.contextmanager
    def __call__(self, step):
        tic = time.perf_counter()
        try:
            yield
        finally:
            if self.timings is not None:
                self.timings[step] = self.timings.get(step, 0.0) + time.perf_counter() - tic


# --- input checks -----------------------------------------------------------


def _check_model(model):
    if not isinstance(model, keras.Model):
        module = type(model).__module__ or ""
        if module.startswith(("tf_keras", "keras.src.engine", "tensorflow.python.keras")) or (
            module.startswith("keras") and not module.startswith("keras.src")
        ):
            raise TypeError(
                f"compress() takes a Keras 3 model; received a tf_keras (Keras 2) "
                f"model ({type(model).__name__}). Save it with "
                "`model.save('model.h5')` and load it with Keras 3 "
                "(`keras.models.load_model`), or rebuild it with `import keras`."
            )
        raise TypeError(
            "compress() takes a keras.Model (Keras 3, Sequential or "
            f"Functional). Received: {type(model).__name__}"
        )
    if not graph.is_graph_model(model):
        return  # graph.as_graph checks a subclassed model as it copies it.
    if not model.built or not _has_inputs(model):
        raise ValueError(
            f"Model '{model.name}' is not built: its input shape is unknown. "
            "Build it first, e.g. start a Sequential with "
            "`keras.Input(shape=...)` or call `model.build(input_shape)`."
        )


def _has_inputs(model):
    try:
        return bool(model.inputs)
    except (AttributeError, ValueError):
        return False


def _check_ratio(ratio):
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise TypeError(
            "`ratio` must be a number > 1 (params_before / params_after). "
            f"Received: ratio={ratio!r}"
        )
    return float_above("ratio", ratio, 1)


def _names(value, argument):
    if value is None:
        return []
    if isinstance(value, str):
        raise TypeError(
            f"`{argument}` takes a list of layer names, not a single string. "
            f"Received: {argument}={value!r}; did you mean [{value!r}]?"
        )
    return list(value)


def _check_min_rank(min_rank, unique):
    """`min_rank` >= 1, or 0 with sparse unique parts (a layer may then be
    only its sparse part: the allocator may give a group no rank at all)."""
    min_rank = positive_int("min_rank", min_rank, allow_zero=True)
    if min_rank == 0 and unique != "sparse":
        raise ValueError(
            "min_rank=0 lets a layer keep no low-rank part, which leaves it nothing "
            "without a sparse part. Pass unique='sparse', or a min_rank >= 1.")
    return min_rank


def _check_unique(unique, sparse_share):
    unique = one_of("unique", unique, UNIQUE_KINDS)
    if sparse_share is None:
        return unique, None
    if unique != "sparse":
        raise ValueError(
            "`sparse_share` sets the nonzeros' share of the budget, which only "
            "unique='sparse' has. Pass unique='sparse', or drop `sparse_share`. "
            f"Received: sparse_share={sparse_share!r}, unique={unique!r}")
    return unique, fraction("sparse_share", sparse_share, high_open=False)


def _check_sequential(sequential, calibration_data):
    if not isinstance(sequential, bool):
        raise TypeError(f"`sequential` must be True or False. Received: {sequential!r}")
    if sequential and calibration_data is None:
        raise ValueError(
            "sequential=True fits each layer to the original outputs on calibration "
            "data: pass `calibration_data` too, or drop `sequential`.")


def _check_ranks(ranks, sites, allow_zero=False):
    """`{site name: (r_c, r_u)}` from the user's `ranks`, validated; (0, 0)
    only where a sparse part can stand alone (`allow_zero`)."""
    if not isinstance(ranks, dict):
        raise TypeError(
            "`ranks` must be a dict {layer name: (rank_common, rank_unique)}. "
            f"Received: {type(ranks).__name__}"
        )
    out = {}
    for key, value in ranks.items():
        site = resolve_names([key], sites, "ranks")[0]
        try:
            rc, ru = (int(v) for v in value)
        except (TypeError, ValueError):
            raise ValueError(
                f"`ranks['{key}']` must be a pair (rank_common, rank_unique). "
                f"Received: {value!r}"
            ) from None
        if rc < 0 or ru < 0 or (rc + ru == 0 and not allow_zero):
            raise ValueError(
                f"`ranks['{key}']` needs non-negative ranks, not both 0 (both 0 is a "
                f"pruned layer, which needs unique='sparse'). Received: {value!r}"
            )
        out[site.name] = (rc, ru)
    return out


def _format_untouched(untouched):
    return "; ".join(f"{k} ({v})" for k, v in untouched.items()) or "none"


# --- planning -----------------------------------------------------------------


class _Progress:
    def __init__(self, verbose):
        self.verbose = verbose

    def __call__(self, message):
        if self.verbose:
            print(f"[micik] {message}", file=sys.stdout, flush=True)


# --- building -----------------------------------------------------------------


@dataclasses.dataclass
class _Factorization:
    """The factors to build: per group its basis (None where it shares
    nothing), per site its `Factors` (sites kept dense have none)."""

    bases: dict
    factors: dict


def _factorize(grouped, plan, kernels, metrics, seed):
    """Factorizes the kernels as planned (a shared basis per group, then each
    member's coefficients and unique part)."""
    bases, factors = {}, {}
    for (side, members), name, (layer_metrics, group_metric) in zip(
        grouped, plan.group_names, metrics
    ):
        rc = plan.rank_common[name]
        mats = [kernels[s.name] for s in members]
        basis = full = None
        users = [
            i for i, s in enumerate(members)
            if plan.layers[s.name] != alloc.DENSE and plan.layers[s.name][0]
        ]
        if rc:
            full = plan.bases.get(name)
            if full is None or len(users) < len(members):
                # Members that opted out must not pull the basis their way.
                metric = group_metric
                if isinstance(metric, list):
                    metric = [metric[i] for i in users]
                elif metric is not None:
                    metric = decomposition.InputMetric.pooled(
                        [layer_metrics[i].covariance for i in users]
                    )
                full = decomposition.shared_basis(
                    [mats[i] for i in users], rc, side, metric, seed
                )
            basis = planning.slice_basis(full, rc, side)
        bases[name] = basis
        for s, w, metric in zip(members, mats, layer_metrics):
            choice = plan.layers[s.name]
            if choice == alloc.DENSE:
                continue
            layer_rc, ru = choice
            # The planner's spectrum of this residual, if it was on this basis.
            known = plan.spectra.get((s.name, layer_rc)) if (
                not layer_rc or full is plan.bases.get(name)) else None
            factors[s.name] = decomposition.factorize(
                w, ru, basis if layer_rc else None, side, metric, seed, known
            )
    return _Factorization(bases, factors)


def _allocate_sparse(grouped, kernels, metrics, params_before, fixed, ratio, mode, min_rank,
                     seed, log, objective, clock, share, explicit):
    """The plan and factors of the sparse mode: low-rank parts on a share of
    the budget, nonzeros on the rest, at the share (`sparse.SHARES`, or the
    one given) whose result has the lowest objective."""
    budget = params_before / ratio - fixed
    metric_of = {s.name: m for (_, members), (layer_metrics, _) in zip(grouped, metrics)
                 for s, m in zip(members, layer_metrics)}
    zero = planning.explicit(grouped, {s.name: (0, 0) for _, members in grouped
                                       for s in members})
    best = None
    for nonzero_share in ([share] if share is not None else sparse.SHARES):
        if explicit is not None:
            plan = explicit
        elif nonzero_share == 1:
            plan = zero
        else:
            try:
                plan = _allocate(grouped, kernels, metrics, params_before,
                                 fixed + nonzero_share * budget, ratio, mode, min_rank, seed,
                                 lambda message: None, objective, clock)
            except ValueError:
                if share is not None:
                    raise ValueError(
                        f"sparse_share={share:g} leaves the low-rank parts "
                        f"{(1 - share):.0%} of the budget, too little for their "
                        "minimum ranks at this ratio. Raise `sparse_share` (1: no "
                        "low-rank part), lower `min_rank`, or lower `ratio`.") from None
                continue  # the minimum ranks do not fit in this share
        with clock("factorizing"):
            factorization = _factorize(grouped, plan, kernels, metrics, seed)
        # Rounded as `deploy.pruning` rounds its count of pruned entries.
        nonzeros = int(round(budget - planning.cost(grouped, plan)))
        if nonzeros < 0:
            raise ValueError(
                f"The given `ranks` alone take {planning.cost(grouped, plan):,} parameters, "
                f"more than ratio={ratio:g} leaves for the compressed layers "
                f"({int(budget):,}). Lower the ranks or the ratio.")
        if nonzero_share == 0 and share == 0:
            value, counts = None, {}  # exactly MICIK: no sparse part at all
        else:
            with clock("sparse"):
                value, counts = sparse.spend(factorization.factors, kernels, metric_of,
                                             nonzeros, objective)
        log(f"sparse share {nonzero_share:g}: {sum(counts.values()):,} nonzeros"
            + (f", objective {value:.4f}" if value is not None else ""))
        if best is None or (value is not None and value < best[0]):
            best = (value, plan, factorization, nonzero_share)
        if explicit is not None:
            break
    if best is None:
        raise ValueError(
            f"ratio={ratio:g} cannot be reached: {fixed:,} of the model's "
            f"{params_before:,} parameters are in untouched layers and biases. Lower "
            "`ratio`, or compress more layers (fewer `exclude`).")
    value, plan, factorization, chosen = best
    log(f"sparse share chosen: {chosen:g}")
    for name, f in factorization.factors.items():
        f.relative_error = decomposition.relative_error(kernels[name], f)
    return plan, factorization


def _sparse_zeros(model):
    """Zeros of the sparse unique parts: stored as dense tensors, but not
    parameters (a pruned entry costs nothing once gzip'd)."""
    return sum(layer.sparse_zeros() for layer, _, _, _ in walk_deep(model)
               if isinstance(layer, FACTORIZED))


def _build(model, grouped, plan, factorization, metrics, untouched):
    """Rebuilds the model around the factorized kernels."""
    wrappers, basis_layers, basis_values, values = {}, {}, {}, {}
    inner = {}  # a composite layer's path: [(location, wrapper), ...]
    reasons = dict(untouched)
    for (side, members), name, (layer_metrics, _) in zip(
        grouped, plan.group_names, metrics
    ):
        basis = factorization.bases[name]
        # A basis that a layer inside a composite layer uses is held by its
        # users (no graph edge reaches there); then every member holds it.
        held = any(s.held for s in members)
        if basis is not None:
            first = members[0].layer
            layer = SharedBasis(
                basis.shape[0], basis.shape[1], name=name, dtype=first.dtype_policy
            )
            if held:
                layer.build(None)
            basis_layers[name] = layer
            basis_values[name] = basis
        for s, metric in zip(members, layer_metrics):
            choice = plan.layers[s.name]
            if choice == alloc.DENSE:
                reasons[s.name] = KEPT_DENSE
                continue
            layer_rc, ru = choice
            factors = factorization.factors[s.name]
            wrapper = _make_wrapper(
                s, layer_rc, ru, side, name if layer_rc else None,
                factors.relative_error,
                _initialization(metric),
                basis_layers[name] if held and layer_rc else None,
                sparse=factors.sparse is not None,
            )
            if s.held:
                inner.setdefault(s.block, []).append((s.location, wrapper))
            else:
                wrappers[s.name] = wrapper
            values[s.name] = (factors, s.layer, wrapper)

    copies = []

    def make_layer(layer, path):
        if path in inner:
            return _compressed_block(layer, inner[path])
        key = "/".join(path)
        if key in wrappers:
            return wrappers[key]
        new = graph.clone_layer(layer)
        copies.append((layer, new))
        return new

    def call_layer(layer, path, args, kwargs):
        if isinstance(layer, FACTORIZED) and layer.rank_common and not layer.holds_basis:
            basis = basis_layers[layer.group](args[0])
            return layer([args[0], basis], **kwargs)
        if isinstance(layer, CompressedBlock):
            return _call_block(layer, args, kwargs)
        return layer(*args, **kwargs)

    new_model = graph.rebuild(model, make_layer, call_layer)
    for old, new in copies:
        graph.copy_weights(old, new)
    for name, layer in basis_layers.items():
        layer.basis.assign(basis_values[name])
    for factors, original, wrapper in values.values():
        if factors.coefficients is not None:
            wrapper.coefficients.assign(factors.coefficients)
        if factors.unique_left is not None:
            wrapper.unique_left.assign(factors.unique_left)
            wrapper.unique_right.assign(factors.unique_right)
        if factors.sparse is not None:
            wrapper.sparse_kernel.assign(factors.sparse)
        if wrapper.use_bias:
            wrapper.bias.assign(original.bias)
    return new_model, reasons


def _compressed_block(layer, replacements):
    """A copy of the composite `layer` (weights included), with the wrappers
    in place of the layers they replace."""
    wrappers = dict(replacements)

    def make_replacement(location, old):
        wrapper = wrappers[location]
        wrapper.build_from_config(old.get_build_config())
        return wrapper

    return graph.compressed_block(layer, make_replacement, list(wrappers))


def _call_block(block, args, kwargs):
    try:
        return block(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 (the user's call() may raise anything)
        names = ", ".join(f"'{layer.name}'" for _, layer in block.replacements())
        raise ValueError(
            f"Layer '{block.name}' ({type(block.block).__name__}) fails once its "
            f"layers {names} are factorized: {first_error(error)}. Its "
            "call() probably reads those layers' `kernel` directly. Leave them "
            f"whole with exclude=[...] (their paths start with '{block.name}/')."
        ) from None


def _initialization(metric):
    if metric is None:
        return "weights"
    return "outputs_diagonal" if metric.diagonal else "outputs"


def _make_wrapper(site, rank_common, rank_unique, side, group, error, initialization,
                  basis=None, sparse=False):
    layer = site.layer
    common = dict(
        basis=basis,
        sparse=sparse,
        initialization=initialization,
        rank_common=rank_common,
        rank_unique=rank_unique,
        shared_side=side,
        activation=layer.activation,
        use_bias=getattr(layer, "bias", None) is not None,
        group=group,
        relative_error=error,
        name=layer.name,
        dtype=layer.dtype_policy,
        trainable=layer.trainable,
    )
    if site.kind == "dense":
        return FactorizedDense(layer.units, **common)
    if site.kind == "einsum":
        common.pop("use_bias")
        return FactorizedEinsumDense(
            layer.equation, tuple(layer.kernel.shape),
            None if layer.bias is None else tuple(layer.bias.shape), **common)
    wrapper = FactorizedConv1D if site.kind == "conv1d" else FactorizedConv2D
    return wrapper(
        layer.filters,
        layer.kernel_size,
        strides=layer.strides,
        padding=layer.padding,
        dilation_rate=layer.dilation_rate,
        **common,
    )
