"""Hostile original files: a small zip that unpacks to gigabytes, a torch zip whose pickle does.
Refused from the zip directories (declared sizes, compression ratio, free space) or from the
first block streamed, with one line, before they are unpacked. The limits are a parameter, so
the files here are a few MiB."""
from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_importer import make_original  # noqa: E402

from novic.model import importer  # noqa: E402
from novic.model.importer import CheckpointImportError, ReadLimits, import_checkpoint, read_original  # noqa: E402

MIB = 1 << 20


@pytest.fixture
def unpacked(monkeypatch):
    """Bytes read out of zip members (the outer zip and torch's), by zipfile's reader."""
    count = [0]
    real = zipfile.ZipExtFile.read

    def read(self, n=-1):
        data = real(self, n)
        count[0] += len(data)
        return data

    monkeypatch.setattr(zipfile.ZipExtFile, "read", read)
    return count


def release_zip(tmp_path: Path, member_bytes: bytes, name="release/ovod_chunk0001.train") -> Path:
    z = tmp_path / "release.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("release/README.txt", "NOVIC model")
        zf.writestr(name, member_bytes)
    return z


def test_member_over_the_size_cap_is_not_unpacked(tmp_path, unpacked):
    z = release_zip(tmp_path, b"\0" * (8 * MIB))   # 8 MiB of zeros: a few KiB packed
    with pytest.raises(CheckpointImportError) as exc:
        read_original(z, ReadLimits(max_bytes=4 * MIB))
    assert str(exc.value) == (f"{z}:release/ovod_chunk0001.train: member release/ovod_chunk0001.train unpacks "
                              f"to 8.0 MiB, more than the 4.0 MiB a NOVIC checkpoint needs; refusing to unpack "
                              f"it (a damaged or hostile file)")
    assert unpacked[0] == 0


def test_member_that_inflates_like_a_zip_bomb_is_not_unpacked(tmp_path, unpacked):
    z = release_zip(tmp_path, b"\0" * (8 * MIB))
    with pytest.raises(CheckpointImportError, match=r"unpacks from 0\.0 MiB to 8\.0 MiB \(\d+:1\), far more than "
                                                    r"checkpoint weights compress; refusing to unpack it"):
        read_original(z, ReadLimits(ratio_from=1 * MIB))
    assert unpacked[0] == 0


def test_member_that_is_no_checkpoint_is_refused_at_its_first_block(tmp_path, unpacked):
    """Within every cap, but its first bytes are neither a torch zip nor a pickle: refused after
    one streamed block (4 MiB), not after unpacking all of it."""
    z = release_zip(tmp_path, b"\0" * (16 * MIB))
    with pytest.raises(CheckpointImportError, match="neither a PyTorch zip archive nor a pickle"):
        read_original(z, ReadLimits(max_ratio=1e9))
    assert 0 < unpacked[0] <= 4 * MIB


def test_member_larger_than_the_free_space_in_tmpdir(tmp_path, monkeypatch, unpacked):
    z = release_zip(tmp_path, b"\0" * (2 * MIB))
    real = importer.shutil.disk_usage
    monkeypatch.setattr(importer.shutil, "disk_usage", lambda p: real(p)._replace(free=MIB))
    with pytest.raises(CheckpointImportError, match=r"unpacking it needs 2\.0 MiB in .*, which has 1\.0 MiB "
                                                    r"free; set TMPDIR to a directory with more space"):
        read_original(z, ReadLimits(max_ratio=1e9))
    assert unpacked[0] == 0


def torch_zip_with_pickle(tmp_path: Path, pickle_bytes: bytes) -> Path:
    """A torch.save-style zip (archive/data.pkl, archive/version) whose pickle is deflated."""
    path = tmp_path / "bomb.train"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", pickle_bytes)
        zf.writestr("archive/version", "3\n")
    return path


def test_torch_zip_whose_pickle_inflates_is_refused_before_torch_reads_it(tmp_path, monkeypatch, unpacked):
    path = torch_zip_with_pickle(tmp_path, b"\x80\x02" + b"N" * (8 * MIB) + b".")

    def no_load(*args, **kwargs):
        raise AssertionError("torch.load must not be reached")

    monkeypatch.setattr(importer.torch, "load", no_load)
    with pytest.raises(CheckpointImportError) as exc:
        import_checkpoint(path, limits=ReadLimits(max_pickle_bytes=MIB))
    assert str(exc.value) == (f"{path}: its pickle archive/data.pkl unpacks to 8.0 MiB, more than the 1.0 MiB a "
                              f"NOVIC checkpoint needs; refusing to unpack it (a damaged or hostile file)")
    assert unpacked[0] == 0
    # the same file inside a release zip: refused after unpacking the small member, before torch.load
    z = tmp_path / "release.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.write(path, "release/ovod_chunk0001.train")
    with pytest.raises(CheckpointImportError, match=r"release\.zip:release/ovod_chunk0001\.train: its pickle "
                                                    r"archive/data\.pkl unpacks to 8\.0 MiB"):
        read_original(z, ReadLimits(max_pickle_bytes=MIB))


def test_pickle_protocol_reads_two_bytes(tmp_path, unpacked):
    """The protocol of a pickle that torch could not read is looked up from 2 bytes (it used to
    read the whole pickle again)."""
    path = torch_zip_with_pickle(tmp_path, b"\x80\x04" + b"N" * (2 * MIB))
    with open(path, "rb") as f:
        head = f.read(512)
    assert importer._pickle_protocol(path, head) == 4
    assert unpacked[0] <= 64 * 1024   # zipfile reads ahead a little; never the 2 MiB


def test_real_checkpoints_pass_the_default_limits(tmp_path):
    path, _, _ = make_original(tmp_path, H=32, layers=1, heads=2, ffn=16)
    z = tmp_path / "release.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.write(path, "release/ovod_chunk0001.train")
    raw, label = read_original(z)
    assert label.endswith(":release/ovod_chunk0001.train") and "model_state_dict" in raw
