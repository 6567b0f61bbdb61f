"""The mark of the tests that need vLLM: CI runs them where vLLM's CPU build is installed
(`.venv-vllm`, built by `.ci/run`); elsewhere they are skipped."""

import pytest

from sapo.sampling.vllm import check_installed


def _installed() -> bool:
    try:
        check_installed()
    except ValueError:
        return False
    return True


VLLM_INSTALLED = _installed()
needs_vllm = pytest.mark.skipif(
    not VLLM_INSTALLED, reason="vLLM is not installed (.ci/run runs these in .venv-vllm)"
)
