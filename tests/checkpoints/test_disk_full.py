"""A disk that fills while a checkpoint is written: the earlier checkpoints stay as they were, the
half-written one is removed, and the error says the disk is full whichever writer hit it."""

import errno
from collections import namedtuple

import pytest
import torch
from safetensors import SafetensorError
from test_checkpoints import make_trainer

import sapo.checkpoints.files as files
from sapo.checkpoints import is_complete, writing

Usage = namedtuple("Usage", "total used free")


def fail_with(error):
    def write(*args, **kwargs):
        raise error

    return write


@pytest.mark.parametrize(
    "error, free, expected",
    [
        (
            OSError(errno.ENOSPC, "No space left on device", "x.json"),
            10**12,
            "No space left on device: x.json",
        ),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), 10**12, "Disk quota exceeded"),
        (
            SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
            10**12,
            "No space left on device",
        ),
        # what torch.save raises on a full disk names no cause: the free space tells
        (
            RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
            0,
            "(0.0 MiB free)",
        ),
    ],
)
def test_disk_failures_become_one_oserror(tmp_path, monkeypatch, error, free, expected):
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - free, free))
    with (
        pytest.raises(OSError, match="could not write checkpoint-3 in ") as raised,
        writing("checkpoint-3", tmp_path),
    ):
        raise error
    assert expected in str(raised.value) and raised.value.__cause__ is error


@pytest.mark.parametrize("error", [RuntimeError("a fault of the program"), ValueError("bad value")])
def test_other_failures_pass_unchanged(tmp_path, error):
    with pytest.raises(type(error)) as raised, writing("checkpoint-3", tmp_path):
        raise error
    assert raised.value is error


def test_a_full_disk_keeps_the_earlier_checkpoints_and_removes_the_staged_one(
    tmp_path, tokenizer, monkeypatch
):
    trainer = make_trainer(tokenizer, tmp_path, max_steps=6, save_steps=2)
    save = torch.save

    def filling(obj, path, *args, **kwargs):  # torch.save of the optimizer, on a disk now full
        if "checkpoint-4" in str(path):
            monkeypatch.setattr(files.shutil, "disk_usage", lambda path: Usage(10**9, 10**9, 0))
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", filling)
    with pytest.raises(
        OSError, match=r"\[Errno 28\] could not write checkpoint-4 in .*No space left on device"
    ):
        trainer.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
    assert is_complete(tmp_path / "checkpoint-2")
    assert not (tmp_path / ".staging").exists()
