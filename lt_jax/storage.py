"""Local and gs:// paths behind one small interface.

Everything goes through fsspec: the local filesystem for plain paths and gcsfs for `gs://`.
Against an emulator, set `STORAGE_EMULATOR_HOST` (gcsfs honours it) before first use.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile
import time
import urllib.error
import urllib.request
from typing import IO, Iterator

import fsspec


def is_remote(path: str) -> bool:
    """True for URLs with a scheme (gs://, s3://, memory://); False for local paths."""
    return "://" in str(path) and not str(path).startswith("file://")


class StorageUnreachable(ValueError):
    """The object store behind a path cannot be reached at all (network, DNS, emulator address)."""


# gcsfs retries an unreachable endpoint about 30 s per request; a stage makes several requests, so a
# typo or a missing network took minutes to surface. One probe per endpoint, with a few quick
# tries, turns that into one clear line within seconds.
PROBE_TRIES = 3
PROBE_TIMEOUT_S = 3.0
_reachable: set[str] = set()  # endpoints that answered (a failure is probed again next time)


def _probe(endpoint: str, bucket: str) -> str | None:
    """None when `endpoint` answers HTTP at all (any status: auth is checked later), else the error."""
    error = "no answer"
    for attempt in range(PROBE_TRIES):
        if attempt:
            time.sleep(0.5 * 2 ** (attempt - 1))
        try:
            urllib.request.urlopen(f"{endpoint}/storage/v1/b/{bucket}?fields=name", timeout=PROBE_TIMEOUT_S).close()
            return None
        except urllib.error.HTTPError:
            return None  # it answered: 401 / 403 / 404 are for the real request to report
        except (urllib.error.URLError, OSError) as e:
            error = str(getattr(e, "reason", e))
    return error


def check_reachable(path: str, fs: fsspec.AbstractFileSystem | None = None) -> None:
    """Raises StorageUnreachable naming `path` when its gs:// endpoint does not answer (success is cached)."""
    if not str(path).startswith("gs://"):
        return
    fs = fs or fsspec.filesystem("gs")
    endpoint = str(getattr(fs, "_location", "https://storage.googleapis.com")).rstrip("/")
    if endpoint in _reachable:
        return
    error = _probe(endpoint, str(path)[len("gs://"):].split("/", 1)[0])
    if error is not None:
        raise StorageUnreachable(
            f"{path}: cannot reach Cloud Storage at {endpoint} ({error}, {PROBE_TRIES} tries); "
            "check the network, the bucket name and STORAGE_EMULATOR_HOST"
        )
    _reachable.add(endpoint)


def filesystem(path: str) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem that serves `path` (a gs:// endpoint is checked once to be reachable)."""
    fs, _ = fsspec.core.url_to_fs(str(path))
    check_reachable(path, fs)
    return fs


def join(base: str, *parts: str) -> str:
    """Joins path parts with '/' for URLs and os.sep for local paths."""
    base = str(base)
    if is_remote(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def exists(path: str) -> bool:
    return filesystem(path).exists(str(path))


def isdir(path: str) -> bool:
    return filesystem(path).isdir(str(path))


def makedirs(path: str) -> None:
    """Creates a directory (a no-op on object stores, which have no directories)."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
    """Base names of the entries directly under `path`, sorted."""
    fs = filesystem(path)
    entries = fs.ls(str(path), detail=False)
    return sorted(posixpath.basename(e.rstrip("/")) for e in entries)


@contextlib.contextmanager
def open_file(path: str, mode: str = "rb") -> Iterator[IO]:
    """Opens a local or remote file; parent directories are created for local writes."""
    if any(m in mode for m in "wa") and not is_remote(path):
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
    check_reachable(path)
    with fsspec.open(str(path), mode) as f:
        yield f


def read_bytes(path: str) -> bytes:
    with open_file(path, "rb") as f:
        return f.read()


def read_text(path: str, encoding: str = "utf-8") -> str:
    return read_bytes(path).decode(encoding)


def write_bytes(path: str, data: bytes) -> None:
    with open_file(path, "wb") as f:
        f.write(data)


def write_text(path: str, text: str, encoding: str = "utf-8") -> None:
    write_bytes(path, text.encode(encoding))


def remove(path: str, recursive: bool = False) -> None:
    fs = filesystem(path)
    if fs.exists(str(path)):
        fs.rm(str(path), recursive=recursive)


def copy_local_to(local_path: str, dest: str) -> None:
    """Uploads a local file or folder to `dest` (or copies it locally)."""
    fs = filesystem(dest)
    if os.path.isdir(local_path):
        for root, _, files in os.walk(local_path):
            for name in files:
                src = os.path.join(root, name)
                rel = os.path.relpath(src, local_path).replace(os.sep, "/")
                copy_local_to(src, join(dest, rel))
        return
    if is_remote(dest):
        fs.put_file(local_path, str(dest))
    else:
        makedirs(os.path.dirname(os.path.abspath(dest)))
        with open(local_path, "rb") as src, open(dest, "wb") as out:
            out.write(src.read())


def local_folder(path: str, prefix: str = "lt_jax_") -> str:
    """`path` itself when local; a gs:// (or other remote) folder copied into a new temporary folder."""
    if not is_remote(path):
        return str(path)
    return download_dir(path, tempfile.mkdtemp(prefix=prefix))


def download_dir(path: str, local_dir: str) -> str:
    """Copies a remote folder's files into `local_dir`; returns `path` itself when local."""
    if not is_remote(path):
        return str(path)
    fs = filesystem(path)
    os.makedirs(local_dir, exist_ok=True)
    for name in listdir(path):
        src = join(path, name)
        if fs.isfile(src):
            fs.get_file(src, os.path.join(local_dir, name))
    return local_dir
