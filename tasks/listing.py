"""The images of a lot or reference set: which files become report rows, and the log lines that
name every file left out.

Every file with an image suffix becomes a row: readable files are read; symbolic links that
point outside the folder (and outside ``storage.link_roots``) or nowhere are error rows whose
reason says so, and are never read. Everything else is named in the log: files without an image
suffix, hidden names, special files (FIFOs, sockets, devices), links to folders (not followed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from tasks.layout import IMAGE_SUFFIXES
from tasks.storage import scan_files


@dataclass(frozen=True)
class ImageListing:
    """``uris``: sorted URIs of every row; ``refused``: URI -> why it is an error row unread."""

    uris: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)


def _is_image(uri: str) -> bool:
    return uri.rsplit("/", 1)[-1].lower().endswith(IMAGE_SUFFIXES)


def list_image_files(
    prefix: str, storage_settings, log: logging.Logger | logging.LoggerAdapter, scope: str
) -> ImageListing:
    """The listing of ``prefix`` (``storage_settings``: ``flows.config.StorageSettings``),
    logging each file left out by name (``scope`` names the folder: "the lot")."""
    found = scan_files(
        prefix,
        storage_settings.storage_config(),
        link_roots=getattr(storage_settings, "link_roots", ()),
        scope=scope,
    )
    images = [u for u in found.files if _is_image(u)]
    refused = {u: why for u, why in found.refused.items() if _is_image(u)}
    ignored = {u: f"no image suffix {'/'.join(IMAGE_SUFFIXES)}" for u in found.files}
    ignored = {u: why for u, why in ignored.items() if not _is_image(u)}
    ignored |= {u: why for u, why in found.refused.items() if u not in refused}
    ignored |= found.skipped
    for uri, why in sorted(ignored.items()):
        log.info("%s: ignored (%s)", uri, why)
    for uri, target in sorted(found.dir_links.items()):
        log.warning(
            "%s: symbolic link to a folder (%s), not followed: its files are not listed",
            uri,
            target,
        )
    for uri, why in sorted(refused.items()):
        log.warning("%s: error row: %s", uri, why)
    if ignored or found.dir_links:
        log.info(
            "%s: %d image(s), %d file(s) ignored, %d folder link(s) not followed",
            prefix,
            len(images) + len(refused),
            len(ignored),
            len(found.dir_links),
        )
    return ImageListing(sorted(images + list(refused)), refused)
