"""A full disk while writing a checkpoint (novic-import --out, a training checkpoint): one line
naming the file, the space it needs and the space free; the previous files stay as they were."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_importer import make_original  # noqa: E402
from test_train_trainer import make_trainer, small_config  # noqa: E402

from novic import atomic  # noqa: E402

# What safetensors raises when the disk fills up (its own type, not an OSError).
ENOSPC_TEXT = ('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
               '"No space left on device" })')


@pytest.fixture
def full_disk(monkeypatch):
    """safetensors' save_file writes part of its file, then fails as on a full disk."""
    from safetensors import SafetensorError

    def save_file(tensors, name, metadata=None):
        Path(name).write_bytes(b"\0" * 1000)
        raise SafetensorError(ENOSPC_TEXT)

    monkeypatch.setattr("safetensors.torch.save_file", save_file)


def assert_disk_full_line(message: str, path: Path):
    assert message.count("\n") <= 1 and "Traceback" not in message and "SafetensorError" not in message
    assert f"cannot write {path}: no space left on device" in message
    assert "it needs about" in message and "free in" in message


def test_novic_import_onto_a_full_disk(tmp_path, full_disk, monkeypatch, capsys):
    from novic.cli import importer as cli

    path, _, _ = make_original(tmp_path, H=32, layers=1, heads=2, ffn=16)
    out = tmp_path / "out" / "model.safetensors"
    out.parent.mkdir()
    out.write_bytes(b"the previous import")
    monkeypatch.setattr("sys.argv", ["novic-import", str(path), "--out", str(out), "--force"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 1
    assert_disk_full_line(capsys.readouterr().err.replace("\n", " ").strip() + "\n", out)
    assert out.read_bytes() == b"the previous import"
    assert [p.name for p in out.parent.iterdir()] == ["model.safetensors"]   # no temp file left


def test_training_checkpoint_onto_a_full_disk_keeps_the_last_good_one(tmp_path, monkeypatch):
    import safetensors.torch

    real_save = safetensors.torch.save_file
    cfg = small_config(tmp_path, **{"ckpt_every": 2})
    trainer = make_trainer(cfg)
    saves = []

    def save_file(tensors, name, metadata=None):   # room for the first save (state + checkpoint)
        saves.append(name)
        if len(saves) > 2:
            Path(name).write_bytes(b"\0" * 1000)
            from safetensors import SafetensorError
            raise SafetensorError(ENOSPC_TEXT)
        real_save(tensors, name, metadata=metadata)

    monkeypatch.setattr("safetensors.torch.save_file", save_file)
    with pytest.raises(atomic.DiskFullError) as exc:
        trainer.fit()
    assert_disk_full_line(str(exc.value), tmp_path / "run" / "state-00000004.safetensors")
    run = tmp_path / "run"
    latest = json.loads((run / "latest.json").read_text())
    assert latest["step"] == 2 and (run / latest["checkpoint"]).is_file() and (run / latest["state"]).is_file()
    assert not list(run.glob(".*.tmp*"))


def test_disk_full_from_an_os_error_too(tmp_path, monkeypatch):
    """Writers that raise OSError(ENOSPC) (np.save, json) get the same line, sized by the data."""
    import errno

    def write(name):
        raise OSError(errno.ENOSPC, "No space left on device", name)

    with pytest.raises(atomic.DiskFullError, match=r"it needs about 2\.0 KiB"):
        atomic.write_file_atomic(tmp_path / "x.bin", write, size=2048)
    assert list(tmp_path.iterdir()) == []


def test_training_metrics_onto_a_full_disk(tmp_path, monkeypatch):
    """The metrics log is appended to, not replaced: a full disk there gives the same line."""
    import errno

    from novic.train import trainer as trainer_module

    trainer = make_trainer(small_config(tmp_path))

    def full(path, mode="r", *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(trainer_module, "open", full, raising=False)
    with pytest.raises(atomic.DiskFullError) as exc:
        trainer.fit()
    assert_disk_full_line(str(exc.value), tmp_path / "run" / "metrics.jsonl")
