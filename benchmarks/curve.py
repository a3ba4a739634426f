"""The accuracy-compression curve: MICIK against per-layer low-rank and
magnitude pruning at an equal number of stored parameters, with ablations.

One teacher (a half-width VGG-16-BN, 3.8M parameters) is trained on the
digits; then, for every seed and ratio, each method compresses it to the same
parameter budget and recovers for the same epochs on the same data order:

    micik            shared + unique parts, CE + L_kd + L_sim + L_inh
    per_layer_kd     per-layer SVD (mode="per_layer"), the same losses
    per_layer_ft     per-layer SVD, cross-entropy only (plain fine-tuning)
    pruning          the teacher, magnitude-pruned during recovery to as many
                     nonzero parameters, the same losses
    micik_no_sim     MICIK without L_sim
    micik_no_kd      MICIK without L_kd
    micik_no_unique  shared parts only (mode="common_only")
    micik_no_common  MICIK without the shared part: by construction the same
                     configuration as per_layer_kd, so its rows are that
                     run's, marked `same_run_as`

Rows are saved after every run (`.curve_work/` in the output folder), so
an interrupted suite continues where it stopped when rerun with the same
options.
"""

import dataclasses
import json
import os
import shutil
import statistics
import tempfile
import time

from micik_tf.files import write_figure, write_json
from benchmarks.common import digits_run

METHODS = {
    "micik": dict(mode="micik"),
    "per_layer_kd": dict(mode="per_layer"),
    "per_layer_ft": dict(mode="per_layer", alpha=0.0, beta=0.0, gamma=0.0),
    "pruning": dict(mode="magnitude_pruning"),
    "micik_no_sim": dict(mode="micik", beta=0.0),
    "micik_no_kd": dict(mode="micik", alpha=0.0),
    "micik_no_unique": dict(mode="common_only"),
}
# Methods whose configuration is another's: their rows are that run's.
ALIASES = {"micik_no_common": "per_layer_kd"}
METHOD_ORDER = tuple(METHODS) + tuple(ALIASES)
DEFAULT_RATIOS = (8.0, 16.0, 32.0, 64.0, 128.0)
# Recovery epochs per run: what fits the whole suite (about 100 runs) into an
# hour on 2 CPU cores.
DEFAULT_EPOCHS = 12


def _base_config(smoke, epochs):
    # Ratios up to 128x on a 3.8M-parameter model need ranks below
    # compress()'s default floor of 8.
    return digits_run("vgg16_half", smoke, epochs, min_rank=1, export=())


def run_suite(ratios=None, seeds=3, smoke=False, epochs=DEFAULT_EPOCHS, output_dir=".",
              methods=METHOD_ORDER, log=print):
    """Runs every (seed, ratio, method) cell; returns the results dict."""
    import keras

    ratios = list(ratios or DEFAULT_RATIOS)
    seeds = list(range(seeds))
    unknown = set(methods) - set(METHOD_ORDER)
    if unknown:
        raise ValueError(f"Unknown method(s) {sorted(unknown)}; choose from {METHOD_ORDER}.")
    base = _base_config(smoke, epochs)
    options = {"ratios": ratios, "seeds": seeds, "smoke": smoke, "epochs": base.epochs,
               "methods": list(methods)}
    # Work that outlives one process (the teacher, rows so far); not results.
    work = os.path.join(output_dir, ".curve_work")
    partial_path = os.path.join(work, "state.json")
    state = _load_partial(partial_path, options)
    scratch = tempfile.mkdtemp(prefix="micik_curve_")
    try:
        if state["teacher"] is None or not os.path.exists(state["teacher"]["path"]):
            keras.utils.set_random_seed(0)
            teacher_dir = os.path.join(work, "teacher")
            shutil.rmtree(teacher_dir, ignore_errors=True)
            tic = time.perf_counter()
            teacher = state["teacher"] = dict(_train_teacher(base, teacher_dir),
                                              seconds=time.perf_counter() - tic)
            log(f"teacher: {teacher['params']:,} parameters, "
                f"test accuracy {teacher['accuracy']:.4f}")
            write_json(partial_path, state)
        done = {(r["method"], r["ratio"], r["seed"]) for r in state["rows"]}
        for seed in seeds:
            for ratio in ratios:
                for method in methods:
                    if method in ALIASES or (method, ratio, seed) in done:
                        continue
                    row = _run_cell(base, state["teacher"]["path"], method, ratio, seed, scratch,
                                    os.path.join(work, "students"))
                    state["rows"].append(row)
                    write_json(partial_path, state)
                    log(f"seed {seed} ratio {ratio:>5g} {method:<16} "
                        + (f"{row['achieved_ratio']:.2f}x before {row['accuracy_before_recovery']:.4f} "
                           f"after {row['accuracy']:.4f} ({row['wall_seconds']:.0f}s)"
                           if row["accuracy"] is not None else f"unreachable: {row['error']}"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows = list(state["rows"])
    for alias, source in ALIASES.items():
        if alias in methods:
            rows += [dict(r, method=alias, same_run_as=source) for r in state["rows"]
                     if r["method"] == source]
    result = {
        "model": "vgg16_half (VGG-16-BN at half width) on digits"
                 + (" (smoke: vgg_style_small)" if smoke else ""),
        "teacher_accuracy": state["teacher"]["accuracy"],
        "teacher_params": state["teacher"]["params"],
        "test_examples": 450,
        "epochs": base.epochs,
        "seeds": seeds,
        "learning_rate": base.learning_rate,
        "batch_size": base.batch_size,
        "methods": {m: METHODS.get(m) or {"same_run_as": ALIASES[m]} for m in methods},
        "rows": rows,
        "summary": summarize(rows, state["teacher"]["accuracy"]),
    }
    return result, work


def _train_teacher(base, teacher_dir):
    """Trains the suite's one teacher into teacher_dir: the job's recipe, run
    as a job that trains the teacher and recovers nothing."""
    from micik_tf import job

    config = dataclasses.replace(base, model_dir=teacher_dir, epochs=0, export=(),
                                 calibration_batches=0, mode="magnitude_pruning", ratio=1.01)
    report = job.run(config)
    return {"path": os.path.join(teacher_dir, "teacher.keras"),
            "accuracy": report["teacher_accuracy"], "params": report["params_before"]}


def _load_partial(path, options):
    if os.path.exists(path):
        with open(path) as f:
            state = json.load(f)
        if state.get("options") == options:
            return state
    return {"options": options, "teacher": None, "rows": []}


def _run_cell(base, teacher_path, method, ratio, seed, scratch, cache):
    import keras

    from micik_tf import job

    change = METHODS[method]
    losses = {k: v for k, v in change.items() if k in ("alpha", "beta", "gamma")}
    model_dir = os.path.join(scratch, f"{method}_{ratio:g}_{seed}")
    config = dataclasses.replace(
        base, model_dir=model_dir, teacher=teacher_path, mode=change["mode"], ratio=ratio,
        seed=seed, **losses,
    )
    keras.utils.set_random_seed(seed)
    row = {"method": method, "ratio": ratio, "seed": seed}
    # compress() does not depend on the recovery seed or losses, so each
    # (mode, ratio) is compressed once and later runs start from that student.
    cached = os.path.join(cache, f"{change['mode']}_{ratio:g}.keras")
    if os.path.exists(cached):
        config = dataclasses.replace(config, student=cached)
    try:
        report = job.run(config)
        if not os.path.exists(cached):
            os.makedirs(cache, exist_ok=True)
            shutil.copyfile(os.path.join(model_dir, "student_init.keras"), cached)
    except job.UsageError as error:
        return dict(row, achieved_ratio=None, params=None, accuracy_before_recovery=None,
                    accuracy=None, error=str(error), wall_seconds=None)
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    return dict(
        row,
        achieved_ratio=report["ratio"],
        params=report["params_after"],
        accuracy_before_recovery=report["student_accuracy_before_recovery"],
        accuracy=report["student_accuracy"],
        teacher_accuracy=report["teacher_accuracy"],
        wall_seconds=report["wall_seconds"],
    )


def summarize(rows, teacher_accuracy):
    """Mean and standard deviation over seeds of each (method, ratio) cell."""
    cells = {}
    for row in rows:
        cells.setdefault((row["method"], row["ratio"]), []).append(row)
    summary = []
    for (method, ratio), group in sorted(
        cells.items(), key=lambda kv: (kv[0][1], METHOD_ORDER.index(kv[0][0]))
    ):
        ok = [r for r in group if r["accuracy"] is not None]
        if not ok:
            summary.append({"method": method, "ratio": ratio, "seeds": 0, "error": group[0]["error"]})
            continue
        acc = [r["accuracy"] for r in ok]
        before = [r["accuracy_before_recovery"] for r in ok]
        summary.append({
            "method": method, "ratio": ratio, "seeds": len(ok),
            "params": statistics.mean(r["params"] for r in ok),
            "achieved_ratio": statistics.mean(r["achieved_ratio"] for r in ok),
            "accuracy_mean": statistics.mean(acc),
            "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "before_mean": statistics.mean(before),
            "before_std": statistics.stdev(before) if len(before) > 1 else 0.0,
            "drop_points": 100 * (teacher_accuracy - statistics.mean(acc)),
        })
    return summary


def markdown(result, command):
    runs = [r for r in result["rows"] if "same_run_as" not in r]
    lines = [
        f"# curve{' (smoke)' if result['smoke'] else ''}",
        "",
        f"Teacher: {result['model']}, {result['teacher_params']:,} parameters, test accuracy "
        f"{result['teacher_accuracy']:.4f}. Every method gets the same parameter budget, "
        f"{result['epochs']} recovery epochs (Adam, cosine from {result['learning_rate']:g}, "
        f"batch {result['batch_size']}) and the same data order per seed; mean ± std over "
        f"{len(result['seeds'])} seed(s). The {len(runs)} runs took "
        f"{sum(r['wall_seconds'] or 0 for r in runs) / 60:.0f} min in all on "
        f"{result['machine']['cpu_count']} CPU cores. Written {result['written']} by `{command}`.",
        "",
        "![accuracy against compression ratio](curve.png)",
        "",
        "| ratio | method | params | before recovery | after recovery | drop (points) |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for cell in result["summary"]:
        if not cell["seeds"]:
            lines.append(f"| {cell['ratio']:g} | {cell['method']} | - | - | unreachable | - |")
            continue
        lines.append(
            f"| {cell['ratio']:g} | {cell['method']} | {cell['params']:,.0f} "
            f"| {cell['before_mean']:.4f} ± {cell['before_std']:.4f} "
            f"| {cell['accuracy_mean']:.4f} ± {cell['accuracy_std']:.4f} "
            f"| {cell['drop_points']:.2f} |"
        )
    lines += [
        "",
        "params: stored parameters after compression (for pruning, the nonzero ones), "
        "every variable counted once, biases and BatchNorm included. micik_no_common is "
        "per_layer_kd's run: without a shared part, MICIK with its full losses is exactly "
        "that configuration. The digits test split has 450 images: one image is 0.22 points.",
        "",
        "MICIK (a) against the best of the baselines (b) per-layer SVD with the same losses, "
        "(c) per-layer SVD fine-tuned, (d) magnitude pruning, after recovery; the margin counts "
        "as a win or a loss only when it exceeds both cells' seed std added:",
        "",
        "| ratio | MICIK | best baseline | margin (points) | verdict |",
        "|---:|---:|---|---:|---|",
    ]
    lines += [
        f"| {c['ratio']:g} | {c['micik']:.4f} | {c['baseline']} {c['baseline_accuracy']:.4f} "
        f"| {c['margin_points']:+.2f} | {c['verdict']} |"
        for c in compare(result["summary"])
    ]
    cells = {(c["method"], c["ratio"]): c for c in result["summary"] if c["seeds"]}
    ablations = [m for m in ABLATIONS if any(k[0] == m for k in cells)]
    if ablations and any(k[0] == "micik" for k in cells):
        lines += [
            "",
            "What each part of MICIK is worth: full MICIK's accuracy minus the ablation's, in "
            "points (positive: the part helps), mean over seeds:",
            "",
            "| ratio | " + " | ".join(ABLATIONS[m] for m in ablations) + " |",
            "|---:|" + "---:|" * len(ablations),
        ]
        for ratio in sorted({k[1] for k in cells}):
            if ("micik", ratio) not in cells:
                continue
            full = cells[("micik", ratio)]["accuracy_mean"]
            lines.append(f"| {ratio:g} | " + " | ".join(
                f"{100 * (full - cells[(m, ratio)]['accuracy_mean']):+.2f}"
                if (m, ratio) in cells else "-" for m in ablations) + " |")
    lines.append("")
    return "\n".join(lines)


ABLATIONS = {"micik_no_sim": "L_sim", "micik_no_kd": "L_kd", "micik_no_unique": "unique part",
             "micik_no_common": "common part"}


BASELINES = ("per_layer_kd", "per_layer_ft", "pruning")


def compare(summary):
    """Per ratio: MICIK against the best baseline, with a verdict that
    counts a margin only beyond the seeds' spread."""
    cells = {(c["method"], c["ratio"]): c for c in summary if c["seeds"]}
    out = []
    for ratio in sorted({c["ratio"] for c in summary}):
        micik = cells.get(("micik", ratio))
        rivals = [cells[(m, ratio)] for m in BASELINES if (m, ratio) in cells]
        if micik is None or not rivals:
            continue
        best = max(rivals, key=lambda c: c["accuracy_mean"])
        margin = micik["accuracy_mean"] - best["accuracy_mean"]
        spread = micik["accuracy_std"] + best["accuracy_std"]
        verdict = "MICIK wins" if margin > spread else "MICIK loses" if -margin > spread else "tie"
        out.append({"ratio": ratio, "micik": micik["accuracy_mean"], "baseline": best["method"],
                    "baseline_accuracy": best["accuracy_mean"], "margin_points": 100 * margin,
                    "verdict": verdict})
    return out


def plot(result, path):
    """Accuracy after recovery against ratio, one line per method."""
    from benchmarks.common import figure

    fig, ax = figure(size=(8, 5))
    ablation = dict(linestyle="--", alpha=0.7, linewidth=1)
    styles = {"micik": dict(linewidth=2.5, color="C3"), "per_layer_kd": dict(color="C0"),
              "per_layer_ft": dict(color="C0", linestyle=":"), "pruning": dict(color="C2"),
              "micik_no_sim": dict(ablation, color="C4"), "micik_no_kd": dict(ablation, color="C1"),
              "micik_no_unique": dict(ablation, color="C5")}
    for method in METHOD_ORDER:
        if method in ALIASES:
            continue  # drawn under its source's line
        cells = [c for c in result["summary"] if c["method"] == method and c["seeds"]]
        if not cells:
            continue
        style = styles.get(method, ablation)
        ax.errorbar([c["ratio"] for c in cells], [c["accuracy_mean"] for c in cells],
                    yerr=[c["accuracy_std"] for c in cells], marker="o", capsize=3,
                    label=method, **style)
    ax.axhline(result["teacher_accuracy"], color="k", linestyle="--", label="teacher")
    ax.set_xscale("log", base=2)
    ratios = sorted({c["ratio"] for c in result["summary"]})
    ax.set_xticks(ratios, [f"{r:g}x" for r in ratios])
    ax.set_xlabel("compression ratio (parameters)")
    ax.set_ylabel("test accuracy after recovery")
    ax.set_title(f"{result['model']}: accuracy vs compression")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    write_figure(fig, path)
