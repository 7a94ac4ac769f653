"""A tiny URI layer over fsspec: local paths, ``file://`` and ``s3://`` (any fsspec scheme works
with default options).

Writes are atomic: readers see either nothing or the whole object. Locally a temp file in the
same directory is renamed over the target; on S3 the bytes are complete in memory before the one
PUT (or multipart upload, which only becomes visible on completion) to the final key.
"""

from __future__ import annotations

import os
import posixpath
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from tasks.retry import PERMANENT_ERRORS as PERMANENT_ERRORS  # re-exported
from tasks.retry import is_transient

ENV_ENDPOINT = "AWS_ENDPOINT_URL"
ENV_KEY = "AWS_ACCESS_KEY_ID"
ENV_SECRET = "AWS_SECRET_ACCESS_KEY"

#: Option names that carry credentials (botocore's aws_*_key_id / aws_secret_access_key /
#: aws_session_token, s3fs's key / secret / token, passwords).
_SECRET_NAME = re.compile(r"secret|passw|token|credential|access_key|(^|_)key($|_)", re.I)
CREDENTIALS_HINT = (
    "credentials are not accepted in the configuration (it is stored with every flow run): "
    f"set {ENV_KEY} / {ENV_SECRET}, use an AWS profile (storage.profile) or the instance role"
)


def uri_has_credentials(uri: str) -> bool:
    """Whether ``uri`` carries user info (``scheme://user:password@host/...``)."""
    if not isinstance(uri, str) or "://" not in uri:
        return False
    return "@" in uri.split("://", 1)[1].split("/", 1)[0]


def find_credentials(value: Any, path: str = "", *, secret_keys: bool = False) -> list[str]:
    """Dotted paths inside ``value`` (nested mappings and lists) that hold credentials: a URI
    with user info anywhere, and, where ``secret_keys`` (free-form option mappings such as
    ``client_kwargs``), a key named like a secret. Values are never echoed."""
    found: list[str] = []
    if isinstance(value, str):
        if uri_has_credentials(value):
            found.append(f"{path or 'value'} (a URI with user info: user:password@)")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            sub = f"{path}.{key}" if path else str(key)
            if secret_keys and _SECRET_NAME.search(str(key)):
                found.append(sub)
                continue
            inner = secret_keys or key == "client_kwargs"
            found += find_credentials(item, sub, secret_keys=inner)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found += find_credentials(item, f"{path}[{i}]", secret_keys=secret_keys)
    return found


@dataclass(frozen=True)
class StorageConfig:
    """Where and how to reach object storage. ``repr`` never shows the secret.

    ``client_kwargs`` go to the botocore client (e.g. ``{"verify": False}``); ``endpoint_url``
    is merged into them. Do not set ``region_name`` for local S3 servers: bucket creation fails.
    Keep this out of flow parameters (those are stored by the Prefect server); build it from the
    environment inside tasks instead.
    """

    endpoint_url: str | None = None
    key: str | None = None
    secret: str | None = field(default=None, repr=False)
    anon: bool = False
    profile: str | None = None  # a profile of the AWS shared credentials file
    client_kwargs: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        found = find_credentials(dict(self.client_kwargs), "client_kwargs", secret_keys=True)
        if found:
            raise ValueError(f"{', '.join(found)}: {CREDENTIALS_HINT}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> StorageConfig:
        """From ``AWS_ENDPOINT_URL``/``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``; explicit
        ``overrides`` win."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {
            "endpoint_url": env.get(ENV_ENDPOINT) or None,
            "key": env.get(ENV_KEY) or None,
            "secret": env.get(ENV_SECRET) or None,
        }
        values.update(overrides)
        return cls(**values)

    def s3_options(self) -> dict[str, Any]:
        """Keyword arguments for ``s3fs.S3FileSystem`` (no listings cache: others write too)."""
        client = dict(self.client_kwargs)
        if self.endpoint_url:
            client["endpoint_url"] = self.endpoint_url
        opts: dict[str, Any] = {
            "use_listings_cache": False,
            "client_kwargs": client,
            # botocore retries a request once (a dropped connection); longer outages are
            # retried, within one time budget, by tasks.retry
            "config_kwargs": {"retries": {"mode": "standard", "total_max_attempts": 2}},
        }
        if self.anon:
            opts["anon"] = True
        elif self.profile and self.key is None:
            opts["profile"] = self.profile
        else:
            if self.key is not None:
                opts["key"] = self.key
            if self.secret is not None:
                opts["secret"] = self.secret
        return opts


def _resolve(storage: StorageConfig | None) -> StorageConfig:
    return storage if storage is not None else StorageConfig.from_env()


def scheme_of(uri: str) -> str:
    """``"s3"``, ``"file"`` (also for plain paths), or another fsspec protocol."""
    if "://" not in uri:
        return "file"
    return uri.split("://", 1)[0].lower()


def is_local(uri: str) -> bool:
    return scheme_of(uri) == "file"


def local_path(uri: str) -> Path:
    """Absolute local path of a plain path or ``file://`` URI."""
    if not is_local(uri):
        raise ValueError(f"{uri}: not a local path")
    raw = uri[len("file://") :] if uri.startswith("file://") else uri
    return Path(raw).expanduser().absolute()


def filesystem(uri: str, storage: StorageConfig | None = None) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it (``bucket/key`` for S3)."""
    scheme = scheme_of(uri)
    if scheme == "file":
        return LocalFileSystem(), str(local_path(uri))
    if scheme in ("s3", "s3a"):
        import s3fs

        fs = s3fs.S3FileSystem(**_resolve(storage).s3_options())
        return fs, uri.split("://", 1)[1].rstrip("/")
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def _uri_like(uri: str, path: str) -> str:
    """Render filesystem ``path`` in the style of ``uri`` (plain path, or ``scheme://``)."""
    if "://" not in uri:
        return path
    scheme = scheme_of(uri)
    if scheme == "file":
        return "file://" + path
    return f"{scheme}://{path.lstrip('/')}" if scheme in ("s3", "s3a") else f"{scheme}://{path}"


def join(uri: str, *parts: str) -> str:
    """Join ``parts`` onto ``uri`` with ``/``; parts may not escape with ``..``."""
    out = uri.rstrip("/") if uri.rstrip("/") else uri
    for part in parts:
        clean = part.strip("/")
        if not clean:
            continue
        if ".." in clean.split("/"):
            raise ValueError(f"join({uri!r}, ...): part {part!r} contains '..'")
        out = f"{out}/{clean}" if out else clean
    return out


def atomic_write_bytes(
    uri: str, data: bytes, storage: StorageConfig | None = None, *, durable: bool = True
) -> None:
    """Write ``data`` to ``uri`` so that no reader ever sees a partial object.

    ``durable=False`` skips the local fsync (the rename stays atomic): for files that are
    rebuilt on demand (the lot page's pictures: ``anomalydino report``), where a power cut may
    cost the file but never a record. Object stores are durable on write either way.
    """
    payload = bytes(data)
    if is_local(uri):
        target = local_path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(payload)
                fh.flush()
                if durable:
                    os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return
    fs, path = filesystem(uri, storage)
    try:
        fs.pipe_file(path, payload)
    except Exception as exc:
        raise OSError(f"{uri}: write of {len(payload)} bytes failed: {exc}") from exc


def copy_object(source: str, target: str, storage: StorageConfig | None = None) -> None:
    """Copy ``source`` to ``target`` so that no reader sees a partial object: one server-side
    copy on S3 (no data through this machine), else a read and an atomic write."""
    if scheme_of(source) in ("s3", "s3a") and scheme_of(target) == scheme_of(source):
        fs, src = filesystem(source, storage)
        _, dst = filesystem(target, storage)
        try:
            fs.copy(src, dst)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{source}: no such file or object") from exc
        except Exception as exc:
            raise OSError(f"copy {source} -> {target} failed: {exc}") from exc
        return
    atomic_write_bytes(target, read_bytes(source, storage), storage)


def read_bytes(uri: str, storage: StorageConfig | None = None) -> bytes:
    """The whole object at ``uri``; ``FileNotFoundError`` naming it if absent."""
    fs, path = filesystem(uri, storage)
    try:
        return fs.cat_file(path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{uri}: no such file or object") from exc
    except IsADirectoryError as exc:
        raise IsADirectoryError(f"{uri}: is a directory, not a file") from exc


def exists(uri: str, storage: StorageConfig | None = None) -> bool:
    """Whether a file/object (or a non-empty prefix) exists at ``uri``."""
    fs, path = filesystem(uri, storage)
    return bool(fs.exists(path))


@dataclass(frozen=True)
class Listing:
    """What ``scan_files`` found below a prefix.

    ``files``: sorted URIs safe to read (regular files, and symbolic links resolving inside the
    prefix or one of the allowed ``link_roots``). ``refused``: URI -> why it must not be read
    (a link pointing elsewhere, a broken link); callers report these as errors. ``dir_links``:
    links to folders (never followed) -> their target. ``skipped``: URI -> why it was left out
    (hidden names, e.g. temp files of unfinished atomic writes; FIFOs, sockets, devices, whose
    read would block or never end).
    """

    files: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    dir_links: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _inside(target: str, roots: Iterable[str]) -> bool:
    return any(os.path.commonpath([target, root]) == root for root in roots)


def _scan_local(prefix: str, base: Path, link_roots: Iterable[str], scope: str) -> Listing:
    """Walk ``base`` without following any link to a folder; classify every entry."""
    out = Listing()
    if base.is_file():
        out.files.append(prefix)
        return out
    roots = [os.path.realpath(base)] + [os.path.realpath(local_path(r)) for r in link_roots]
    stack = [str(base)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            uri = _uri_like(prefix, entry.path)
            if entry.is_symlink():
                target = os.path.realpath(entry.path)
                if os.path.isdir(target):
                    out.dir_links[uri] = target
                elif not _inside(target, roots):
                    out.refused[uri] = (
                        f"symbolic link points outside {scope} (to {target}); not read"
                    )
                elif not os.path.exists(target):
                    out.refused[uri] = f"broken symbolic link (to {target})"
                elif entry.name.startswith("."):
                    out.skipped[uri] = "hidden name"
                elif not os.path.isfile(target):
                    out.skipped[uri] = "link to something that is not a regular file"
                else:
                    out.files.append(uri)
            elif entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
            elif entry.name.startswith("."):
                out.skipped[uri] = "hidden name"
            elif entry.is_file(follow_symlinks=False):
                out.files.append(uri)
            else:
                out.skipped[uri] = "not a regular file (FIFO, socket or device)"
    out.files.sort()
    return out


def scan_files(
    prefix: str,
    storage: StorageConfig | None = None,
    *,
    link_roots: Iterable[str] = (),
    scope: str = "the listed folder",
) -> Listing:
    """Every file below ``prefix`` (recursive), classified (see ``Listing``). Locally a symbolic
    link is never followed out of ``prefix`` (the prefix itself may be a link) unless it
    resolves inside one of ``link_roots``; links to folders are not followed at all. ``scope``
    names the prefix in refusals ("the lot"). A missing prefix gives an empty listing."""
    if is_local(prefix):
        return _scan_local(prefix, local_path(prefix), link_roots, scope)
    fs, path = filesystem(prefix, storage)
    out = Listing()
    try:
        found = fs.find(path)
    except FileNotFoundError:
        return out
    for item in sorted(found):
        uri = _uri_like(prefix, item)
        if posixpath.basename(item).startswith("."):
            out.skipped[uri] = "hidden name"
        else:
            out.files.append(uri)
    return out


def list_files(
    prefix: str,
    suffixes: Iterable[str] | None = None,
    storage: StorageConfig | None = None,
) -> list[str]:
    """Sorted URIs of all files below ``prefix`` (recursive) ending in one of ``suffixes``
    (case-insensitive; all files when None): ``scan_files(...).files``, so hidden names,
    special files and links leading out of ``prefix`` are left out. A missing prefix gives an
    empty list."""
    wanted = tuple(s.lower() for s in suffixes) if suffixes is not None else None
    files = scan_files(prefix, storage).files
    return [u for u in files if wanted is None or u.rsplit("/", 1)[-1].lower().endswith(wanted)]


def list_dirs(prefix: str, storage: StorageConfig | None = None) -> list[str]:
    """Sorted names of the immediate sub-folders (prefixes) of ``prefix``; hidden names skipped.

    Local symbolic links to folders count as folders. A missing prefix gives an empty list.
    """
    if is_local(prefix):
        base = local_path(prefix)
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    fs, path = filesystem(prefix, storage)
    try:
        entries = fs.ls(path, detail=True, refresh=True)
    except FileNotFoundError:
        return []
    names = {
        posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "directory"
    }
    return sorted(n for n in names if n and not n.startswith("."))


def is_storage_error(exc: BaseException) -> bool:
    """True for transient storage failures worth a retry (connection errors, timeouts, S3 5xx
    and throttling, other I/O errors); False for permanent ones (missing object, permission
    denied, disk full, other S3 4xx) and bad input. The classification is
    ``tasks.retry.failure_class``."""
    return is_transient(exc)


def zarr_store(uri: str, storage: StorageConfig | None = None, read_only: bool = False) -> Any:
    """A zarr v3 store rooted at ``uri``: ``LocalStore`` locally, ``FsspecStore`` (async s3fs)
    for S3 and other fsspec schemes."""
    from zarr.storage import FsspecStore, LocalStore

    if is_local(uri):
        return LocalStore(local_path(uri), read_only=read_only)
    options = _resolve(storage).s3_options() if scheme_of(uri) in ("s3", "s3a") else {}
    return FsspecStore.from_url(uri, storage_options=options, read_only=read_only)
