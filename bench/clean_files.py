"""Benchmark the cron cleaner on a large session directory (not a test).

Builds a directory of N FileStore session files (default 1,000,000), half of
them three hours old, then times ``python -m tinysession clean --max-age 2h``,
``python -m tinysession clean --keep 1000`` and ``find DIR -type f -mmin +120
-delete``, each in a fresh process on a freshly built directory, and reports
wall time and peak memory (max RSS, from GNU time: apt-get install time) of
each as a Markdown table.

    python bench/clean_files.py [--files N] [--dir PARENT] [--repeat R]
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PAYLOAD = b'{"created":1700000000.0,"data":{"user":42,"csrf":"' + b"x" * 43 + b'"}}'


def build(directory, count):
    """Fill ``directory`` with ``count`` session files, the odd ones 3 hours old."""
    os.makedirs(directory, mode=0o700)
    old = time.time() - 3 * 3600
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    for index in range(count):
        path = os.path.join(directory, f"ts-{index:064x}")
        fd = os.open(path, flags, 0o600)
        os.write(fd, PAYLOAD)
        os.close(fd)
        if index % 2:
            os.utime(path, (old, old))


def run(command):
    """Run ``command`` under GNU time; return (seconds, peak RSS in MB).

    GNU time reports the peak of the command alone: a child's own ru_maxrss
    would start from this script's high-water mark.
    """
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        started = time.perf_counter()
        subprocess.run(["/usr/bin/time", "-o", report.name, "-f", "%M", *command], check=True,
                       env=dict(os.environ, PYTHONPATH=ROOT))
        elapsed = time.perf_counter() - started
        return elapsed, int(report.read().split()[-1]) / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--dir", default=None, help="parent directory for the test tree")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    parent = tempfile.mkdtemp(prefix="tinysession-bench-", dir=args.dir)
    directory = os.path.join(parent, "sessions")
    contenders = {
        "tinysession clean --max-age 2h": [sys.executable, "-m", "tinysession", "clean", directory,
                                           "--max-age", "2h", "--quiet"],
        "tinysession clean --keep 1000": [sys.executable, "-m", "tinysession", "clean", directory,
                                          "--keep", "1000", "--quiet"],
        "find -type f -mmin +120 -delete": ["find", directory, "-type", "f", "-mmin", "+120", "-delete"],
    }
    results = {name: [] for name in contenders}
    try:
        for _ in range(args.repeat):
            for name, command in contenders.items():
                shutil.rmtree(directory, ignore_errors=True)
                build(directory, args.files)
                results[name].append(run(command))
                print(f"{name}: {results[name][-1][0]:.2f} s, {results[name][-1][1]:.1f} MB", file=sys.stderr)
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    baseline = statistics.median(seconds for seconds, _ in results["find -type f -mmin +120 -delete"])
    print(f"\n{args.files:,} session files, half expired; median of {args.repeat} run(s)\n")
    print("| contender | seconds | vs find | peak RSS |")
    print("| --- | ---: | ---: | ---: |")
    for name, runs in results.items():
        seconds = statistics.median(s for s, _ in runs)
        memory = max(m for _, m in runs)
        print(f"| {name} | {seconds:.2f} | {seconds / baseline:.2f}x | {memory:.1f} MB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
