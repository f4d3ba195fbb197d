"""How long a writer waits while SQLiteStore cleans, by evict batch size and pause between batches.

    python bench/evict_batch.py [--rows N] [--reps R] [--batches 500,250,100]

A writer saves a new session every 10 ms (bench/run.py's paced_writes) while
``sweep(keep=1000)`` runs in a thread over N ten-day-old rows (default
300,000), for each batch size (``_SQLITE_EVICT_BATCH`` set at run time, the
module is not edited) and three extra pauses after each batch's commit, made
with the sweep's ``progress`` callback (called once per batch): none (what the
module does: since this version it leaves the lock free after each batch for
as long as the batch held it; before, it did not pause at all), a fixed 5 ms,
and as long as the batch took (on this version, a second such pause). Prints one Markdown row per run: the writes, the worst
and p99 wait, the count over 100 ms, and the clean's seconds. bench/run.py's
section 7 times the batch sizes alone (in a thread and in another process,
with and without CPU hogs); this script is for trying the pause.
"""

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import run  # bench/run.py: build_old_rows, paced_writes

import tinysession

run.tinysession = tinysession
PAUSES = (0.0, 0.005, "duty")  # extra: none, 5 ms, as long as the batch took


def one_clean(template, directory, batch, pause):
    """Clean a copy of ``template`` beside a paced writer; return (latencies ms, clean s)."""
    path = os.path.join(directory, "clean.db")
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    shutil.copy(template, path)
    store = tinysession.SQLiteStore(path, max_sessions=None)
    len(store)
    saved, tinysession._SQLITE_EVICT_BATCH = tinysession._SQLITE_EVICT_BATCH, batch
    outcome, last = {}, [time.perf_counter()]

    def progress(_sweep):
        if pause == "duty":
            time.sleep(time.perf_counter() - last[0])
        elif pause:
            time.sleep(pause)
        last[0] = time.perf_counter()

    def clean():
        started = time.perf_counter()
        outcome["removed"] = store.sweep(keep=1000, progress=progress).removed
        outcome["seconds"] = time.perf_counter() - started

    try:
        thread = threading.Thread(target=clean)
        thread.start()
        latencies = run.paced_writes(store, lambda: not thread.is_alive())
        thread.join()
    finally:
        tinysession._SQLITE_EVICT_BATCH = saved
        store.close()
    if not outcome.get("removed"):
        raise AssertionError(f"the clean removed nothing: {outcome}")
    return sorted(latencies), outcome["seconds"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--batches", default="500,250,100")
    args = parser.parse_args(argv)
    batches = [int(size) for size in args.batches.split(",")]
    directory = tempfile.mkdtemp(prefix="tinysession-evict-")
    try:
        template = os.path.join(directory, "template.db")
        run.build_old_rows(template, args.rows)
        print(f"{args.rows:,} rows, clean(keep=1000) in a thread, a write every 10 ms; this version's batch: "
              f"{tinysession._SQLITE_EVICT_BATCH}; 1-minute load {os.getloadavg()[0]:.1f} at the start\n")
        print("| batch | pause after each batch | writes | worst ms | p99 ms | > 100 ms | clean s |")
        print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
        for _rep in range(args.reps):
            for batch in batches:
                for pause in PAUSES:
                    latencies, seconds = one_clean(template, directory, batch, pause)
                    label = "as long as the batch took" if pause == "duty" else f"{pause * 1000:.0f} ms"
                    p99 = latencies[int(len(latencies) * 0.99)]
                    over = sum(ms > 100 for ms in latencies)
                    print(f"| {batch} | {label} | {len(latencies):,} | {latencies[-1]:.0f} | {p99:.1f} | {over} | "
                          f"{seconds:.1f} |", flush=True)
        print(f"\n1-minute load {os.getloadavg()[0]:.1f} at the end")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
