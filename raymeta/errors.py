"""Errors a user can act on. The CLI prints their message and exits with status 2."""


class RaymetaError(Exception):
    """Base class: bad input that the user can fix; the message names the problem and the fix."""


class ConfigError(RaymetaError):
    """A config, sweep file or command-line value is invalid."""


class DataError(RaymetaError):
    """A dataset or label file is missing, truncated or inconsistent."""


class DatasetNotFoundError(DataError):
    """The files of a dataset are not where the config says."""
