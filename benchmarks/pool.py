"""Runs a benchmark grid's shards side by side on a many-core machine, each on cores of its own.

Each line of `--jobs` (a file; blank lines and `#` comments skipped) is one shell command, e.g.
one `ssl_digits.py` shard with its own `--workdir`. `--slots` commands run at a time, slot k on
cores `[k * --cores, (k + 1) * --cores)` (its CPU affinity, which sesemi reads to size its data
loader workers: `--cores` minus one on a GPU), in the file's order. No command starts after
`--start-by` minutes; any still running at `--stop-at` minutes is killed (its shard is then
missing from the collected table, never half counted). Each command's output goes to
`<--logs>/<line number>.log`; the end prints one line per command: status, minutes, command.

    python benchmarks/pool.py --jobs jobs.txt --slots 8 --cores 2 --logs /tmp/pool_logs

The shards' tables are then made with the script's own `--collect` (e.g. `ssl_digits.py
--collect DIR...`, which merges the seeds of one method from several folders).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import time


def read_jobs(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line number, command) of each job line."""
    lines = path.read_text().splitlines()
    return [(i, line.strip()) for i, line in enumerate(lines, 1) if line.strip()[:1] not in "#"]


def main(argv: list[str] | None = None) -> int:
    """Runs the jobs; returns 0 when every job ran and exited 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", required=True, type=pathlib.Path, help="one command per line")
    parser.add_argument("--slots", type=int, default=1, help="commands at a time")
    parser.add_argument("--cores", type=int, default=1, help="CPU cores per slot")
    parser.add_argument("--logs", required=True, type=pathlib.Path, help="folder for the logs")
    parser.add_argument("--start-by", type=float, default=float("inf"), help="minutes")
    parser.add_argument("--stop-at", type=float, default=float("inf"), help="minutes")
    args = parser.parse_args(argv)
    cores = sorted(os.sched_getaffinity(0))
    if args.slots * args.cores > len(cores):
        parser.error(f"--slots x --cores = {args.slots * args.cores} > the {len(cores)} cores")
    args.logs.mkdir(parents=True, exist_ok=True)
    queue = read_jobs(args.jobs)
    start = time.time()
    running: dict[int, tuple[subprocess.Popen, int, str, float]] = {}  # slot -> job
    done: list[tuple[int, str, str, float]] = []

    def minutes() -> float:
        return (time.time() - start) / 60

    while queue or running:
        for slot, (process, line, command, began) in list(running.items()):
            if process.poll() is not None or minutes() >= args.stop_at:
                if process.poll() is None:
                    process.kill()
                    process.wait()
                    status = "killed"
                else:
                    status = f"exit {process.returncode}"
                done.append((line, status, command, (time.time() - began) / 60))
                print(f"[{minutes():5.1f} min] line {line}: {status}", flush=True)
                del running[slot]
        if minutes() >= args.start_by:
            done.extend((line, "not started", command, 0.0) for line, command in queue)
            queue = []
        for slot in range(args.slots):
            if queue and slot not in running:
                line, command = queue.pop(0)
                mine = set(cores[slot * args.cores : (slot + 1) * args.cores])
                log = open(args.logs / f"{line}.log", "w")  # noqa: SIM115 (closed by the child)
                process = subprocess.Popen(
                    ["bash", "-c", command],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=lambda mine=mine: os.sched_setaffinity(0, mine),
                )
                log.close()
                running[slot] = (process, line, command, time.time())
                print(f"[{minutes():5.1f} min] line {line} on cores {sorted(mine)}", flush=True)
        time.sleep(1)
    print(f"\n{'line':>4}  {'status':<11}  {'min':>5}  command")
    for line, status, command, took in sorted(done):
        print(f"{line:>4}  {status:<11}  {took:5.1f}  {command}")
    return 0 if all(status == "exit 0" for _, status, _, _ in done) else 1


if __name__ == "__main__":
    sys.exit(main())
