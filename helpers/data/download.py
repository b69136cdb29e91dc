"""Getting the flowers data: download an archive and arrange it as train/valid/test/<class>/."""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from helpers.core.files import saved_mode
from helpers.data.folders import SPLITS, DataError, data_dir, find_class_folders
from helpers.data.images import IMAGE_EXTENSIONS, list_image_files

COURSE_URL = "https://s3.amazonaws.com/content.udacity-data.com/nd089/flower_data.tar.gz"
FLOWERS102_URL = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"
# (file name, md5) as torchvision's Flowers102 checks them.
FLOWERS102_FILES = {"images": ("102flowers.tgz", "52808999861908f626f3c1f4e79d11fa"),
                    "labels": ("imagelabels.mat", "e0620be6f572b9609742df49c70aed4d"),
                    "setid": ("setid.mat", "a5357ecc9cb78c4bef273ce3793fc85c")}
NUM_CLASSES, NUM_IMAGES = 102, 8189


def download_file(url: str, dest: str | os.PathLike, md5: str | None = None) -> Path:
    """Fetch url to dest with a progress bar (atomically); check its md5 when one is given."""
    from torchvision.datasets.utils import check_integrity

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # a file of its own (mkstemp), never a fixed name: a link planted at DEST.part is not
    # followed, and two downloads do not write into one file
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(name)
    try:
        with urllib.request.urlopen(url, timeout=30) as response, os.fdopen(fd, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            print(f"downloading {url} ({(total or 0) / 1e6:.0f} MB)", flush=True)
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except BaseException as err:  # Ctrl-C included: nothing half-downloaded is left
        tmp.unlink(missing_ok=True)
        if not isinstance(err, urllib.error.URLError | OSError):
            raise
        reason = getattr(err, "reason", err)
        raise DataError(f"cannot download {url} ({reason})") from None
    if md5 and not check_integrity(str(tmp), md5):
        tmp.unlink()
        raise DataError(f"{url}: the download is damaged (md5 differs from {md5}); try again")
    os.chmod(tmp, saved_mode(dest))
    os.replace(tmp, dest)
    return dest


def check_layout(root: str | os.PathLike, num_classes: int = NUM_CLASSES,
                 num_images: int = NUM_IMAGES) -> None:
    """Raise DataError unless root holds train/valid/test with num_classes folders each."""
    root = Path(root)
    images = 0
    for split in SPLITS:
        folders = [p for p in (root / split).glob("*") if p.is_dir()]
        if len(folders) != num_classes:
            raise DataError(f"{root / split}: {len(folders)} class folders, expected {num_classes}")
        images += sum(1 for p in (root / split).glob("*/*")
                      if p.suffix.lower() in IMAGE_EXTENSIONS)
    if images != num_images:
        raise DataError(f"{root}: {images} images, expected {num_images}")


def has_images(root: str | os.PathLike) -> bool:
    """True when root has a train/ folder or a class folder with an image in it."""
    root = Path(root)
    if (root / "train").is_dir():
        return True
    return root.is_dir() and any(list_image_files(root / name)[0]
                                 for name in find_class_folders(root))


MAX_UNPACKED = 4 << 30  # bytes: the course's archive unpacks to well under 1 GB
MAX_MEMBERS = 100_000  # files and folders: the course's holds 8,189 photos


def _check_size(archive: Path, tar: tarfile.TarFile) -> None:
    """Sum the members' sizes from the tar headers before anything is unpacked; refuse an
    archive far beyond the course's (a gzip bomb would fill the disk)."""
    total = count = 0
    for member in tar:
        total += max(member.size, 0)
        count += 1
        if total > MAX_UNPACKED or count > MAX_MEMBERS:
            raise DataError(f"{archive}: unpacks to more than {MAX_UNPACKED >> 30} GB or "
                            f"{MAX_MEMBERS:,} files, far beyond the flowers data; not unpacked "
                            "(check FLOWERS_DATA_URL)")


def _extract(archive: Path, into: Path) -> None:
    """Unpack a tar archive, refusing paths that escape the folder and archives far larger
    than the data (counted from the headers first)."""
    import zlib

    try:
        with tarfile.open(archive) as tar:
            _check_size(archive, tar)
            tar.extractall(into, filter="data")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise DataError(f"{archive}: cannot unpack ({err}); it is damaged or truncated: delete "
                        "it and download again") from None


def arrange_course_archive(archive: str | os.PathLike, dest: str | os.PathLike,
                           num_classes: int = NUM_CLASSES, num_images: int = NUM_IMAGES) -> Path:
    """Unpack the course's flower_data.tar.gz, check its layout and move it to dest."""
    dest = Path(dest)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".unpack-") as tmp:
        _extract(Path(archive), Path(tmp))
        roots = [p.parent for p in Path(tmp).rglob("train") if (p.parent / "valid").is_dir()]
        if not roots:
            raise DataError(f"{archive}: no train/ and valid/ folders inside")
        check_layout(roots[0], num_classes, num_images)
        os.replace(roots[0], dest)
    return dest


def arrange_flowers102(folder: str | os.PathLike, dest: str | os.PathLike,
                       num_classes: int = NUM_CLASSES, num_images: int = NUM_IMAGES) -> Path:
    """Sort the Oxford files (102flowers.tgz, imagelabels.mat, setid.mat) by the official split."""
    from scipy.io import loadmat

    folder, dest = Path(folder), Path(dest)
    labels = loadmat(folder / FLOWERS102_FILES["labels"][0])["labels"].ravel()
    setid = loadmat(folder / FLOWERS102_FILES["setid"][0])
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".unpack-") as tmp:
        tmp = Path(tmp)
        _extract(folder / FLOWERS102_FILES["images"][0], tmp / "raw")
        for split, key in zip(SPLITS, ("trnid", "valid", "tstid"), strict=True):
            for image_id in setid[key].ravel():
                name = f"image_{image_id:05d}.jpg"
                target = tmp / "out" / split / str(labels[image_id - 1]) / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(tmp / "raw" / "jpg" / name, target)
        check_layout(tmp / "out", num_classes, num_images)
        os.replace(tmp / "out", dest)
    return dest


def ensure_data(root: str | os.PathLike | None = None, *, source: str = "course",
                base_url: str | None = None, md5s: dict[str, str] | None = None,
                num_classes: int = NUM_CLASSES, num_images: int = NUM_IMAGES) -> Path:
    """The data folder, downloaded and arranged first when it is missing or empty.

    A folder with images in any layout load_data accepts is used as it is.
    """
    root = Path(root) if root else data_dir()
    if has_images(root):
        return root
    if root.exists() and any(root.iterdir()):
        raise DataError(f"{root}: no train/ folder and no class folders of images; put one folder "
                        "of images per class there, or empty it to download the flowers")
    root.parent.mkdir(parents=True, exist_ok=True)
    if source not in ("course", "flowers102"):
        raise DataError(f"unknown data source {source!r}; choose course or flowers102")
    base_url = base_url or os.environ.get("FLOWERS_DATA_URL") or None  # a mirror, or a test's
    try:
        return _download_and_arrange(root, source, base_url, md5s, num_classes, num_images)
    except DataError as err:
        raise DataError(f"no data at {root} and {err}; put the course's flowers folder "
                        "(train/, valid/, test/) there, or set FLOWERS_DIR to it") from None


def _download_and_arrange(root: Path, source: str, base_url: str | None,
                          md5s: dict[str, str] | None, num_classes: int, num_images: int) -> Path:
    """Download the files of `source` into a temporary folder and arrange them at root."""
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=".download-") as tmp:
        if source == "course":
            archive = download_file(base_url or COURSE_URL, Path(tmp) / "flower_data.tar.gz")
            return arrange_course_archive(archive, root, num_classes, num_images)
        for key, (name, md5) in FLOWERS102_FILES.items():
            url = (base_url or FLOWERS102_URL) + name
            download_file(url, Path(tmp) / name, (md5s or {}).get(key, md5))
        return arrange_flowers102(tmp, root, num_classes, num_images)
