"""CLI start-up time (issue 27): `landmark-index --help` / `--version` against the imports it now avoids.

    .venv/bin/python benchmarks/bench_startup.py [--repeat 7] [--before DIR]

Each command runs ``--repeat`` times as a fresh process (what a user waits for), interleaved so that load
changes hit every command alike; the median wall time and the median CPU time (user + system of the child) are
printed. Side by side: the interpreter alone (the floor) and ``import torch`` / ``import faiss`` (what the CLI
paid before it stopped importing them for help and version). ``--before DIR``: also the CLI of another checkout
(e.g. ``git archive COMMIT pipeline | tar -x -C DIR``), run the same way. Goal: --help and --version ≤ 0.5 s;
a command's --help (options generated from the settings, issue 30) no slower than --help.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c pass (floor)": [sys.executable, "-c", "pass"],
    "landmark-index --version": [sys.executable, "-m", "pipeline.cli", "--version"],
    "landmark-index --help": [sys.executable, "-m", "pipeline.cli", "--help"],
    "landmark-index extract --help": [sys.executable, "-m", "pipeline.cli", "extract", "--help"],
    "import torch": [sys.executable, "-c", "import torch"],
    "import faiss": [sys.executable, "-c", "import faiss"],
}


def run_once(command: list[str], pythonpath: str | None) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of one run of ``command`` (its ``pipeline`` from ``pythonpath``)."""
    env = {**os.environ, "COLUMNS": "100", "PYTHONDONTWRITEBYTECODE": "1"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    # cwd too: `python -m` puts the working directory before PYTHONPATH
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env, cwd=pythonpath)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--before", default=None, help="another checkout's root: its CLI is timed too")
    args = parser.parse_args()
    runs = {name: (command, None) for name, command in COMMANDS.items()}
    if args.before:
        for flags in (["--version"], ["--help"], ["extract", "--help"]):
            runs[f"before: landmark-index {' '.join(flags)}"] = (
                [sys.executable, "-m", "pipeline.cli", *flags],
                args.before,
            )
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for command, path in runs.values():  # warm the page cache once
        run_once(command, path)
    for _ in range(args.repeat):
        for name, (command, path) in runs.items():
            times[name].append(run_once(command, path))
    print(f"load average {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs), {args.repeat} runs each, medians")
    medians = {}
    for name, runs in times.items():
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        medians[name] = (wall, cpu)
        print(f"{name:34s} wall {wall * 1000:7.0f} ms   CPU {cpu * 1000:7.0f} ms")
    help_wall, help_cpu = medians["landmark-index --help"]
    torch_wall, torch_cpu = medians["import torch"]
    print(
        f"--help vs import torch: {torch_wall / help_wall:.1f}× less wall, {torch_cpu / help_cpu:.1f}× less CPU"
    )
    slowest = max(medians["landmark-index --help"][0], medians["landmark-index --version"][0])
    print(f"goal --help/--version ≤ 0.5 s: {'met' if slowest <= 0.5 else 'not met'} ({slowest:.2f} s wall)")


if __name__ == "__main__":
    main()
