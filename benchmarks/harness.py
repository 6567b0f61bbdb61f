"""What every benchmark measures with: a configuration in a fresh process, peak memory above a
baseline process, and the machine and its load.

**Fresh processes.** A peak belongs to one process, and the libraries a run imports stay
resident, so a benchmark that compares peaks runs each configuration in its own process
(:func:`run_fresh`): ``python -m <module> --worker CONFIG SETTINGS_JSON`` from the repository
root, whose last line of output is one JSON object; the module answers with :func:`serve_worker`.
Workers run with ``MALLOC_MMAP_THRESHOLD_=65536`` unless told otherwise: glibc then maps every
allocation above 64 KiB on its own and unmaps it when freed, so the peak follows the tensors alive
at that moment; with glibc's adaptive default the heap keeps freed blocks and the peak of the same
run varies by tens of MiB.

**Peak memory** is the kernel's high-water mark of the process's resident memory (``VmHWM``),
which a :class:`PeakLog` can restart at each mark to give the peak of each interval of a run.
A configuration's cost is its peak above a baseline process (:func:`above_baseline`) that imports
the same libraries and builds the same model and data but does not train: what is left is the
training state, not the interpreter.

**The machine** (:func:`machine`): the CPU, the cores this process may use, the library versions,
the code measured (commit and a hash of sapo's source) and the load average before and after,
since on shared cores the load moves a figure more than most changes do.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER_FLAG = "--worker"
MALLOC_MMAP_THRESHOLD = 65536
LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets")

# ---------------------------------------------------------------------------------------------
# a configuration in a fresh process
# ---------------------------------------------------------------------------------------------


def run_fresh(
    module: str,
    config: str,
    settings: dict,
    *,
    processes: int = 1,
    env: dict[str, str] | None = None,
    malloc_mmap_threshold: int | None = MALLOC_MMAP_THRESHOLD,
) -> dict:
    """Run ``config`` of ``module`` (``benchmarks.x``) in a fresh Python process, or in
    ``processes`` processes under ``torch.distributed.run``, and return the JSON object its last
    line of output holds. ``malloc_mmap_threshold=None`` leaves glibc's allocator as it is.

    A worker that fails ends the benchmark: its output's tail goes to stderr, then one
    ``error: ...`` line names the configuration.
    """
    environment = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    environment.update(env or {})
    if malloc_mmap_threshold:  # glibc reads it at start-up
        environment["MALLOC_MMAP_THRESHOLD_"] = str(malloc_mmap_threshold)
    else:
        environment.pop("MALLOC_MMAP_THRESHOLD_", None)
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = [*launcher, "-m", module, WORKER_FLAG, config, json.dumps(settings)]
    done = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=ROOT)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-6000:])
        raise SystemExit(f"error: the {config} worker of {module} failed with exit code {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def serve_worker(run_worker: Callable[[str, dict], dict | None], argv: list[str] | None = None) -> bool:
    """In a process :func:`run_fresh` started: run ``run_worker(config, settings)``, print its
    result as the last line (nothing where it returns ``None``, e.g. on a rank other than 0) and
    return True. Elsewhere return False, so that the module's ``main`` runs instead."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] != WORKER_FLAG:
        return False
    result = run_worker(argv[1], json.loads(argv[2]))
    if result is not None:
        print(json.dumps(result))
    return True


# ---------------------------------------------------------------------------------------------
# peak memory
# ---------------------------------------------------------------------------------------------


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # reported in KiB
    raise OSError(f"/proc/self/status has no {field} (peak memory is measured on Linux only)")


def peak_mib() -> float:
    """Peak resident memory of this process (``VmHWM``) since it began or since the last restart."""
    return _status_mib("VmHWM")


def resident_mib() -> float:
    """Resident memory of this process now (``VmRSS``)."""
    return _status_mib("VmRSS")


def restart_peak() -> None:
    """Restart the kernel's peak count of this process from what is resident now."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


class PeakLog:
    """Peak memory at named points of a run.

    Each mark records ``peak_mib``, the peak since the process began, ``rss_mib``, what is
    resident at the mark, and ``t_s``, seconds since the log began. With ``per_interval=True``
    the count restarts at every mark, and a mark also records ``interval_peak_mib``, the peak
    since the previous mark: where in a run the memory is.
    """

    def __init__(self, per_interval: bool = False):
        self.per_interval = per_interval
        self.marks: list[dict] = []
        self.highest = 0.0
        self.started = time.perf_counter()

    def mark(self, phase: str) -> dict:
        interval = peak_mib()
        self.highest = max(self.highest, interval)
        entry = {"phase": phase, "peak_mib": round(self.highest, 1), "rss_mib": round(resident_mib(), 1)}
        entry["t_s"] = round(time.perf_counter() - self.started, 2)
        if self.per_interval:
            entry["interval_peak_mib"] = round(interval, 1)
            restart_peak()
        self.marks.append(entry)
        return entry


def above_baseline(peaks: dict[str, float], baseline: str = "baseline") -> dict[str, float]:
    """Each configuration's peak above the baseline process's (never below 0), MiB."""
    return {name: max(0.0, peak - peaks[baseline]) for name, peak in peaks.items() if name != baseline}


# ---------------------------------------------------------------------------------------------
# the machine, its load, and the code measured
# ---------------------------------------------------------------------------------------------


def load_average() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages (``None`` where the system has none)."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def cores_available() -> int:
    """The cores this process may run on (its affinity), which may be fewer than the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def code_version() -> dict:
    """The sapo measured: the commit of the checkout (``+changes`` where sapo's source differs
    from it) and a hash of the sapo package's source as it is on disk, which tells apart trees
    with different uncommitted changes, or a tree that changed during the run."""
    spec = importlib.util.find_spec("sapo")
    package = Path(spec.origin).parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    try:
        git = ["git", "-C", str(package)]
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
        changed = subprocess.run([*git, "status", "--porcelain", "."], capture_output=True, text=True).stdout
    except OSError:
        commit, changed = "", ""
    commit = commit.strip() + ("+changes" if commit.strip() and changed.strip() else "")
    return {"commit": commit or None, "source_sha256": digest.hexdigest()[:16]}


def machine(load_before: list[float] | None, torch_threads: int | None = None) -> dict:
    """What a run was measured on; ``load_before`` is :func:`load_average` taken as it began,
    ``torch_threads`` the threads of workers in other processes (default: this process's)."""
    torch = sys.modules.get("torch")
    if torch_threads is None and torch is not None:
        torch_threads = torch.get_num_threads()
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cores_available": cores_available(),
        "torch_threads": torch_threads,
        "python": platform.python_version(),
        **versions,
        "code": code_version(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }


def describe(measured_on: dict) -> str:
    """One line for the report: the machine, the threads, the versions and the load."""
    threads = measured_on["torch_threads"]
    before, after = (measured_on[f"load_average_{when}"] for when in ("before", "after"))
    load = [entry and entry[0] for entry in (before, after)]
    return (
        f"{measured_on['cpu']}, {measured_on['cpu_count']} CPUs ({measured_on['cores_available']} available)"
        + (f", {threads} torch threads" if threads else "")
        + f"; Python {measured_on['python']}, torch {measured_on['torch']}, transformers "
        f"{measured_on['transformers']}, trl {measured_on['trl']}; sapo {measured_on['code']['commit']} "
        f"({measured_on['code']['source_sha256']}); load average {load[0]} before, {load[1]} after"
    )
