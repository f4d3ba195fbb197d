"""Benchmark the cron cleaner on a large session directory (not a test).

Builds a directory of N FileStore session files (default 1,000,000), a
fraction of them (--expired, default 0.5) three hours old, then times
``python -m tinysession clean --max-age 2h``, ``python -m tinysession clean
--keep 1000`` (unless --no-keep), the same clean through the API alone
(``FileStore(DIR).clean(max_age=7200)``: no command line, which also counts
the message logs before and after) and ``find DIR -type f -mmin +120 -delete``,
each in a fresh process, and reports wall time, user and system CPU time and
peak memory (max RSS) of each, from GNU time (apt-get install time), as a
Markdown table. Beside them, the floor of any cleaner written in Python: a
loop over os.scandir() calling entry.stat() on each entry and nothing else.

With --expired 0 nothing is removed (the --keep run is left out: it would
remove), so the directory is built once and every run reads the same one,
the contenders taking turns; otherwise each run gets a freshly built one.
--profile adds the tinysession clean --max-age 2h run under cProfile (its
15 functions of most own time; cProfile slows it about 2x).

    python bench/clean_files.py [--files N] [--expired F] [--dir PARENT] [--repeat R] [--no-keep] [--profile]
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
API_CLEAN = "import sys, tinysession\ntinysession.FileStore(sys.argv[1], max_sessions=None).clean(max_age=7200)\n"
SCANDIR_FLOOR = (
    "import os, sys\n"
    "count = 0\n"
    "with os.scandir(sys.argv[1]) as entries:\n"
    "    for entry in entries:\n"
    "        entry.stat(follow_symlinks=False)\n"
    "        count += 1\n"
)


def build(directory, count, expired=0.5):
    """Fill ``directory`` with ``count`` session files, a fraction ``expired`` of them (spread evenly) 3 hours old."""
    os.makedirs(directory, mode=0o700)
    old = time.time() - 3 * 3600
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    made_old = 0
    for index in range(count):
        path = os.path.join(directory, f"ts-{index:064x}")
        fd = os.open(path, flags, 0o600)
        os.write(fd, PAYLOAD)
        os.close(fd)
        if made_old < expired * (index + 1) - 0.5:
            os.utime(path, (old, old))
            made_old += 1


def run(command):
    """Run ``command`` under GNU time; return (wall s, user s, system s, peak RSS in MB).

    GNU time reports the peak of the command alone: a child's own ru_maxrss
    would start from this script's high-water mark.
    """
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        started = time.perf_counter()
        subprocess.run(["/usr/bin/time", "-o", report.name, "-f", "%U %S %M", *command], check=True,
                       env=dict(os.environ, PYTHONPATH=ROOT))
        elapsed = time.perf_counter() - started
        user, system, peak = report.read().split()[-3:]
        return elapsed, float(user), float(system), int(peak) / 1024


def ratio(value, baseline):
    return f"{value / baseline:.2f}x" if baseline > 0 else "-"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--expired", type=float, default=0.5, help="fraction of the files 3 hours old")
    parser.add_argument("--dir", default=None, help="parent directory for the test tree")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--no-keep", action="store_true", help="leave out the clean --keep 1000 run")
    parser.add_argument("--profile", action="store_true", help="profile the clean --max-age 2h run")
    args = parser.parse_args()
    parent = tempfile.mkdtemp(prefix="tinysession-bench-", dir=args.dir)
    directory = os.path.join(parent, "sessions")
    find = "find -type f -mmin +120 -delete"
    contenders = {
        "tinysession clean --max-age 2h": [sys.executable, "-m", "tinysession", "clean", directory,
                                           "--max-age", "2h", "--quiet"],
        "tinysession clean --keep 1000": [sys.executable, "-m", "tinysession", "clean", directory,
                                          "--keep", "1000", "--quiet"],
        "python: FileStore(DIR).clean(max_age=7200), no command line": [
            sys.executable, "-c", API_CLEAN, directory],
        find: ["find", directory, "-type", "f", "-mmin", "+120", "-delete"],
        "python: os.scandir + entry.stat, nothing else": [sys.executable, "-c", SCANDIR_FLOOR, directory],
    }
    if args.no_keep or args.expired == 0:
        del contenders["tinysession clean --keep 1000"]
    results = {name: [] for name in contenders}
    build_seconds = []
    try:
        for rep in range(args.repeat):
            names = list(contenders)
            names = names[rep % len(names):] + names[:rep % len(names)]
            for name in names:
                if args.expired > 0 or not os.path.isdir(directory):
                    shutil.rmtree(directory, ignore_errors=True)
                    started = time.perf_counter()
                    build(directory, args.files, args.expired)
                    build_seconds.append(time.perf_counter() - started)
                results[name].append(run(contenders[name]))
                wall, user, system, peak = results[name][-1]
                print(f"{name}: {wall:.2f} s wall, {user:.2f} user, {system:.2f} sys, {peak:.1f} MB",
                      file=sys.stderr)
        if args.profile:
            if args.expired > 0:
                shutil.rmtree(directory, ignore_errors=True)
                build(directory, args.files, args.expired)
            profiled = subprocess.run(
                [sys.executable, "-m", "cProfile", "-s", "tottime", "-m", "tinysession", "clean", directory,
                 "--max-age", "2h", "--quiet"], capture_output=True, check=True, text=True,
                env=dict(os.environ, PYTHONPATH=ROOT))
        remaining = len(os.listdir(directory))
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    baseline = [statistics.median(run[i] for run in results[find]) for i in range(3)]
    print(f"\n{args.files:,} session files, {args.expired:.0%} of them expired; median of {args.repeat} run(s); "
          f"building the directory took {statistics.median(build_seconds):.0f} s; "
          f"{remaining:,} files left after the last run\n")
    print("| contender | wall s | × find | user s | × find | sys s | × find | user+sys s | × find | peak RSS |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, runs in results.items():
        wall, user, system = (statistics.median(run[i] for run in runs) for i in range(3))
        cpu, cpu_baseline = user + system, baseline[1] + baseline[2]
        memory = max(run[3] for run in runs)
        print(f"| {name} | {wall:.2f} | {ratio(wall, baseline[0])} | {user:.2f} | {ratio(user, baseline[1])} | "
              f"{system:.2f} | {ratio(system, baseline[2])} | {cpu:.2f} | {ratio(cpu, cpu_baseline)} | "
              f"{memory:.1f} MB |")
    if args.profile:
        lines = profiled.stdout.splitlines()
        start = next(index for index, line in enumerate(lines) if "ncalls" in line)
        print("\n`clean --max-age 2h` under cProfile, its 15 functions of most own time:\n")
        print("```")
        print("\n".join(lines[start - 2:start + 16]))
        print("```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
