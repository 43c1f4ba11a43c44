"""Errors a user can act on. The CLI prints their message and exits with status 2 (1 for a
StorageError: the input was fine, the store could not take the results)."""

import errno
import re


class RaymetaError(Exception):
    """Base class: bad input that the user can fix; the message names the problem and the fix."""


class ConfigError(RaymetaError):
    """A config, sweep file or command-line value is invalid."""


class DataError(RaymetaError):
    """A dataset or label file is missing, truncated or inconsistent."""


class DatasetNotFoundError(DataError):
    """The files of a dataset are not where the config says."""


class StorageError(RaymetaError):
    """Writing to the results store or a checkpoint failed for a reason a retry cannot fix
    (disk full, quota, permissions, read-only filesystem): the trial ends at once (it is not
    retried like a lost worker) and a sweep stops; the CLI exits with status 1. `store`: the
    store in its display form (no credentials); `unwritten`: (sweep, trial id, error) of each
    trial whose failed row could not be written, so the driver can still list it."""

    def __init__(self, message: str, store: str = "",
                 unwritten: tuple[tuple[str, str, str], ...] = ()):
        super().__init__(message)
        self.store = store
        self.unwritten = tuple(tuple(u) for u in unwritten)

    def __reduce__(self):  # Ray pickles a trial's exception to the driver
        return type(self), (str(self), self.store, self.unwritten)


STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS})
"""errnos of a write that fails the same way on a retry"""

_STORAGE_TEXT = re.compile(r"No space left on device|Disk quota exceeded|Permission denied|"
                           r"Read-only file system|ACCESS_DENIED|AccessDenied|\[errno (?:%s)\]"
                           % "|".join(str(e) for e in sorted(STORAGE_ERRNOS)))


def is_storage_failure(err: BaseException) -> bool:
    """A write error no retry can fix: ENOSPC, EDQUOT, EACCES/EPERM, EROFS (as an errno, or in
    the message of pyarrow's errors, which do not always carry the errno), or an object
    store's access denied."""
    if isinstance(err, StorageError):
        return True
    if isinstance(err, OSError) and err.errno in STORAGE_ERRNOS:
        return True
    return isinstance(err, OSError) and bool(_STORAGE_TEXT.search(str(err)))


def did_you_mean(word: str, choices) -> str:
    """' (did you mean 'x'?)' for the closest of `choices`, or ''."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
