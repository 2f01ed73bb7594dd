"""Where data sets live on disk: the data root, checksums, archives and the opt-in download.

Nothing here touches the network unless a loader was called with ``download=True``.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import shutil
import tarfile
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import IO, NamedTuple

from poisonreach.errors import CorruptFileError, DatasetNotFoundError
from poisonreach.io import atomic_write

ENV_VAR = "POISONREACH_DATA"
DOWNLOAD_TIMEOUT = 60.0  # seconds without data before a download counts as unreachable
_CHUNK = 1 << 20


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The folder holding all data sets: ``root`` (``--data-root``), else ``$POISONREACH_DATA``,
    else ``~/.cache/poisonreach``."""
    if root is None:
        root = os.environ.get(ENV_VAR) or Path.home() / ".cache" / "poisonreach"
    return Path(root).expanduser()


class Known(NamedTuple):
    """A published file: its size in bytes and the MD5 of its content."""

    size: int
    md5: str


def md5_file(path: Path) -> str:
    """MD5 of a file, read in chunks so large archives never sit in memory."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def check_known(label: str, size: int, digest: Callable[[], str], known: Known, *,
                strict: bool = False) -> None:
    """Raise CorruptFileError unless content of ``size`` bytes with MD5 ``digest()`` is ``known``.

    Content of another size is accepted unless ``strict``: it is not the published file at all
    (small files made by tests or users), and truncation is caught by the format's own checks.
    A download is strict, since it must be the published file.
    """
    if size != known.size:
        if strict:
            raise CorruptFileError(f"{label} has {size} bytes, expected {known.size}: "
                                   "the file is incomplete or not the published one; re-download it")
        return
    actual = digest()
    if actual != known.md5:
        raise CorruptFileError(f"{label} fails its checksum: expected MD5 {known.md5}, got {actual}; "
                               "the file is corrupt: delete it and re-download it")


def missing_message(dataset: str, root: Path, sub: str, missing: Iterable[str], *,
                    alternative: str = "") -> str:
    """Say which files of ``dataset`` are missing and where to put them.

    ``sub`` is the folder below the data root that must hold them; ``alternative`` names another
    way to provide them (an archive, a system package).
    """
    folder = (root / sub).absolute()
    text = (f"{dataset}: not found in {folder}: {', '.join(missing)}. "
            f"Put them in {folder}/, or pass --data-root DIR / set {ENV_VAR}=DIR "
            f"where DIR/{sub}/ holds them")
    if alternative:
        text += f", or {alternative}"
    return text + ", or load it with download=True."


def fetch(urls: Iterable[str], dest: Path, verify: Callable[[Path], None], missing: str) -> Path:
    """Download the first reachable of ``urls`` to ``dest``.

    The bytes go to a temporary file beside ``dest`` that is renamed only once ``verify`` accepts
    it, so an interrupted or corrupt download never looks like a present file. If no URL answers,
    raise DatasetNotFoundError with the ``missing`` message and each URL tried.
    """
    failures = []
    for url in urls:
        try:
            with atomic_write(dest) as (out, tmp), \
                    urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:
                shutil.copyfileobj(response, out, _CHUNK)
                out.close()
                verify(tmp)
            return dest
        except (OSError, http.client.HTTPException) as err:
            failures.append(f"{url} ({err})")
    raise DatasetNotFoundError(f"{missing} Downloading failed: {'; '.join(failures)}.")


class Archive(NamedTuple):
    """A published archive that unpacks into a data set's folder."""

    name: str
    url: str
    known: Known


def ensure_extracted(dataset: str, root: Path, sub: str, top: str, needed: list[str],
                     archive: Archive, download: bool) -> Path:
    """Return ``root/sub/top``, the unpacked data set, after checking ``needed`` paths below it.

    Missing paths are produced by unpacking ``root/sub/archive.name``, downloaded first when
    ``download`` is set; otherwise DatasetNotFoundError names each missing path and its folder.
    """
    folder = root / sub / top
    missing = [name for name in needed if not (folder / name).exists()]
    if not missing:
        return folder
    archive_path = root / sub / archive.name
    if not archive_path.exists():
        message = missing_message(dataset, root, f"{sub}/{top}", missing, alternative=(
            f"put {archive.name} (from {archive.url}) in {(root / sub).absolute()}/"))
        if not download:
            raise DatasetNotFoundError(message)
        fetch([archive.url], archive_path,
              lambda tmp: _check_archive(tmp, archive, strict=True), message)
    _check_archive(archive_path, archive, strict=False)
    extract(archive_path, root / sub)
    still = [name for name in needed if not (folder / name).exists()]
    if still:
        raise CorruptFileError(f"{archive_path} does not contain {top}/{', '.join(still)}: "
                               f"it is not the published {archive.name}; re-download it")
    return folder


def _check_archive(path: Path, archive: Archive, *, strict: bool) -> None:
    check_known(str(path), path.stat().st_size, lambda: md5_file(path), archive.known,
                strict=strict)


def extract(archive: Path, dest: Path) -> None:
    """Unpack a .tar.gz or .zip ``archive`` into ``dest``, refusing anything but plain files and
    folders whose paths stay inside ``dest`` (the archive may come from anywhere).

    Each file is written to a temporary name and renamed, so an interrupted run leaves only whole
    files and a rerun fills in the rest.
    """
    try:
        for name, is_dir, open_member in _members(archive):
            target = _inside(dest, name, archive)
            if is_dir:
                target.mkdir(parents=True, exist_ok=True)
                continue
            with atomic_write(target) as (out, _), open_member() as src:
                shutil.copyfileobj(src, out, _CHUNK)
    except (tarfile.TarError, zipfile.BadZipFile, gzip.BadGzipFile, zlib.error, EOFError) as err:
        raise CorruptFileError(f"cannot unpack {archive}: {err}; delete it and re-download it") from err


def _members(archive: Path) -> Iterator[tuple[str, bool, Callable[[], IO[bytes]]]]:
    """(name, is_dir, opener) for each entry of a zip or tar archive; links and devices refused."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                yield info.filename, info.is_dir(), lambda info=info: z.open(info)
        return
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            if not (member.isfile() or member.isdir()):
                raise CorruptFileError(f"{archive} holds {member.name!r}, which is not a plain file "
                                       "or folder; refusing to unpack it: re-download the archive")
            yield member.name, member.isdir(), lambda member=member: tar.extractfile(member)


def _inside(dest: Path, name: str, archive: Path) -> Path:
    """``dest/name``, refusing absolute names and ``..`` that would escape ``dest``."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if ".." in parts or (parts and (parts[0] == "/" or ":" in parts[0])):
        raise CorruptFileError(f"{archive} holds the path {name!r}, which leaves the folder it is "
                               "unpacked into; refusing to unpack it: re-download the archive")
    return dest.joinpath(*parts)
