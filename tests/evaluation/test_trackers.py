"""What `sapo train` sends to W&B, trackio and TensorBoard, read back from each tracker's own files.

One short run reports to all three, offline: W&B writes its run under ``wandb/`` (WANDB_MODE=offline),
trackio a local SQLite database (TRACKIO_DIR, no Space), TensorBoard event files
(TENSORBOARD_LOGGING_DIR). The run is a subprocess whose home, caches and temporary folder are
inside the test's folder, so nothing is written elsewhere and no tracker state is shared with other
tests. Each test compares a tracker's files with what the trainer logged (its checkpoint's
``log_history``) and with ``pairs.jsonl``. The three come with the ``track`` extra (and ``dev``).
"""

import json
import os
import sqlite3
import struct
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from sapo.builtin.tasks import task_dataset

STEPS, PAIRS_EVERY = 4, 2
ROWS = [row for row in task_dataset("addition", "validation").select(range(16))]
SETTINGS = {
    "model_name_or_path": "builtin:tiny", "max_steps": STEPS, "per_device_train_batch_size": 4,
    "max_length": 32, "max_prompt_length": 24, "segment_length": 2, "replay_buffer_size": 8,
    "logging_steps": 1, "log_pairs_steps": PAIRS_EVERY, "save_strategy": "steps", "save_steps": STEPS,
    "report_to": ["wandb", "trackio", "tensorboard"], "trackio_static_space_id": False,
}  # fmt: skip
TRACKED_PREFIXES = ("sapo/", "rewards/")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The run's folder, what the trainer logged at each step, and the pairs.jsonl records by step."""
    root = tmp_path_factory.mktemp("tracked")
    home = root / "home"
    for folder in (home, root / "tmp"):
        folder.mkdir()
    (root / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    recipe = {**SETTINGS, "dataset_name": str(root / "rows.jsonl"), "output_dir": str(root / "out")}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    remote = ("WANDB_API_KEY", "WANDB_BASE_URL", "TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL")
    env = {name: value for name, value in os.environ.items() if name not in (*remote, "TRACKIO_BUCKET_ID")}
    env.update(
        HOME=str(home), TMPDIR=str(root / "tmp"), XDG_CACHE_HOME=str(home / ".cache"),
        XDG_CONFIG_HOME=str(home / ".config"), XDG_DATA_HOME=str(home / ".local" / "share"),
        HF_HOME=str(home / "huggingface"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
        WANDB_MODE="offline", WANDB_DIR=str(root), WANDB_SILENT="true", TRACKIO_DIR=str(root / "trackio"),
        TENSORBOARD_LOGGING_DIR=str(root / "tensorboard"),
    )  # fmt: skip
    command = [sys.executable, "-m", "sapo.cli", "train", "--config", str(root / "recipe.yaml")]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((root / "out" / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    logged = {entry["step"]: entry for entry in state["log_history"] if "loss" in entry}
    pairs = defaultdict(list)
    for line in (root / "out" / "pairs.jsonl").read_text().splitlines():
        pairs[json.loads(line)["step"]].append(json.loads(line))
    assert sorted(logged) == list(range(1, STEPS + 1)) and sorted(pairs) == [2, 4]
    return root, logged, dict(pairs)


def tracked(entry: dict) -> dict:
    """The ``sapo/*`` and ``rewards/*`` metrics of one step's log, as the trackers name them."""
    names = [name for name in entry if name.startswith(TRACKED_PREFIXES)]
    assert any(name.startswith("sapo/") for name in names) and any(n.startswith("rewards/") for n in names)
    return {f"train/{name}": entry[name] for name in names}  # Trainer's integrations prefix "train/"


def wandb_history(run_file: Path) -> list[dict[str, object]]:
    """The history rows of an offline W&B run file, ``{"a/b": value}`` for nested key ``(a, b)``.

    The file is a LevelDB-format log (as W&B writes it): a 7-byte header (``:W&B``, magic,
    version), then 32 KiB blocks of chunks, each with a 7-byte header (checksum, length, type:
    1 whole record, 2 first, 3 middle, 4 last part); a record is a ``wandb_internal_pb2.Record``.
    """
    from wandb.proto import wandb_internal_pb2

    data, block = run_file.read_bytes(), 32 * 1024
    assert data[:4] == b":W&B"
    position, parts, rows = 7, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk, position = data[position + 7 : position + 7 + length], position + 7 + length
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record.FromString(parts)
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in items})
    return rows


def test_wandb_offline_run_holds_the_metrics_and_the_pairs_table(run):
    root, logged, pairs = run
    (run_folder,) = (root / "wandb").glob("offline-run-*")
    rows = wandb_history(next(run_folder.glob("run-*.wandb")))
    by_step = {row["train/global_step"]: row for row in rows if "train/loss" in row}
    assert sorted(by_step) == sorted(logged)
    for step, entry in logged.items():
        expected = tracked(entry)
        assert {name: by_step[step][name] for name in expected} == expected, step
    tables = [row for row in rows if "sapo/pairs/_type" in row]
    assert [table["sapo/pairs/_type"] for table in tables] == ["table-file"] * len(pairs)  # a wandb.Table
    shown = {}  # step: the table's file
    for table in tables:
        written = json.loads((run_folder / "files" / table["sapo/pairs/path"]).read_text())
        shown[written["data"][0][0]] = written
    assert sorted(shown) == sorted(pairs)
    for step, written in shown.items():
        assert written["columns"] == list(pairs[step][0])
        assert written["data"] == [list(record.values()) for record in pairs[step]]


def test_trackio_local_database_holds_the_metrics_and_the_pairs_table(run):
    root, logged, pairs = run
    (database,) = (root / "trackio").glob("*.db")  # one project, no Space
    with sqlite3.connect(database) as connection:
        rows = [json.loads(metrics) for (metrics,) in connection.execute("SELECT metrics FROM metrics")]
    by_step = {row["train/global_step"]: row for row in rows if any(n.startswith("train/sapo/") for n in row)}
    assert sorted(by_step) == sorted(logged)
    for step, entry in logged.items():
        expected = tracked(entry)
        assert {name: by_step[step][name] for name in expected} == expected, step
    tables = [row["sapo/pairs"] for row in rows if "sapo/pairs" in row]
    assert [table["_type"] for table in tables] == ["trackio.table"] * len(pairs)
    assert [table["_value"] for table in tables] == [pairs[step] for step in sorted(pairs)]


def test_tensorboard_event_files_hold_the_metrics(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, logged, _ = run
    events = EventAccumulator(str(root / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    for name in tracked(logged[1]):
        scalars = {event.step: event.value for event in events.Scalars(name)}
        expected = {step: tracked(entry)[name] for step, entry in logged.items()}
        assert scalars == pytest.approx(expected, rel=1e-6, abs=1e-9), name  # float32 in the event files
