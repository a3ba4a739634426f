"""The run's folder (`--model_dir`): whether this run may use it, and where
each of its files goes.

A folder belongs to one run, named by its settings' fingerprint in
`run.json`. A run reuses what the folder holds (the teacher it trained, the
compressed student, checkpoints) only when the fingerprint says those files
are this run's; a run with other settings is refused, naming each setting
that differs, unless the user allows those changes (`--allow_changes`), which
are then recorded. A folder holding files but no `run.json` belongs to an
unknown run and is refused too. Nothing of another run is ever overwritten.
"""

import datetime
import os
import tempfile

from micik_tf import files
from micik_tf.job.config import CHANGEABLE, UsageError
from micik_tf.recovery import strategies

RUN_FILE = "run.json"
# What a run writes into its folder; any of them without a run.json means the
# folder holds an unknown run.
RUN_OUTPUTS = ("teacher.keras", "teacher_history.json", "student_init.keras", "checkpoints",
               "best.weights.h5", "history.json", "report.json", "student.keras", "export",
               "logs", "training_curves.png")


class Workspace:
    """A run's folder, opened for one config.

    Attributes:
        model_dir: the folder.
        resuming: whether the folder holds this run already (same fingerprint,
            or allowed changes), whose files may be reused.
        changes: every change allowed on a resume so far, as dicts
            `{"setting", "was", "now", "at"}` (also kept in `run.json`).
        changed_now: the settings this resume changed.
    """

    def __init__(self, config, chief=True):
        self.config, self.chief = config, chief
        self.model_dir = config.model_dir
        self.resuming, self.changes, self.changed_now = False, [], set()

    @classmethod
    def open(cls, config, strategy):
        """Checks `config.model_dir` against `config`; raises `UsageError` if
        this run may not use it. Creates it (and `run.json`) for a new run."""
        workspace = cls(config, strategies.is_chief(strategy))
        workspace._open()
        return workspace

    def path(self, name):
        return os.path.join(self.model_dir, name)

    def _open(self):
        if os.path.isfile(self.model_dir):
            raise UsageError(
                f"--model_dir={self.model_dir} is an existing file; give a folder "
                "for this run (it is created if missing)."
            )
        mine = self.config.fingerprint()
        run_file = self.path(RUN_FILE)
        found = [n for n in RUN_OUTPUTS if os.path.exists(self.path(n))]
        if os.path.exists(run_file) and found:
            recorded = files.read_json(run_file)
            self.changes = list(recorded.get("changes", []))
            self._accept(recorded.get("fingerprint", {}), mine)
            self.resuming = True
        else:
            # A run.json alone is a run that stopped before writing anything
            # (bad data, a teacher that would not load): its settings bind nothing.
            if found:
                raise UsageError(
                    f"--model_dir={self.model_dir} holds {', '.join(found)} of an unknown "
                    f"run (no {RUN_FILE}). Use a new --model_dir; nothing there was touched."
                )
        if self.chief:
            os.makedirs(self.model_dir, exist_ok=True)
            files.write_json(run_file, {"fingerprint": mine, "changes": self.changes})

    def _accept(self, theirs, mine):
        """Refuses a resume whose settings differ, except for allowed changes.
        A setting the recorded run predates is no difference at its default:
        the run was made as that default makes it."""
        defaults = type(self.config)(model_dir=self.model_dir).fingerprint()
        differ = {k: (theirs.get(k), mine.get(k)) for k in sorted(set(theirs) | set(mine))
                  if theirs.get(k) != mine.get(k)
                  and not (k not in theirs and k in defaults and mine.get(k) == defaults[k])}
        refused = {k: v for k, v in differ.items() if k not in self.config.allow_changes}
        if refused:
            detail = "; ".join(f"--{k}: {a!r} there, {b!r} now" for k, (a, b) in refused.items())
            allowable = [k for k in refused if k in CHANGEABLE]
            hint = (f" To continue that run with new values, pass "
                    f"--allow_changes={','.join(allowable)}." if allowable == list(refused)
                    else " Use a new --model_dir, or delete that one to start over.")
            raise UsageError(
                f"--model_dir={self.model_dir} holds a run with other settings ({detail})."
                + hint
            )
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.changes += [{"setting": k, "was": a, "now": b, "at": now}
                         for k, (a, b) in differ.items()]
        self.changed_now = set(differ)

    def reusable(self, name):
        """The path of `name` if this run may reuse it (a resumed run's own
        file), else None."""
        path = self.path(name)
        return path if self.resuming and os.path.exists(path) else None

    def save_model(self, model, name, strategy):
        """Saves `model` as `name` in the folder, atomically.

        Under a multi-worker strategy every worker must save (reading
        distributed variables is collective); only the chief's file is kept.
        """
        if not strategies.is_chief(strategy):
            with tempfile.TemporaryDirectory() as scratch:
                model.save(os.path.join(scratch, "discard.keras"))
            return None
        path = self.path(name)
        files.save_model(model, path)
        return path

