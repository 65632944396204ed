"""Atomic file moves (novic.atomic): the target is the old file or the whole new one."""
import errno
import os
from pathlib import Path

import numpy as np
import pytest

from novic import atomic


@pytest.mark.parametrize("cross_device", [False, True])
def test_move_file_atomic(tmp_path, monkeypatch, cross_device):
    src, dst = tmp_path / "new.bin", tmp_path / "out" / "graph.onnx"
    dst.parent.mkdir()
    dst.write_bytes(b"old")
    payload = os.urandom(3 << 20)
    src.write_bytes(payload)
    if cross_device:   # the rename fails as between file systems: copy to a temp file, then rename
        real = os.replace

        def replace(a, b):
            if os.fspath(a) == os.fspath(src):
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            return real(a, b)
        monkeypatch.setattr(atomic.os, "replace", replace)
    atomic.move_file_atomic(src, dst)
    assert dst.read_bytes() == payload and not src.exists()
    assert sorted(p.name for p in dst.parent.iterdir()) == ["graph.onnx"]   # no temp file left


def test_move_file_atomic_failure_keeps_the_old_file(tmp_path, monkeypatch):
    src, dst = tmp_path / "new.bin", tmp_path / "graph.onnx"
    src.write_bytes(b"new")
    dst.write_bytes(b"old")

    def replace(a, b):
        raise OSError(errno.EXDEV, "Invalid cross-device link")
    monkeypatch.setattr(atomic.os, "replace", replace)    # the copy's final rename fails too
    with pytest.raises(OSError):
        atomic.move_file_atomic(src, dst)
    assert dst.read_bytes() == b"old" and src.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graph.onnx", "new.bin"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_follow_the_umask(tmp_path, umask):
    """Like any new file: a bundle or checkpoint written by a build user stays readable by the
    service user (mkstemp's 0o600 made them private)."""
    old = os.umask(umask)
    try:
        atomic.write_bytes_atomic(tmp_path / "manifest.json", b"{}")
        atomic.write_file_atomic(tmp_path / "w.safetensors", lambda name: Path(name).write_bytes(b"x"))
    finally:
        os.umask(old)
    assert (tmp_path / "manifest.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_of_private_writers_follow_the_umask(tmp_path, umask):
    """A writer that creates its file 0o600 (safetensors' save_file does: checkpoints, training
    states and import outputs were unreadable to a service user) still gives a normal new file."""
    from novic.model.checkpoint import write_safetensors
    import torch

    old = os.umask(umask)
    try:
        atomic.write_file_atomic(tmp_path / "private.bin", lambda name: os.close(
            os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)))
        write_safetensors(tmp_path / "ckpt.safetensors", {"w": torch.zeros(2)}, {"format": "x"})
    finally:
        os.umask(old)
    for name in ("private.bin", "ckpt.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors", "private.bin"]


def test_write_file_atomic_by_name(tmp_path):
    """A writer that takes a file name (safetensors' save_file) writes a temp file that replaces the
    target whole; a writer that fails leaves the old file and no temp file."""
    target = tmp_path / "sub" / "state.safetensors"
    atomic.write_file_atomic(target, lambda name: Path(name).write_bytes(b"first"))
    assert target.read_bytes() == b"first"

    def half(name):
        Path(name).write_bytes(b"half of it")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(atomic.DiskFullError, match=f"cannot write {target}: no space left on device"):
        atomic.write_file_atomic(target, half)
    assert target.read_bytes() == b"first" and sorted(p.name for p in target.parent.iterdir()) == [target.name]
    with pytest.raises(FileNotFoundError) as info:          # a writer that made nothing publishes nothing
        atomic.write_file_atomic(target, lambda name: None)
    assert info.value.filename == str(target) and target.read_bytes() == b"first"
    # np.save appends .npy to a name without it: the temp name keeps the target's suffix
    arr = np.arange(10)
    atomic.write_file_atomic(tmp_path / "a.npy", lambda name: np.save(name, arr))
    assert np.array_equal(np.load(tmp_path / "a.npy"), arr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "sub"]


@pytest.mark.parametrize("how", ["open_atomic", "write_file_atomic"])
def test_data_is_fsynced_before_the_rename(tmp_path, monkeypatch, how):
    events = []
    real_fsync, real_replace = atomic.os.fsync, atomic.os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (events.append(("fsync", os.fstat(fd).st_size)), real_fsync(fd)))
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (events.append(("replace",)), real_replace(a, b)))
    target = tmp_path / "out.bin"
    if how == "open_atomic":
        with atomic.open_atomic(target) as f:
            f.write(b"12345")
    else:
        atomic.write_file_atomic(target, lambda name: Path(name).write_bytes(b"12345"))
    assert events[:2] == [("fsync", 5), ("replace",)]   # the file's 5 bytes, then the rename


def test_an_unwritable_target_is_named_in_the_error(tmp_path, monkeypatch):
    """The error names the file asked for, not the hidden temp file (the console scripts print it)."""
    def refuse(name, *args):
        raise PermissionError(13, "Permission denied", name)
    monkeypatch.setattr(atomic.os, "open", refuse)
    with pytest.raises(PermissionError) as info:
        atomic.write_bytes_atomic(tmp_path / "manifest.json", b"{}")
    assert info.value.filename == str(tmp_path / "manifest.json")


def test_writing_over_a_directory_names_it(tmp_path):
    (tmp_path / "d.json").mkdir()
    with pytest.raises(IsADirectoryError) as info:
        atomic.write_bytes_atomic(tmp_path / "d.json", b"{}")
    assert info.value.filename == str(tmp_path / "d.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.json"]   # the temp file is gone


def test_writability_checks(tmp_path):
    atomic.check_writable_dir(tmp_path / "new" / "deeper")   # would be created: fine
    atomic.check_writable_file(tmp_path / "out.json")
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        atomic.check_writable_dir(tmp_path / "f" / "run")
    with pytest.raises(IsADirectoryError):
        atomic.check_writable_file(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]   # the probes leave nothing behind


def test_write_json_atomic_format(tmp_path):
    """Indented JSON with one trailing newline (or the caller's formatting), and no temp file left
    beside it. (That the training state, caches, bench results and manifests use it is a matter of
    reading the code; `duplicates` flags a new copy.)"""
    import json

    from novic.atomic import write_json_atomic

    write_json_atomic(tmp_path / "a.json", {"step": 3, "x": [1, 2]})
    text = (tmp_path / "a.json").read_text()
    assert json.loads(text) == {"step": 3, "x": [1, 2]} and text.endswith("}\n") and "\n " in text
    write_json_atomic(tmp_path / "a.json", {"k": 1}, dumps=lambda d: "custom")
    assert (tmp_path / "a.json").read_text() == "custom\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
