"""The study storage: a local folder, a shared mount, or any URI that ``pyarrow.fs`` opens.

A study keeps its own files (``study.yaml``) and Ray Tune's state under
``<storage>/<name>/``; ``--storage`` is a plain path (local disk or a mount every
node shares) or a URI such as ``s3://bucket/prefix`` or ``gs://bucket/prefix``.
Ray Tune opens the same URI itself (``RunConfig(storage_path=...)``,
``Tuner.restore``/``can_restore``) through ``pyarrow.fs.FileSystem.from_uri``
(``ray.train._internal.storage.get_fs_and_path``), so this module and Ray reach
the storage the same way and with the same settings.

**S3 and S3-compatible servers (MinIO, Ceph, moto).** pyarrow's S3 filesystem is
the AWS C++ SDK, configured the usual way, in the environment of every process that
opens the storage (the driver, and every Ray node that runs trials):

* credentials: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (and
  ``AWS_SESSION_TOKEN``), or a profile (``AWS_PROFILE``, ``~/.aws/credentials``), or
  the instance/pod role;
* region: ``AWS_DEFAULT_REGION`` / ``AWS_REGION`` (or the profile's);
* endpoint of an S3-compatible server: ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``
  (e.g. ``http://minio.internal:9000``); both are honoured by pyarrow 25 and so by
  Ray's ``storage_path="s3://..."`` (checked against a moto server in
  ``tests/test_storage.py``). A URI may also carry pyarrow's options as a query,
  ``s3://bucket/prefix?endpoint_override=host:9000&scheme=http``; the study's files
  then go below the path part (:func:`join` keeps the query at the end).

Every operation here takes a *location*: a plain path or a URI, as a string.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from trainables.errors import UserError

#: Seconds a storage server has to answer a probe (write, read back, delete).
DEFAULT_PROBE_TIMEOUT_S = 20.0
#: Seconds one read, write, listing or deletion on a remote storage may take.
OPERATION_TIMEOUT_S = 30.0
#: The variables that point pyarrow (and so Ray) at an S3-compatible server.
ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")

T = TypeVar("T")

_HINT = (
    "Check the URI, that the bucket exists, the credentials (AWS_ACCESS_KEY_ID/"
    "AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and, for an S3-compatible server, "
    "AWS_ENDPOINT_URL; or pick another --storage"
)


def is_uri(location: str) -> bool:
    """Whether ``location`` is a URI (``scheme://...``) other than ``file://``."""
    return "://" in location and not location.startswith("file://")


def local_path(location: str) -> Path | None:
    """The local path of a plain path or ``file://`` URI (absolute); None for a remote URI."""
    if location.startswith("file://"):
        return Path(urlsplit(location).path).resolve()
    if is_uri(location):
        return None
    return Path(location).expanduser().resolve()


def normalize(location: str) -> str:
    """A storage location as a study records it: an absolute local path, or the URI
    without a trailing ``/`` (a ``file://`` URI becomes its path)."""
    path = local_path(location)
    if path is not None:
        return str(path)
    base, sep, query = location.partition("?")
    return base.rstrip("/") + sep + query


def join(location: str, *parts: str) -> str:
    """``location/part/...``; a URI's query (``?endpoint_override=...``) stays at the end."""
    base, sep, query = location.partition("?") if is_uri(location) else (location, "", "")
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)]) + sep + query


def endpoint() -> str | None:
    """The S3 endpoint the environment sets (:data:`ENDPOINT_VARIABLES`), None: AWS's."""
    for name in ENDPOINT_VARIABLES:
        if os.environ.get(name):
            return os.environ[name]
    return None


def describe(location: str) -> str:
    """``location`` for an error message: an ``s3://`` URI names the endpoint it goes to."""
    if location.startswith("s3://") and "endpoint_override" not in location:
        where = endpoint()
        return f"{location} (endpoint {where})" if where else f"{location} (AWS S3)"
    return location


def filesystem(location: str):
    """``(pyarrow filesystem, path on it)`` for a plain path or a URI.

    A URI that pyarrow cannot open (an unknown scheme, a bad query) is a UserError.
    """
    import pyarrow.fs as pafs

    path = local_path(location)
    if path is not None:
        return pafs.LocalFileSystem(), str(path)
    try:
        return pafs.FileSystem.from_uri(location)
    except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise UserError(f"the storage URI {location!r} cannot be opened: {exc}") from None


def read_text(location: str) -> str:
    """The text of the file at ``location`` (FileNotFoundError when there is none)."""
    return read_bytes(location).decode()


def read_bytes(location: str) -> bytes:
    """The bytes of the file at ``location`` (FileNotFoundError when there is none)."""
    path = local_path(location)
    if path is not None:
        return path.read_bytes()

    return _remote(location, "read", lambda: _read_bytes(location))


def _read_bytes(location: str) -> bytes:
    fs, where = filesystem(location)
    if not _is_file(fs, where):
        raise FileNotFoundError(location)
    with fs.open_input_stream(where) as stream:
        return stream.read()


def _read(location: str) -> str:
    return _read_bytes(location).decode()


def write_text(location: str, text: str) -> None:
    """Write ``text`` to the file at ``location`` (see :func:`write_bytes`)."""
    write_bytes(location, text.encode())


def write_bytes(location: str, data: bytes) -> None:
    """Write ``data`` to the file at ``location`` (a local file through a temporary file
    and a rename, so that a reader never sees half of it; its folders are made)."""
    path = local_path(location)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return

    _remote(location, "written", lambda: _write_bytes(location, data))


def _write_bytes(location: str, data: bytes) -> None:
    fs, where = filesystem(location)
    with fs.open_output_stream(where) as stream:  # one object, written whole
        stream.write(data)


def _write(location: str, text: str) -> None:
    _write_bytes(location, text.encode())


def exists(location: str) -> bool:
    """Whether a file is at ``location``."""
    path = local_path(location)
    if path is not None:
        return path.is_file()
    return _remote(location, "read", lambda: _is_file(*filesystem(location)))


def delete(location: str) -> None:
    """Remove the file at ``location`` (nothing when there is none)."""
    path = local_path(location)
    if path is not None:
        path.unlink(missing_ok=True)
        return

    _remote(location, "deleted from", lambda: _delete(location))


def _delete(location: str) -> None:
    fs, where = filesystem(location)
    if _is_file(fs, where):
        fs.delete_file(where)


def subfolders_with(location: str, filename: str) -> list[str]:
    """Names of the folders directly below ``location`` that hold ``filename`` (the
    studies of a storage: those with a ``study.yaml``), sorted; [] when there are none."""
    import pyarrow.fs as pafs

    path = local_path(location)
    if path is not None:
        return sorted(p.parent.name for p in path.glob(f"*/{filename}"))

    def listing() -> list[str]:
        fs, where = filesystem(location)
        infos = fs.get_file_info(pafs.FileSelector(where, allow_not_found=True))
        names = [i.base_name for i in infos if i.type == pafs.FileType.Directory]
        return sorted(n for n in names if _is_file(fs, f"{where.rstrip('/')}/{n}/{filename}"))

    return _remote(location, "listed", listing)


def _remote(location: str, action: str, call: Callable[[], T]) -> T:
    """``call()`` on a remote storage, bounded by :data:`OPERATION_TIMEOUT_S`; a
    server that does not answer, or refuses, is a UserError naming ``location``
    (FileNotFoundError passes: the caller's business)."""
    try:
        return within(OPERATION_TIMEOUT_S, f"{action} {location}", call)
    except (FileNotFoundError, UserError):
        raise
    except TimeoutError:
        raise UserError(
            f"the study storage {describe(location)} could not be {action}: no answer "
            f"within {OPERATION_TIMEOUT_S:g} s. {_HINT}"
        ) from None
    except Exception as exc:  # noqa: BLE001 - pyarrow raises OSError, ArrowException, ...
        reason = " ".join(str(exc).split())[:400]
        raise UserError(
            f"the study storage {describe(location)} could not be {action}: {reason}. {_HINT}"
        ) from None


def _is_file(fs, where: str) -> bool:
    import pyarrow.fs as pafs

    return fs.get_file_info(where).type == pafs.FileType.File


def within(timeout_s: float, what: str, call: Callable[[], T]) -> T:
    """``call()``, or a :class:`TimeoutError` naming ``what`` after ``timeout_s`` seconds.

    The call goes on in a daemon thread that nobody waits for (an unreachable server
    can hold a pyarrow call for minutes of retries); the process can still exit.

    Args:
        timeout_s: seconds to wait.
        what: what is being done, for the error.
        call: the work.
    """
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"storage: {what}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"{what}: no answer within {timeout_s:g} s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def probe(location: str, timeout_s: float = DEFAULT_PROBE_TIMEOUT_S) -> None:
    """Fail (a UserError, one paragraph) unless a file can be written to, read back from
    and deleted at ``location`` within ``timeout_s`` seconds; nothing stays behind.

    For a remote URI, the probe is one object ``<location>/.energy-study-probe-<uuid>``
    (object stores have no folders to create). pyarrow's S3 filesystem leaves an empty
    "folder" marker object ``<location>/`` behind when it deletes the last object
    below a prefix (as ``mkdir`` would), so give the storage root, not a study's
    folder. A local ``location`` is checked by :func:`study.preflight.check_storage`.

    Args:
        location: the study's folder (a URI).
        timeout_s: seconds the whole probe may take.
    """
    target = join(location, f".energy-study-probe-{uuid.uuid4().hex}")
    payload = uuid.uuid4().hex

    def run() -> None:
        _write(target, payload)
        try:
            back = _read(target)
        finally:
            _delete(target)
        if back != payload:
            raise OSError(f"read back {len(back)} bytes that differ from what was written")

    hint = _HINT
    try:
        within(timeout_s, f"probing {location}", run)
    except TimeoutError:
        raise UserError(
            f"the study storage {describe(location)} could not be reached: no answer within "
            f"{timeout_s:g} s to writing, reading and deleting a probe object. {hint}"
        ) from None
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - pyarrow raises OSError, ArrowException, ...
        reason = " ".join(str(exc).split())[:400]
        unreachable = any(m in reason for m in ("NETWORK_CONNECTION", "curlCode", "connect"))
        what = "could not be reached" if unreachable else "cannot be written and read back"
        raise UserError(
            f"the study storage {describe(location)} {what}: {reason}. {hint}"
        ) from None
