"""The zip container of an uploaded dataset (an .npz, or a zip of image class folders), checked
before anything in it is decompressed: safe relative names, no links, no duplicate or
overlapping entries (CVE-2024-0450), a bounded number of entries, declared sizes and
compression ratios within budget. Reads stop at the size a member declares. Archives are read
in place, never extracted.
"""

from __future__ import annotations

import os
import re
import stat
import struct
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import BinaryIO

from workers.datasets import DatasetError
from workers.errors import TooLargeError, first_lines, quoted

MiB = 1 << 20
MAX_COMPRESSION_RATIO = 200  # for archive members over 1 MiB once decompressed
NPY_MAGIC = b"\x93NUMPY"
READ_CHUNK = 8 * MiB


@dataclass
class Limits:
    max_samples: int
    max_decoded_bytes: int  # x and y once decoded

    @property
    def max_entries(self) -> int:  # files, and a folder entry for each class at most
        return 2 * self.max_samples + 16


NOT_A_DATASET = (
    "the file is neither an .npz archive nor a .zip of image class folders; save arrays with "
    "numpy.savez(path, x=images, y=labels), or zip folders of PNG or JPEG images named after "
    "their class (classname/image.png)"
)

@contextmanager
def open_archive(path: Path, limits: Limits):
    """Yields (ZipFile, file members sorted by name) once the archive's
    structure is checked; nothing has been decompressed at that point."""
    with path.open("rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if handle.read(len(NPY_MAGIC)) == NPY_MAGIC:
            raise DatasetError(
                "the file is a single .npy array; save images and labels together with "
                "numpy.savez(path, x=images, y=labels)"
            )
        directory_start = _central_directory(handle, size, limits)
        try:
            archive = zipfile.ZipFile(handle)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error) as exc:
            raise DatasetError(f"the archive is corrupt ({first_lines(exc)}); {NOT_A_DATASET}") from None
        with archive:
            infos = archive.infolist()
            for info in infos:
                _check_member(info)
            _check_no_overlap(handle, infos, directory_start)
            files = sorted((i for i in infos if not i.is_dir()), key=lambda i: i.filename)
            _check_declared_sizes(files, limits)
            yield archive, files


_EOCD = struct.Struct("<4s4H2LH")
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_CENTRAL_RECORD = 46  # fixed part of a central directory entry


def _central_directory(handle: BinaryIO, size: int, limits: Limits) -> int:
    """Where the central directory starts. Walks it counting entries, so an archive with
    millions of tiny entries is refused before zipfile builds an object for each."""
    tail_size = min(size, _EOCD.size + 0xFFFF)
    handle.seek(size - tail_size)
    tail = handle.read(tail_size)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < _EOCD.size:
        raise DatasetError(NOT_A_DATASET)
    *_, directory_size, _, _ = _EOCD.unpack_from(tail, at)
    end = size - tail_size + at
    if end >= _ZIP64_LOCATOR.size + _ZIP64_EOCD.size:
        handle.seek(end - _ZIP64_LOCATOR.size)
        if handle.read(4) == b"PK\x06\x07":
            handle.seek(end - _ZIP64_LOCATOR.size - _ZIP64_EOCD.size)
            record = handle.read(_ZIP64_EOCD.size)
            if record[:4] != b"PK\x06\x06":
                raise DatasetError(f"the archive's zip64 directory is corrupt; {NOT_A_DATASET}")
            directory_size = _ZIP64_EOCD.unpack(record)[8]
            end -= _ZIP64_LOCATOR.size + _ZIP64_EOCD.size
    start = end - directory_size
    if start < 0:
        raise DatasetError(f"the archive's central directory is corrupt; {NOT_A_DATASET}")
    handle.seek(start)
    directory = handle.read(directory_size)
    entries, at = 0, 0
    while at < len(directory):
        if directory[at : at + 4] != b"PK\x01\x02" or at + _CENTRAL_RECORD > len(directory):
            raise DatasetError(f"the archive's central directory is corrupt; {NOT_A_DATASET}")
        name, extra, comment = struct.unpack_from("<3H", directory, at + 28)
        at += _CENTRAL_RECORD + name + extra + comment
        entries += 1
        if entries > limits.max_entries:
            raise TooLargeError(
                f"the archive has more than {limits.max_entries} entries; the limit is "
                f"{limits.max_samples} samples"
            )
    return start


_DRIVE = re.compile(r"^[A-Za-z]:")


def _check_member(info: zipfile.ZipInfo) -> None:
    """Safe names and plain files only, readable without a password, stored or deflated."""
    name = info.orig_filename
    parts = name.rstrip("/").split("/")
    problem = (
        "a NUL character"
        if "\x00" in name
        else "an absolute path"
        if name.startswith("/")
        else "a backslash"
        if "\\" in name
        else "a drive letter"
        if _DRIVE.match(name)
        else "a '..' component"
        if ".." in parts
        else "an empty component"
        if "" in parts
        else None
    )
    if problem:
        raise DatasetError(
            f"archive member {quoted(name)} has {problem} in its name; zip the dataset "
            "with relative paths only (cd dataset && zip -r ../dataset.zip .)"
        )
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode) or (stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))):
        raise DatasetError(
            f"archive member {quoted(name)} is a link or special file; the archive may "
            "hold only regular files and folders (zip without --symlinks)"
        )
    if info.flag_bits & 0x1:
        raise DatasetError(
            f"archive member {quoted(name)} is encrypted; upload an archive without a password"
        )
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise DatasetError(
            f"archive member {quoted(name)} uses compression method "
            f"{info.compress_type}; store or deflate members (numpy.savez, zip)"
        )


def _check_no_overlap(handle: BinaryIO, infos: list[zipfile.ZipInfo], directory_start: int) -> None:
    """Each member's bytes belong to it alone (CVE-2024-0450 'overlapping entries' bombs), and
    no name appears twice."""
    counts = Counter(i.filename for i in infos)
    twice = next((name for name, n in counts.items() if n > 1), None)
    if twice is not None:
        raise DatasetError(f"archive member {quoted(twice)} appears more than once; re-create the archive")
    spans = []
    for info in infos:
        handle.seek(info.header_offset)
        header = handle.read(30)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise DatasetError(
                f"archive member {quoted(info.filename)} has no local header where the "
                "directory says; the archive is corrupt, re-create it"
            )
        name_size, extra_size = struct.unpack_from("<2H", header, 26)
        spans.append(
            (
                info.header_offset,
                info.header_offset + 30 + name_size + extra_size + info.compress_size,
                info.filename,
            )
        )
    spans.sort()
    for (_, end, first), (start, _, second) in pairwise(spans):
        if start < end:
            raise DatasetError(
                f"archive members {quoted(first)} and {quoted(second)} overlap (a known "
                "zip-bomb construction); re-create the archive"
            )
    if spans and spans[-1][1] > directory_start:
        raise DatasetError(
            f"archive member {quoted(spans[-1][2])} overlaps the central directory; re-create the archive"
        )


def _check_declared_sizes(files: list[zipfile.ZipInfo], limits: Limits) -> None:
    """Budget the decompressed size from the headers, before decompressing anything."""
    declared = sum(i.file_size for i in files)
    allowed = 2 * limits.max_decoded_bytes + MiB  # PNGs of noise are slightly larger than raw
    if declared > allowed:
        raise TooLargeError(
            f"the archive declares {declared} bytes once decompressed, over the limit of "
            f"{allowed} bytes; upload fewer or smaller images"
        )
    for info in files:
        ratio = info.file_size // max(info.compress_size, 1)
        if info.file_size > MiB and ratio > MAX_COMPRESSION_RATIO:
            raise DatasetError(
                f"archive member {quoted(info.filename)} expands {ratio} times ({info.compress_size} bytes "
                f"to {info.file_size}), more than {MAX_COMPRESSION_RATIO} times: refused as a possible zip "
                "bomb; store it uncompressed (numpy.savez, zip -0)"
            )


_CORRUPT = (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError)


def member_chunks(archive: zipfile.ZipFile, info: zipfile.ZipInfo, offset: int = 0) -> Iterator[bytes]:
    """A member from ``offset`` on, in chunks. Never reads past the size the member declares
    (zipfile stops there too, and checks the CRC); a bad CRC or deflate stream is refused."""
    remaining = info.file_size - offset
    try:
        with archive.open(info) as f:
            f.seek(offset)
            while remaining:
                chunk = f.read(min(READ_CHUNK, remaining))
                if not chunk:
                    raise EOFError("it ends early")
                remaining -= len(chunk)
                yield chunk
    except _CORRUPT as exc:
        raise DatasetError(
            f"archive member {quoted(info.filename)} is corrupt ({first_lines(exc)}); re-create the archive"
        ) from None


def read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, offset: int = 0) -> bytes:
    return b"".join(member_chunks(archive, info, offset))


