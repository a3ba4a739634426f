"""Renders `device_check.json`, written by `tools/device_check.sh` on a GPU
machine (the checks themselves are that script's steps)."""


def markdown(result, command):
    lines = [
        "# device_check",
        "",
        f"Written {result['written']} by `{command}` at commit {result['git_commit'][:10]} "
        + ("(every step passed)." if result["completed"] else
           "(not every step ran: see the exit codes)."),
        "",
        "| step | exit | seconds | last line |",
        "|---|---:|---:|---|",
    ]
    ratio = None
    for step in result["steps"]:
        last = step["last_line"]
        if step["step"] == "jax_step_ratio" and "result" in step:
            ratio, last = step["result"], "(below)"
        lines.append(f"| {step['step']} | {step['exit']} | {step['seconds']} "
                     f"| {last[:120].replace('|', '/')} |")
    if ratio:
        lines += ["", *_ratio_table(ratio)]
    return "\n".join(lines + [""])


def _ratio_table(ratio):
    teacher, student = ratio["models"]["teacher"], ratio["models"]["student"]
    lines = [
        f"Keras {ratio['keras']} on the {ratio['backend']} backend ({', '.join(ratio['devices'])}): "
        f"the CIFAR-size VGG-16 ({teacher['params']:,} parameters) and its {ratio['ratio']}x "
        f"MICIK student ({student['params']:,}), random inputs, at least {ratio['min_steps']} "
        f"steps and {ratio['min_seconds']:g} s timed per cell after a warm-up.",
        "",
        "| measure | teacher, examples/s | student, examples/s | student / teacher |",
        "|---|---:|---:|---:|",
    ]
    for key, value in ratio["student_over_teacher"].items():
        kind, batch = key.split("_examples_per_second_b")
        kind, policy = kind.split("_", 1)
        lines.append(f"| {kind}, {policy}, batch {batch} | {teacher[key]:,.0f} | {student[key]:,.0f} "
                     f"| {value:.2f}x |")
    return lines
