"""A small, fast, strict reader of WebDataset tar shards.

Python's `tarfile` (which `webdataset.tarfile_samples` uses) builds a full `TarInfo` per member and costs ~30 us per
header; with 3-4 members per sample that is a third of the time of decoding and transforming a small PNG. This
reader parses the 512-byte headers directly (POSIX ustar, PAX ``x``/``g`` records, GNU ``L`` long names, base-256
sizes), verifies every header checksum, and groups members into samples exactly like webdataset
(``dir/key.ext.ext2`` -> key ``dir/key``, field ``ext.ext2`` lower-cased; ``__...__`` meta files skipped).

Unlike `tarfile` in stream mode, which stops silently at a truncated or garbled header, it raises `TarReadError` for
anything that is not a complete archive: a bad checksum, a header or member cut short.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterator
from typing import Any, BinaryIO

__all__ = ["TarReadError", "iter_members", "iter_samples", "open_shard"]

_BLOCK = 512
_BUFFER = 1 << 20
_SPACES = b" " * 8
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


class TarReadError(OSError):
    """A shard that is not a complete, valid tar archive."""


def _number(field: bytes, what: str, where: str) -> int:
    if field and field[0] & 0x80:  # base-256 (GNU/star, sizes >= 8 GiB)
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 9)) * 2 if field[0] & 0x40 else value
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarReadError(f"{where}: bad {what} field {field!r}") from None


def _pax_records(data: bytes, where: str) -> dict[str, str]:
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarReadError(f"{where}: bad PAX record") from None
        if length <= 0:
            raise TarReadError(f"{where}: bad PAX record length {length}")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _read_exact(stream: BinaryIO, n: int, where: str, what: str) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise TarReadError(f"{where}: unexpected end of data in {what} ({len(data)} of {n} bytes)")
    return data


def iter_members(stream: BinaryIO, where: str = "tar") -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of the regular files of a tar stream, in archive order."""
    long_name: str | None = None
    pax: dict[str, str] = {}
    global_pax: dict[str, str] = {}
    offset = 0
    while True:
        header = stream.read(_BLOCK)
        if not header:  # our writers and webdataset's always end with zero blocks: this is a truncated shard
            raise TarReadError(f"{where}: unexpected end of data at byte {offset} (no end-of-archive marker)")
        if len(header) != _BLOCK:
            raise TarReadError(f"{where}: truncated header at byte {offset}")
        if header == bytes(_BLOCK):
            return  # end-of-archive marker
        try:
            stored = _number(header[148:156], "checksum", where)
        except TarReadError:
            stored = -1  # not even a number: reported as a bad checksum below
        # The checksum is the byte sum with the checksum field read as spaces. Adler-32's low half is that sum + 1
        # modulo 65521, computed in C: 10x faster than sum(); the exact sum only runs when the fast test fails.
        fast = (zlib.adler32(header[156:], zlib.adler32(_SPACES, zlib.adler32(header[:148]))) & 0xFFFF) - 1
        if stored < 0 or (stored - fast) % 65521:
            unsigned = sum(header) - sum(header[148:156]) + 8 * 32
            high = sum(1 for b in header[:148] + header[156:] if b > 127)  # some old tars sum signed bytes
            if stored not in (unsigned, unsigned - 256 * high):
                raise TarReadError(f"{where}: bad header checksum at byte {offset} (not a tar file, or corrupt)")
        kind = header[156:157]
        size = _number(header[124:136], "size", where)
        if "size" in pax:
            size = int(pax["size"])
        padded = -(-size // _BLOCK) * _BLOCK
        offset += _BLOCK
        if kind in (b"x", b"g", b"L", b"K"):
            data = _read_exact(stream, padded, where, "an extended header")[:size]
            if kind == b"x":
                pax = _pax_records(data, where)
            elif kind == b"g":
                global_pax.update(_pax_records(data, where))
            elif kind == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            offset += padded
            continue
        if long_name is not None:
            name = long_name
        elif "path" in pax:
            name = pax["path"]
        elif "path" in global_pax:
            name = global_pax["path"]
        else:
            name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if header[257:262] == b"ustar":
                prefix = header[345:500].split(b"\0", 1)[0]
                if prefix:
                    name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        long_name, pax = None, {}
        if kind in (b"0", b"\0", b"7"):  # regular file (and contiguous file)
            data = _read_exact(stream, padded, where, f"member {name!r}")
            yield name, data[:size] if padded != size else data
        elif padded:
            _read_exact(stream, padded, where, f"member {name!r}")
        offset += padded


def iter_samples(stream: BinaryIO, url: str) -> Iterator[dict[str, Any]]:
    """Samples ``{"__key__", "__url__", ext: bytes, ...}`` grouped from consecutive members sharing a key.

    A sample is yielded once the next key (or the end of the archive) shows it is complete. On a read error the
    sample in progress is lost; the `TarReadError` then has ``lost = 1`` (else 0).
    """
    current: dict[str, Any] | None = None
    try:
        for name, data in iter_members(stream, url):
            match = _KEY_RE.match(name)
            if match is None:
                continue
            key, ext = match.group(1), match.group(2).lower()
            if key.rsplit("/", 1)[-1].startswith("__"):
                continue  # webdataset meta files (__index__ ...)
            if current is None or current["__key__"] != key:
                if current is not None:
                    done, current = current, None
                    yield done
                current = {"__key__": key, "__url__": url}
            if ext in current:
                raise TarReadError(f"{url}: duplicate file {name!r} in sample {key!r}")
            current[ext] = data
    except TarReadError as exn:
        exn.lost = int(current is not None)
        raise
    if current is not None:
        yield current


def open_shard(url: str) -> BinaryIO:
    """A binary stream for a local path (1 MiB buffer) or any URL `webdataset.gopen` opens."""
    if "://" in url or url.startswith("pipe:"):
        import webdataset as wds

        return wds.gopen(url, "rb")
    return open(url, "rb", buffering=_BUFFER)
