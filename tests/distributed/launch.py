"""Launch a test worker script on two CPU processes with torchrun (gloo)."""

import os
import subprocess
import sys


def torchrun(script, *args) -> None:
    """Run ``script`` with ``args`` on 2 processes; fail the test with the end of its stderr."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a free port: no clash with another run on the machine
        "--nproc_per_node",
        "2",
        str(script),
        *map(str, args),
    ]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
