"""The `sapo` command run in the test's own process: its exit status and what it printed."""

import contextlib
import io

from sapo.cli import main


def run_sapo(argv) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of ``sapo argv``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    return status, out.getvalue(), err.getvalue()


def sapo_error_line(argv) -> str:
    """The one line ``error: ...`` that bad input ends ``sapo argv`` with (exit status 2)."""
    status, _, err = run_sapo(argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]
