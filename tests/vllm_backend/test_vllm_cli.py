"""`--generation_backend vllm` in every command that samples: `sapo generate` and `sapo eval` give
the own loop's greedy results, `sapo spin` trains on the engine's answers, and a model the engine
cannot serve ends in one `error:` line, exit status 2 and nothing written."""

import json

from conftest import addition_rows
from vllm_required import needs_vllm

from sapo.baselines.spin import SPINConfig, generate_answers
from sapo.builtin.tiny import char_tokenizer, tiny_llama
from sapo.cli import main
from sapo.sampling.vllm import VLLMBackend

pytestmark = needs_vllm
VLLM = ["--generation_backend", "vllm"]


def rows_file(tmp_path, count=8):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in addition_rows(count, seed=3)))
    return str(path)


def test_a_model_the_engine_cannot_serve_is_one_error_line(tmp_path, capfd):
    output = tmp_path / "run"
    train = ["train", "--model_name_or_path", "builtin:tiny", "--dataset_name", rows_file(tmp_path),
             "--output_dir", str(output), "--max_steps", "2", "--report_to", "none", *VLLM]  # fmt: skip
    capfd.readouterr()
    assert main(train) == 2
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "head size is 16" in lines[0]
    assert not output.exists()
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"instruction": "1+1="}]))
    generate = ["generate", "--suite", "alpaca-eval", "--model_name_or_path", "builtin:tiny",
                "--prompts", str(prompts), "--output", str(tmp_path / "answers.json"), *VLLM]  # fmt: skip
    assert main(generate) == 2
    assert "head size" in capfd.readouterr().err and not (tmp_path / "answers.json").exists()


def test_generate_writes_the_own_loops_greedy_answers(tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"instruction": f"{a}+{a}="} for a in (12, 345, 6)]))
    written = {}
    for backend in ("auto", "vllm"):
        output = tmp_path / f"{backend}.json"
        argv = ["generate", "--suite", "alpaca-eval", "--model_name_or_path", "builtin:small",
                "--prompts", str(prompts), "--output", str(output), "--max_new_tokens", "12",
                "--generation_backend", backend]  # fmt: skip
        assert main(argv) == 0
        written[backend] = [item["output"] for item in json.loads(output.read_text())]
    assert written["vllm"] == written["auto"] and any(written["auto"])


def test_eval_scores_greedy_exact_match_through_the_engine(tmp_path):
    results = {}
    for backend in ("auto", "vllm"):
        output = tmp_path / f"{backend}.json"
        argv = ["eval", "--model_name_or_path", "builtin:small", "--dataset_name", "builtin:addition",
                "--max_rows", "8", "--segment_length", "4", "--output_file", str(output),
                "--generation_backend", backend]  # fmt: skip
        assert main(argv) == 0
        results[backend] = json.loads(output.read_text())
    assert results["vllm"]["accuracy"] == results["auto"]["accuracy"]
    assert results["vllm"]["gold_logp"] == results["auto"]["gold_logp"]  # scored by the same model


def test_spin_answers_through_the_engine(tmp_path):
    tokenizer = char_tokenizer()
    model = tiny_llama(tokenizer, "small", seed=4, tie_word_embeddings=False).eval()
    args = SPINConfig(output_dir=str(tmp_path / "unused"), max_new_tokens=10, max_length=40, report_to="none")
    rows = [(tokenizer(f"<|user|>{a}+7=<|assistant|>")["input_ids"], []) for a in (1, 23, 456)]
    own = generate_answers(model, rows, tokenizer, args, seed=0)
    engine = VLLMBackend(model, max_model_length=40)
    assert generate_answers(model, rows, tokenizer, args, seed=0, backend=engine, version=0) == own

    spin = ["spin", "--model_name_or_path", "builtin:small", "--dataset_name", rows_file(tmp_path),
            "--output_dir", str(tmp_path / "spin"), "--spin_iterations", "1", "--max_new_tokens", "6",
            "--max_length", "40", "--per_device_train_batch_size", "4", "--report_to", "none",
            *VLLM]  # fmt: skip
    assert main(spin) == 0
    assert (tmp_path / "spin" / "iteration-1" / "model.safetensors").is_file()
