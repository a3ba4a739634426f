"""Runs a tool in a child process and drops TensorFlow's native start-up
chatter from its stderr, so that a bad input reads as the tool's one line.

TensorFlow writes INFO and WARNING lines to file descriptor 2 before absl
logging is initialised ("Could not find cuda drivers", ...), whatever
`TF_CPP_MIN_LOG_LEVEL` says. Sending fd 2 to /dev/null would silence them,
and with them the report of a native crash. Instead the tool runs as a child
whose stderr this process reads line by line: the known start-up lines are
dropped, everything else (errors, a crash's report) is passed on, and a child
killed by a signal is reported as such.
"""

import os
import re
import signal
import subprocess
import sys

CHILD_ENV = "MICIK_TOOL_CHILD"
# glog-style INFO/WARNING lines, absl's pre-initialisation notice, and the
# failed CUDA probe of a machine without a GPU.
_NOISE = re.compile(
    r"^(?:[IW]\d{4} \S+ +\d+ \S+:\d+\] "
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|E\d{4} .*failed call to cuInit)"
)


def run_as_filtered_child(script, program):
    """In the parent: runs `script` with this process's arguments as a child,
    filters its stderr, and exits with its status. In the child (or with
    --debug, which shows everything): returns, and the tool runs here."""
    if os.environ.get(CHILD_ENV) or any(a in ("--debug", "--debug=true") for a in sys.argv):
        return
    child = subprocess.Popen([sys.executable, script, *sys.argv[1:]],
                             env=dict(os.environ, **{CHILD_ENV: "1"}),
                             stderr=subprocess.PIPE, text=True, errors="replace")
    try:
        for line in child.stderr:
            if not _NOISE.match(line):
                sys.stderr.write(line)
                sys.stderr.flush()
        status = child.wait()
    except KeyboardInterrupt:
        child.send_signal(signal.SIGINT)
        status = child.wait()
    if status < 0:
        print(f"{program}: error: crashed with signal {signal.Signals(-status).name} (the "
              "lines above are its report); rerun with --debug for everything it printed.",
              file=sys.stderr)
        sys.exit(1)
    sys.exit(status)
