"""What a phone pays for each method of the accuracy suites: latency, runtime
memory, bytes and multiply-adds, beside the accuracy, and which method to
pick under each constraint.

It reads what `--suite=curve` (and `--suite=vit_mha`) left: the accuracy
rows in `<suite>.json` and the seed-0 float32 and int8 `.tflite` files each
cell exported (`.<suite>_work/exports/<regime>-<method>-<ratio>/`, the files
the accuracy was measured on), and exports the teacher the same way. Then,
in one process:

- **Latency**: per file, median and p90 seconds of a batch-1 invoke with
  LiteRT on this CPU, 1 and 2 threads, every model warmed up and timed in
  blocks in a fresh random order each round (`deploy.latency`), the teacher
  among them; reported as ratios to the teacher.
- **Runtime memory**: the peak resident memory one inference adds in a fresh
  process, less a trivial model's (`deploy.memory.METHOD`).
- **Bytes**: raw and gzip'd, of the same files.
- **MACs** per example (`deploy.macs`) of the Keras model each cell started
  recovery from (the compressed student; for pruning the teacher's shape).

tfmot's cells run in a tf_keras subprocess and keep no file here: their
`.tflite` has the teacher's dense shape, like LAMP pruning's, whose figures
stand for both.

The exported files are not committed (tens of MB). Where a cell's run left
none on this machine (it ran in another session), the cell is measured on
the same export of the student it started recovery from (`files:
"starting student"` on its row): latency and runtime memory depend on the
graph and its tensor shapes, which recovery does not change, not on the
trained values. Bytes are always the ones its run recorded for its own
files (seed 0), since gzip does depend on the values.

    python tools/benchmark.py --suite=deploy_axes
"""

import os

from micik_tf.files import read_json, write_figure

from benchmarks import curve
from benchmarks.common import figure, git_commit

SUITES = ("curve", "vit_mha")
FORMATS = {"float32": "model_float32.tflite", "int8": "model_int8.tflite"}
THREADS = (1, 2)
# The constraints of the "which to use" table, each a cost of the int8 file,
# and the target ratios: under a constraint at ratio r, a method may cost at
# most 1/r of the teacher's.
CONSTRAINTS = (("gzip'd bytes", "gzip_bytes"), ("runtime memory", "memory_bytes"),
               ("latency (2 threads)", "latency_2"))
TARGETS = (2.0, 4.0, 8.0, 16.0, 32.0)
# The target ratios the summary sentence covers.
SUMMARY_TARGETS = (8.0, 16.0, 32.0)
# The regime whose accuracies are set against the costs: the longest budget
# the suite has, where the methods are most nearly recovered.
REGIME_PREFERENCE = ("limited_long", "limited", "full")


def run_suite(smoke, output_dir, log=print):
    result = {"suites": {}, "smoke": smoke, "git_commit": git_commit()}
    for name in SUITES:
        work = os.path.join(output_dir, f".{name}_work")
        accuracy_path = os.path.join(output_dir, f"{name}.json")
        # The exports may be gone (a fresh checkout): cells are then measured
        # on their starting students, remade from the suite's teacher.
        if not os.path.isdir(work) or not os.path.exists(accuracy_path):
            log(f"deploy_axes: {name}: no .{name}_work or no {name}.json yet; skipped")
            continue
        result["suites"][name] = _measure(name, work, read_json(accuracy_path), smoke, log)
    if not result["suites"]:
        raise ValueError("deploy_axes: run --suite=curve (or vit_mha) first: it trains the "
                         "models this suite measures.")
    return result, None


def _measure(name, work, accuracy, smoke, log):
    from micik_tf.deploy import latency, memory
    from micik_tf.deploy.checks import gzip_size

    suite = _suite_state(name, work, accuracy)
    cells, recorded, left_out = _cells(suite, accuracy, log)
    cells["teacher"] = _teacher_files(suite)
    sample = _sample(name, accuracy)
    blocks = 3 if smoke else latency.BLOCKS
    measured = {cell: {} for cell in cells}
    for fmt in FORMATS:
        paths = {cell: files[fmt] for cell, files in cells.items()}
        # A file that several cells share (a starting student) is timed once.
        distinct = {path: path for path in paths.values()}
        for threads in THREADS:
            log(f"deploy_axes: {name} {fmt}: latency of {len(distinct)} files, "
                f"{threads} thread(s)")
            stats = latency.latencies(distinct, sample, threads, blocks=blocks)
            for cell, path in paths.items():
                measured[cell][f"{fmt}_latency_{threads}"] = stats[path]
        log(f"deploy_axes: {name} {fmt}: runtime memory")
        found = memory.runtime_memory(distinct, repeats=1 if smoke else 3)["bytes"]
        for cell, path in paths.items():
            measured[cell][f"{fmt}_memory_bytes"] = found[path]
    measured["teacher"].update({f"{fmt}_{kind}": size for fmt, path in cells["teacher"].items()
                                for kind, size in (("bytes", os.path.getsize(path)),
                                                   ("gzip_bytes", gzip_size(path)))})
    macs = _macs(suite, cells)
    rows = []
    for cell in cells:
        if cell == "teacher":
            rows.append(dict(regime="teacher", method="teacher", ratio=1.0, files="exported",
                             macs=macs["teacher"], **_accuracy(accuracy, "teacher", None, None),
                             **measured[cell]))
            continue
        rows.append(dict(regime=cell[0], method=cell[1], ratio=cell[2], macs=macs.get(cell),
                         **_accuracy(accuracy, *cell), **recorded[cell], **measured[cell]))
    return {"rows": _with_ratios(rows), "memory_method": memory.METHOD, "left_out": left_out,
            "teacher_accuracy": accuracy["teacher"]["accuracy"],
            "regime": next((r for r in REGIME_PREFERENCE if any(
                row["regime"] == r for row in rows)), None)}


def _cells(suite, accuracy, log):
    """`({cell: {format: path}}, {cell: what its row recorded}, [cells left
    out])` for each seed-0 cell of the accuracy rows but tfmot's, a cell
    being `(regime, method, ratio)`: the files its run kept, else those of
    its starting student (`_starting_files`); recorded: the files' origin
    and the bytes its run measured. A cell whose run has no checked file of
    some format (its row names the error), or whose starting student's file
    fails its check, is left out: `[regime, method, ratio, "run" or
    "starting student"]`."""
    cells, recorded, left_out = {}, {}, []
    for row in accuracy["rows"]:
        if row["seed"] != 0 or row["method"] == "tfmot" or row.get("accuracy") is None \
                or row.get("same_run_as"):
            continue
        cell = (row["regime"], row["method"], row["ratio"])
        if any(key in row for key in curve.EXPORT_ERRORS):
            # Its run's file failed its check (the row says why): nothing a
            # phone could run, so no cost to measure.
            log(f"deploy_axes: {curve.cell_name(*cell)}: its run kept no checked file "
                "of every format; left out")
            left_out.append([*cell, "run"])
            continue
        kept = os.path.join(suite.work, "exports", curve.cell_name(*cell))
        paths = {fmt: os.path.join(kept, file) for fmt, file in FORMATS.items()}
        kept_here = all(os.path.exists(p) for p in paths.values())
        found = paths if kept_here else _starting_files(suite, cell, log)
        if found is None:
            left_out.append([*cell, "starting student"])
            continue
        cells[cell] = found
        recorded[cell] = {"files": "exported" if kept_here else "starting student",
                          **{f"{fmt}_{kind}": row[f"tflite_{fmt}_{kind}"] for fmt in FORMATS
                             for kind in ("bytes", "gzip_bytes")}}
    return cells, recorded, left_out


def _suite_state(name, work, accuracy):
    """The suite's `_Suite` (its protocol, teacher and student files)."""
    from benchmarks import vit_mha

    protocol = {"curve": curve, "vit_mha": vit_mha}[name]
    smoke = accuracy.get("smoke")
    chosen = (protocol.SMOKE if smoke else protocol.PROTOCOL) if name == "vit_mha" else (
        curve.protocol_for(accuracy.get("quick", False), smoke))
    suite = curve._Suite(chosen, work, lambda message: None)
    suite.teacher()
    return suite


def _teacher_files(suite):
    """The teacher's float32 and int8 files, exported once into exports/teacher."""
    from micik_tf import files

    folder = os.path.join(suite.work, "exports", "teacher")
    return _export_once(suite, lambda: files.load_model(suite.teacher_info["path"]), folder)


def _export_once(suite, load, folder):
    """`{format: path}` of `load()`'s files in `folder`, exported if missing
    (int8 calibrated on the training split, as the cells' exports are)."""
    import micik_tf
    from micik_tf.recovery import pipeline

    paths = {fmt: os.path.join(folder, file) for fmt, file in FORMATS.items()}
    if not all(os.path.exists(p) for p in paths.values()):
        representative, _ = pipeline.to_arrays(suite.data().train, 128)
        micik_tf.export(load(), folder, formats=("tflite", "tflite_int8"),
                        representative_data=representative, overwrite=True)
    return paths


def _starting_model(suite, regime, method, ratio):
    """The path of the Keras model `method`'s cell started recovery from, or
    None for pruning (the teacher's own graph: its zeros are still stored)."""
    settings = dict(curve.METHODS.get(method) or {})
    fraction = suite.protocol.regime(regime).train_fraction
    if settings.get("thin"):
        return suite._thin_student(ratio)
    if settings.get("channels"):
        return suite._channels_student(fraction, ratio)
    if settings.get("mode", "magnitude_pruning") == "magnitude_pruning":
        return None
    return suite._compressed(fraction, settings, ratio)


def _starting_files(suite, cell, log):
    """The float32 and int8 files of the cell's starting student, exported once
    into exports-start/ (the teacher's for pruning); None if a file fails its
    check (before recovery a part may output zeros on all calibration data,
    which int8 cannot range; its recovered model's file passed)."""
    from micik_tf import files

    path = _starting_model(suite, *cell)
    if path is None:
        return _teacher_files(suite)
    folder = os.path.join(suite.work, "exports-start", os.path.basename(path)[:-len(".keras")])
    log(f"deploy_axes: {curve.cell_name(*cell)}: no kept export here; measuring the "
        "starting student's")
    try:
        return _export_once(suite, lambda: files.load_model(path), folder)
    except ValueError as error:
        log(f"deploy_axes: {curve.cell_name(*cell)}: its starting student's file fails "
            f"its check ({str(error)[:120]}...); left out")
        return None


def _sample(name, accuracy):
    import numpy as np

    shape = accuracy["teacher"]["input_shape"]
    return np.random.default_rng(0).random(shape).astype("float32")


def _macs(suite, cells):
    """Multiply-adds per example of the model each cell recovered from."""
    from micik_tf import files
    from micik_tf.deploy.macs import forward_macs

    teacher = forward_macs(files.load_model(suite.teacher_info["path"]))["total"]
    out = {"teacher": teacher}
    for cell in cells:
        if cell != "teacher":
            path = _starting_model(suite, *cell)
            # Pruning's dense kernels with zeros: the teacher's work; "": no student.
            out[cell] = (teacher if path is None else
                         forward_macs(files.load_model(path))["total"] if path else None)
    return out


def _accuracy(accuracy, regime, method, ratio):
    if regime == "teacher":
        return {"accuracy": accuracy["teacher"]["accuracy"], "accuracy_std": 0.0, "seeds": 1}
    for cell in accuracy["summary"]:
        if (cell["regime"], cell["method"], cell["ratio"]) == (regime, method, ratio) \
                and cell["seeds"]:
            return {"accuracy": cell["accuracy_mean"], "accuracy_std": cell["accuracy_std"],
                    "seeds": cell["seeds"], "params": cell["params"]}
    return {"accuracy": None, "accuracy_std": None, "seeds": 0}


def _with_ratios(rows):
    """Each cost also as a ratio to the teacher's (below 1: cheaper)."""
    teacher = next(r for r in rows if r["method"] == "teacher")
    for row in rows:
        for fmt in FORMATS:
            for threads in THREADS:
                key = f"{fmt}_latency_{threads}"
                row[f"{key}_ratio"] = row[key]["median"] / teacher[key]["median"]
            for key in (f"{fmt}_memory_bytes", f"{fmt}_gzip_bytes", f"{fmt}_bytes"):
                row[f"{key}_ratio"] = row[key] / max(teacher[key], 1)
        row["macs_ratio"] = (row["macs"] / teacher["macs"]) if row["macs"] else None
    return rows


def _cost(row, key):
    """The int8 file's cost under a constraint, as a ratio to the teacher's."""
    return row[{"gzip_bytes": "int8_gzip_bytes_ratio", "memory_bytes": "int8_memory_bytes_ratio",
                "latency_2": "int8_latency_2_ratio"}[key]]


def which_to_use(suite):
    """Per constraint and target ratio `r`: the most accurate cell whose int8
    file costs at most 1/r of the teacher's (any method, any compression
    ratio), or the cheapest one when none fits."""
    rows = [r for r in suite["rows"] if r["regime"] == suite["regime"] and
            r["accuracy"] is not None]
    table = []
    for label, key in CONSTRAINTS:
        for target in TARGETS:
            fits = [r for r in rows if _cost(r, key) <= 1 / target]
            entry = {"constraint": label, "key": key, "target": target}
            if fits:
                best = max(fits, key=lambda r: r["accuracy"])
                entry.update(method=best["method"], ratio=best["ratio"], cost=_cost(best, key),
                             accuracy=best["accuracy"], accuracy_std=best["accuracy_std"],
                             micik_leads=best["method"].startswith("micik"))
            else:
                cheapest = min(rows, key=lambda r: _cost(r, key)) if rows else None
                entry.update(method=None, cheapest=cheapest and cheapest["method"],
                             cheapest_cost=cheapest and _cost(cheapest, key))
            table.append(entry)
    return table


def markdown(result, command):
    lines = [f"# deploy_axes{' (smoke)' if result['smoke'] else ''}", "",
             f"Written by `{command}` at commit `{result['git_commit']}`: what each cell's "
             "exported files cost on this CPU (LiteRT, batch 1), beside its accuracy. "
             "Costs are ratios to the teacher's file of the same format (below 1: cheaper)."]
    for name, suite in result["suites"].items():
        regime = suite["regime"]
        lines += ["", f"## {name} ({regime} regime)", "",
                  f"![accuracy against latency, memory and bytes](deploy_axes_{name}.png)", "",
                  f"Runtime memory: {suite['memory_method']}.", "",
                  _origins(suite), "",
                  "| method | ratio | accuracy | int8 latency 1 / 2 threads | float32 latency 1 / 2 "
                  "threads | int8 memory | float32 memory | int8 gzip'd bytes | MACs |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sorted((r for r in suite["rows"] if r["regime"] in (regime, "teacher")),
                        key=lambda r: (r["ratio"], r["method"])):
            accuracy = "-" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
            lines.append(
                f"| {r['method']} | {r['ratio']:g} | {accuracy} "
                f"| {r['int8_latency_1_ratio']:.2f} / {r['int8_latency_2_ratio']:.2f} "
                f"| {r['float32_latency_1_ratio']:.2f} / {r['float32_latency_2_ratio']:.2f} "
                f"| {r['int8_memory_bytes_ratio']:.2f} | {r['float32_memory_bytes_ratio']:.2f} "
                f"| {r['int8_gzip_bytes_ratio']:.3f} "
                f"| {'-' if r['macs_ratio'] is None else format(r['macs_ratio'], '.3f')} |")
        teacher = next(r for r in suite["rows"] if r["method"] == "teacher")
        lines += ["", f"The teacher: int8 {teacher['int8_latency_2']['median'] * 1e3:.3f} ms "
                  f"(2 threads), {teacher['int8_memory_bytes']:,} bytes at run time, "
                  f"{teacher['int8_gzip_bytes']:,} gzip'd bytes, {teacher['macs']:,} MACs.", "",
                  "Which to use: under each constraint, a budget of 1/r of the teacher's int8 "
                  "cost; the most accurate cell (any method, any compression ratio) that fits:", "",
                  "| constraint | target r | most accurate method | its cost | accuracy |",
                  "|---|---:|---|---:|---:|"]
        for entry in which_to_use(suite):
            if entry["method"] is None:
                lines.append(f"| {entry['constraint']} | {entry['target']:g}x | none fits "
                             f"(cheapest: {entry['cheapest']}, {entry['cheapest_cost']:.3f}) "
                             "| - | - |")
            else:
                lead = " (MICIK leads)" if entry["micik_leads"] else ""
                lines.append(f"| {entry['constraint']} | {entry['target']:g}x "
                             f"| {entry['method']} at {entry['ratio']:g}x{lead} "
                             f"| {entry['cost']:.3f} | {entry['accuracy']:.4f} |")
        lines += ["", _leaders(suite)]
    lines.append("")
    return "\n".join(lines)


def _origins(suite):
    """Which files the latency and memory of the cells were measured on."""
    start = sum(r.get("files") == "starting student" for r in suite["rows"])
    left_out = suite.get("left_out") or []
    whose = {"run": "their runs' int8 or float32 file failed its check (the accuracy rows "
                    "say why)",
             "starting student": "their starting students' file, exported here, failed its "
                                 "check"}
    out = "".join(
        f" Left out, as {why}: {', '.join(curve.cell_name(*c[:3]) for c in cells)}."
        for kind, why in whose.items()
        if (cells := [c for c in left_out if c[3] == kind]))
    if not start:
        return "Every cell was measured on the files its run exported." + out
    return (f"{start} of {len(suite['rows']) - 1} cells were measured on the export of the "
            "student they started recovery from (their runs' files are not kept on this "
            "machine): latency and memory depend on the graph and tensor shapes, which "
            "recovery leaves as they are. Bytes are the ones each run recorded." + out)


def _leaders(suite):
    """One sentence per target ratio: which method leads each axis."""
    table = which_to_use(suite)
    sentences = []
    for target in SUMMARY_TARGETS:
        parts = []
        for entry in (e for e in table if e["target"] == target):
            parts.append(f"{entry['constraint']}: "
                         + (f"{entry['method']} ({entry['accuracy']:.4f})" if entry["method"]
                            else "no method fits"))
        sentences.append(f"At {target:g}x, " + "; ".join(parts) + ".")
    return " ".join(sentences)


PANELS = (("int8_latency_2_ratio", "int8 latency, 2 threads (x teacher)"),
          ("int8_memory_bytes_ratio", "int8 runtime memory (x teacher)"),
          ("int8_gzip_bytes_ratio", "int8 gzip'd bytes (x teacher)"))


def plot(result, path):
    """deploy_axes_<suite>.png: accuracy against each cost, a line per method."""
    from matplotlib import ticker

    folder, written = os.path.dirname(path), []
    for name, suite in result["suites"].items():
        fig, axes = figure(1, len(PANELS), size=(6 * len(PANELS), 4.5))
        rows = [r for r in suite["rows"] if r["regime"] == suite["regime"] and r["accuracy"]]
        teacher = next(r for r in suite["rows"] if r["method"] == "teacher")
        for ax, (key, label) in zip(axes, PANELS):
            for method in sorted({r["method"] for r in rows}):
                points = sorted((r for r in rows if r["method"] == method), key=lambda r: r[key])
                ax.plot([r[key] for r in points], [r["accuracy"] for r in points], marker="o",
                        label=method,
                        **curve.STYLES.get(method, dict(linestyle="--", alpha=0.6)))
            ax.plot([teacher[key]], [teacher["accuracy"]], "k*", markersize=12, label="teacher")
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            ax.set_xlabel(label)
            ax.set_ylabel("test accuracy after recovery")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{name}: accuracy against what a phone pays ({suite['regime']} regime)")
        fig.tight_layout()
        target = os.path.join(folder, f"deploy_axes_{name}.png")
        write_figure(fig, target)
        written.append(target)
    return written
