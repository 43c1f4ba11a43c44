"""Errors a user can act on. The CLI prints their message and exits with status 2."""


class RaymetaError(Exception):
    """Base class: bad input that the user can fix; the message names the problem and the fix."""


class ConfigError(RaymetaError):
    """A config, sweep file or command-line value is invalid."""


class DataError(RaymetaError):
    """A dataset or label file is missing, truncated or inconsistent."""


class DatasetNotFoundError(DataError):
    """The files of a dataset are not where the config says."""


def did_you_mean(word: str, choices) -> str:
    """' (did you mean 'x'?)' for the closest of `choices`, or ''."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
