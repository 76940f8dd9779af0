"""Run a command and write its peak RSS: ``python benchmarks/peak_rss.py OUT.txt CMD ...``.

On Linux a child started from a large process inherits that process's peak RSS at ``exec`` (``ru_maxrss``
keeps the high-water mark of the memory image it replaced), so a benchmark with gigabytes of its own would see
them in every child. This launcher is small and imports nothing but the standard library: the command it starts
reports only its own memory. Exit status and output are the command's.
"""
import os
import signal
import subprocess
import sys


def main() -> int:
    out, cmd = sys.argv[1], sys.argv[2:]
    proc = subprocess.Popen(cmd)
    signal.signal(signal.SIGTERM, lambda *_: proc.kill())  # the benchmark's timeout reaches the command
    _, status, usage = os.wait4(proc.pid, 0)
    with open(out, "w", encoding="utf-8") as f:
        f.write(str(usage.ru_maxrss))  # KiB on Linux, bytes on macOS
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main())
