"""A worker for tests/benchmarks/test_benchmark_harness.py: ``allocates`` touches ``mib`` MiB, ``baseline``
nothing; both report their peak resident memory, as a benchmark's workers do."""

from __future__ import annotations

from benchmarks import harness


def run_worker(config: str, settings: dict) -> dict:
    block = b"x" * (settings["mib"] * 2**20) if config == "allocates" else b""
    return {"config": config, "peak_mib": harness.peak_mib(), "held": len(block)}


if __name__ == "__main__":
    harness.serve_worker(run_worker)
