"""Getting the data: both arrangers, fed fake archives by a loopback HTTP server."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from helpers.data import download
from helpers.data.folders import DataError

CLASSES = 3


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def _course_archive(path: Path, per_split: dict[str, int]) -> int:
    """A flower_data.tar.gz of CLASSES classes; returns its number of images."""
    count = 0
    with tarfile.open(path, "w:gz") as tar:
        for split, n in per_split.items():
            for cls in range(1, CLASSES + 1):
                for _ in range(n):
                    count += 1
                    _add(tar, f"flower_data/{split}/{cls}/image_{count:05d}.jpg", _jpeg(count))
    return count


def test_course_archive_is_downloaded_checked_and_arranged(server, tmp_path):
    www, url = server
    total = _course_archive(www / "flower_data.tar.gz", {"train": 3, "valid": 1, "test": 2})
    dest = tmp_path / "data" / "flowers"
    root = download.ensure_data(dest, source="course", base_url=url + "flower_data.tar.gz",
                                num_classes=CLASSES, num_images=total)
    assert root == dest
    assert sorted(p.name for p in dest.iterdir()) == ["test", "train", "valid"]
    assert len(list((dest / "train" / "2").glob("*.jpg"))) == 3
    assert [p.name for p in dest.parent.iterdir()] == ["flowers"]  # no leftovers
    assert download.ensure_data(dest) == dest  # present: nothing downloaded


def test_course_archive_with_wrong_layout_is_refused(server, tmp_path):
    www, url = server
    total = _course_archive(www / "flower_data.tar.gz", {"train": 1, "valid": 1, "test": 1})
    dest = tmp_path / "flowers"
    with pytest.raises(DataError, match="expected 102"):
        download.ensure_data(dest, source="course", base_url=url + "flower_data.tar.gz",
                             num_images=total)
    assert not dest.exists()


def test_flowers102_files_are_md5_checked_and_sorted_by_official_split(server, tmp_path):
    www, url = server
    labels = np.array([1, 2, 3, 1, 2, 3, 1, 2, 3, 3])
    with tarfile.open(www / "102flowers.tgz", "w:gz") as tar:
        for i in range(1, len(labels) + 1):
            _add(tar, f"jpg/image_{i:05d}.jpg", _jpeg(i))
    savemat(www / "imagelabels.mat", {"labels": labels[None]})
    savemat(www / "setid.mat", {"trnid": np.array([[1, 2, 3, 10]]), "valid": np.array([[4, 5, 6]]),
                                "tstid": np.array([[7, 8, 9]])})
    md5s = {key: hashlib.md5((www / name).read_bytes()).hexdigest()
            for key, (name, _) in download.FLOWERS102_FILES.items()}
    dest = tmp_path / "flowers"
    download.ensure_data(dest, source="flowers102", base_url=url, md5s=md5s,
                         num_classes=CLASSES, num_images=10)
    assert (dest / "train" / "3" / "image_00010.jpg").is_file()
    assert (dest / "valid" / "1" / "image_00004.jpg").is_file()
    assert (dest / "test" / "2" / "image_00008.jpg").is_file()
    assert (dest / "train" / "3" / "image_00003.jpg").read_bytes() == _jpeg(3)

    bad = tmp_path / "again"
    with pytest.raises(DataError, match="md5"):
        download.ensure_data(bad, source="flowers102", base_url=url,
                             md5s=md5s | {"labels": "0" * 32},
                             num_classes=CLASSES, num_images=10)
    assert not bad.exists()


def test_offline_is_one_line_saying_where_to_put_the_data(server, tmp_path):
    _, url = server
    dest = tmp_path / "flowers"
    with pytest.raises(DataError) as info:
        download.ensure_data(dest, source="course", base_url=url + "missing.tar.gz")
    message = str(info.value)
    assert "\n" not in message and str(dest) in message and "FLOWERS_DIR" in message
    with pytest.raises(DataError, match="cannot download"):
        download.ensure_data(dest, source="course",
                             base_url="http://127.0.0.1:9/flower_data.tar.gz")


def test_folder_without_train_is_not_overwritten(tmp_path):
    (tmp_path / "flowers").mkdir()
    (tmp_path / "flowers" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="no train/ folder"):
        download.ensure_data(tmp_path / "flowers")
    assert (tmp_path / "flowers" / "notes.txt").read_text() == "mine"


def test_a_truncated_archive_and_a_gzip_bomb_are_one_line_and_leave_nothing(server, tmp_path,
                                                                            monkeypatch):
    """A download cut short (EOF inside the gzip stream) and an archive whose members sum far
    beyond the data (counted from the tar headers before anything is unpacked)."""
    www, url = server
    whole = www / "whole.tar.gz"
    _course_archive(whole, {"train": 3, "valid": 1, "test": 2})
    data = whole.read_bytes()
    (www / "flower_data.tar.gz").write_bytes(data[: len(data) * 2 // 3])
    dest = tmp_path / "data" / "flowers"
    with pytest.raises(DataError, match="damaged or truncated") as err:
        download.ensure_data(dest, source="course", base_url=url + "flower_data.tar.gz",
                             num_classes=CLASSES)
    assert "\n" not in str(err.value)
    assert list(dest.parent.iterdir()) == []  # nothing a later run would take for the data
    # A bomb: one member of zeros, 5 MB, under a limit of 1 MB (the real one is 4 GB).
    monkeypatch.setattr(download, "MAX_UNPACKED", 1 << 20)
    with tarfile.open(www / "flower_data.tar.gz", "w:gz") as tar:
        _add(tar, "flower_data/train/1/zeros.jpg", bytes(5 << 20))
    assert (www / "flower_data.tar.gz").stat().st_size < 100_000
    with pytest.raises(DataError, match="far beyond the flowers data; not unpacked"):
        download.ensure_data(dest, source="course", base_url=url + "flower_data.tar.gz",
                             num_classes=CLASSES)
    assert list(dest.parent.iterdir()) == []
