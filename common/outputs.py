"""Where a command may write: into an empty or new folder, or one holding only what the same command wrote
before; never over someone else's files unless told to (--force)."""

from __future__ import annotations

from collections.abc import Callable

from common import store
from common.errors import BadInput


def claim_folder(
    url: str,
    *,
    ours: Callable[[str], bool],
    what: str,
    force: bool = False,
    remedy: str = "choose an empty folder, or pass --force to write over them",
) -> None:
    """Raise a BadInput unless `what` may write into the folder `url`: it does not exist, is empty, holds only
    files `ours` recognises (by name), or `force` is set. A file where the folder should be is always refused.
    `remedy`: what the message tells the user to do."""
    fs, path = store.fs_and_path(url)
    if fs.isfile(path):
        raise BadInput(f"{url} is a file; {what} writes a folder there")
    foreign = [n for n in store.listdir(url) if not ours(n) and not store.is_temporary(n)]
    if foreign and not force:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise BadInput(f"{url} holds files that are not {what}'s ({shown}): {remedy}")
