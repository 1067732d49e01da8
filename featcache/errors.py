"""User-facing errors: each message is one line that names the file, option or class at fault."""


class FeatcacheError(Exception):
    """An error caused by the user's input or environment; the CLI prints it without a traceback."""


class CorruptEntryError(FeatcacheError):
    """A cache entry whose manifest, shard or checksum does not match what was written."""


class UnknownFormatError(FeatcacheError):
    """A cache entry written with a format_version this reader does not know."""
