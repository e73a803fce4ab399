"""Error types of the recipe: every user-facing failure raises one of these, and the CLIs print it as one line."""

from biorecipes_shared import run_cli as shared_run_cli


class OmniBioteError(Exception):
    """Base class: the command-line entry points catch it, print `error: <message>` and exit 1."""


class PreprocessError(OmniBioteError):
    """A malformed input file or record (GenBank, FASTA, record shards)."""


class DownloadError(OmniBioteError):
    """A file that could not be fetched completely and verified."""


class DataError(OmniBioteError):
    """Missing or inconsistent encoded token data under --base_dir."""


class ConfigError(OmniBioteError):
    """Flags that contradict each other or the data (batch arithmetic, ctx_len, ...)."""


def run_cli(main, argv=None) -> int:
    """Run a command-line `main(argv)` through the shared `run_cli`: a recipe error (or a file-system error) becomes
    one `error: ...` line on stderr and exit code 1."""
    return shared_run_cli(lambda: main(argv), user_errors=(OmniBioteError,))
