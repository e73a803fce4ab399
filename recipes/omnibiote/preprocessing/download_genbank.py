"""Download GenBank flat files (gb<division><n>.seq.gz) from an NCBI-style directory listing.

    python -m preprocessing.download_genbank --out_dir data/genbank --divisions vrl,phg --max-files 4

Files are taken division by division (in --divisions order, else alphabetically) and by file number within a
division (gbbct2 before gbbct10); --max-files caps each division. Each file is fetched into `<name>.part`; an
interrupted transfer is resumed with an HTTP Range request (also on the next run), dropped connections, timeouts
and HTTP 408/429/5xx answers are retried with exponential backoff, other HTTP errors (404, ...) stop the run at once,
and a file is renamed to its final name only after its size matches the server's and its gzip stream (CRC-32 and
length trailer) checks out, plus its MD5 when --md5_file lists it. Files already present are skipped. Without
--divisions, every division but `con` is fetched (`con` holds CONTIG records without sequence).
"""

import argparse
import gzip
import hashlib
import os
import re
import sys
import time
import zlib
from pathlib import Path
from urllib.parse import urljoin

import requests
import urllib3
from tqdm import tqdm

from errors import ConfigError, DownloadError, run_cli

DEFAULT_BASE_URL = "https://ftp.ncbi.nlm.nih.gov/genbank/"
FILE_LINK = re.compile(r'href="(gb([a-z]{3})\d+\.seq\.gz)"')
FILE_NUMBER = re.compile(r"(\d+)\.seq\.gz$")
# HTTP answers that usually pass with time, besides every 5xx (overload, maintenance, gateway): request
# timeout and rate limit. Other 4xx answers (404, 403, ...) will not change on a retry.
RETRYABLE_STATUS = frozenset({408, 429})
RETRYABLE = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.HTTPError,
)


class _RetryableFailure(Exception):
    """A transfer problem worth another attempt; restart=True when the part file is bad and must be refetched."""

    def __init__(self, message: str, restart: bool = False):
        super().__init__(message)
        self.restart = restart


def check_status(response: requests.Response, url: str) -> None:
    """Retry on a passing server problem (408, 429, 5xx); any other HTTP error is final."""
    status = response.status_code
    if status in RETRYABLE_STATUS or status >= 500:
        raise _RetryableFailure(f"HTTP {status} {response.reason or ''}".rstrip())
    if status >= 400:
        raise DownloadError(f"{url}: HTTP {status} {response.reason or ''}".rstrip())


def with_retries(attempt_once, what: str, retries: int, backoff: float, on_retry=None):
    """Call `attempt_once()` until it succeeds; retryable failures wait backoff·2^k s, others stop at once.

    The one retry loop of the downloader (listing and fetching). Hand-written rather than urllib3's Retry because
    a fetch must resume a half-written .part with a Range request and re-check gzip/MD5 between attempts.
    Raises DownloadError naming `what` after the last attempt, or at once for a non-retryable error."""
    for attempt in range(retries + 1):
        try:
            return attempt_once()
        except (*RETRYABLE, _RetryableFailure) as exc:
            if on_retry is not None:
                on_retry(exc)
            if attempt == retries:
                raise DownloadError(f"{what}: failed after {retries + 1} attempts: {exc}") from None
            time.sleep(backoff * 2**attempt)
        except requests.RequestException as exc:  # e.g. an invalid URL or too many redirects: retrying cannot help
            raise DownloadError(f"{what}: {exc}") from None
    raise AssertionError("unreachable")


def list_remote_files(
    session: requests.Session, base_url: str, timeout: float, retries: int = 5, backoff: float = 2.0
) -> list[tuple[str, str]]:
    """(file name, division) of every gb*.seq.gz linked from the directory page at base_url."""

    def list_once() -> list[tuple[str, str]]:
        response = session.get(base_url, timeout=timeout)
        check_status(response, base_url)
        return sorted(set(FILE_LINK.findall(response.text)))

    return with_retries(list_once, f"{base_url}: listing files", retries, backoff)


def select_files(files: list[tuple[str, str]], divisions: list[str] | None, max_files: int | None) -> list[str]:
    """Names in the chosen divisions (all but 'con' when None), at most max_files per division (None: all),
    division by division and in numeric file order within each (gbbct2 before gbbct10)."""
    by_division: dict[str, list[str]] = {}
    for name, division in files:
        by_division.setdefault(division, []).append(name)
    chosen = dict.fromkeys(divisions) if divisions else sorted(d for d in by_division if d != "con")
    names = []
    for division in chosen:
        in_order = sorted(by_division.get(division, []), key=lambda name: int(FILE_NUMBER.search(name).group(1)))
        names.extend(in_order if max_files is None else in_order[:max_files])
    return names


def verify_gzip(path: Path) -> None:
    """Read the whole gzip stream: a corrupt or cut file fails its CRC-32/length check."""
    try:
        with gzip.open(path, "rb") as handle:
            while handle.read(1 << 20):
                pass
    except (OSError, EOFError, zlib.error) as exc:
        raise _RetryableFailure(f"gzip check failed ({exc})", restart=True) from None


def file_md5(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "md5").hexdigest()


def _transfer(session, url: str, part: Path, timeout: float, progress: bool) -> None:
    """One attempt: continue `part` from its current size (Range request) up to the server's full size."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with session.get(url, headers=headers, stream=True, timeout=timeout) as response:
        if response.status_code == 416:  # our part file is not shorter than the server's file
            raise _RetryableFailure("partial file not shorter than the remote file", restart=True)
        check_status(response, url)
        if response.status_code == 206:
            content_range = response.headers.get("Content-Range", "")
            match = re.match(r"bytes (\d+)-\d+/(\d+)", content_range)
            if not match or int(match.group(1)) != offset:
                raise DownloadError(f"{url}: server answered the range request with '{content_range}'")
            total, mode = int(match.group(2)), "ab"
        else:  # the server ignored the Range header: start again
            length = response.headers.get("Content-Length")
            total, mode, offset = (int(length) if length else None), "wb", 0
        with (
            open(part, mode) as out,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                desc=part.name[: -len(".part")],
                disable=not progress,
            ) as bar,
        ):
            # read1 hands over bytes as they arrive, so a dropped connection loses nothing already received
            # (iter_content buffers a whole chunk and discards it on error); raw bytes: no Content-Encoding decoding
            while chunk := response.raw.read1(1 << 20, decode_content=False):
                out.write(chunk)
                bar.update(len(chunk))
    if total is not None and part.stat().st_size != total:
        raise _RetryableFailure(f"got {part.stat().st_size} of {total} bytes")


def download_file(
    session,
    url: str,
    dest: Path,
    retries: int = 5,
    backoff: float = 2.0,
    timeout: float = 60.0,
    expected_md5: str | None = None,
    progress: bool = True,
) -> Path:
    """Fetch url to dest with resume, retries and checks; returns dest. Raises DownloadError when all tries fail."""
    part = dest.with_name(dest.name + ".part")

    def fetch_once() -> Path:
        _transfer(session, url, part, timeout, progress)
        verify_gzip(part)
        if expected_md5 and file_md5(part) != expected_md5:
            raise _RetryableFailure("MD5 mismatch", restart=True)
        os.replace(part, dest)
        return dest

    def forget_bad_file(exc: Exception) -> None:
        if getattr(exc, "restart", False) and part.exists():
            part.unlink()  # a complete but bad file cannot be resumed: start over
        # otherwise a .part with good bytes stays: the next attempt (or run) continues it with a Range request

    return with_retries(fetch_once, url, retries, backoff, on_retry=forget_bad_file)


def read_md5_file(path: str | Path) -> dict[str, str]:
    """`md5  filename` lines (md5sum output) -> {filename: md5}."""
    sums = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.strip().lstrip("*")] = digest.lower()
    return sums


def download_genbank(
    base_url: str,
    out_dir: str | Path,
    divisions: list[str] | None = None,
    max_files: int | None = None,
    retries: int = 5,
    backoff: float = 2.0,
    timeout: float = 60.0,
    md5_file: str | None = None,
    progress: bool = True,
) -> list[Path]:
    """Download the selected GenBank files into out_dir; returns their paths (downloaded or already present)."""
    if max_files is not None and max_files < 1:  # 0 must not silently mean "all"; None does
        raise ConfigError(f"--max-files must be at least 1, got {max_files} (leave it out for all files)")
    if retries < 0 or backoff < 0 or timeout <= 0:
        raise ConfigError("--retries and --backoff must be >= 0 and --timeout > 0")
    base_url = base_url if base_url.endswith("/") else base_url + "/"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checksums = read_md5_file(md5_file) if md5_file else {}
    with requests.Session() as session:
        files = list_remote_files(session, base_url, timeout, retries, backoff)
        names = select_files(files, divisions, max_files)
        # a mistyped division among good ones would otherwise be skipped without a word
        missing = [d for d in divisions or [] if d not in {division for _, division in files}]
        if missing or not names:
            raise DownloadError(f"{base_url}: no gb*.seq.gz files for divisions {missing or divisions or 'any'}")
        paths = []
        for name in names:
            dest = out_dir / name
            if not dest.exists():
                download_file(
                    session, urljoin(base_url, name), dest, retries, backoff, timeout, checksums.get(name), progress
                )
            paths.append(dest)
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base_url", default=DEFAULT_BASE_URL, help="directory listing with the gb*.seq.gz files")
    parser.add_argument("--out_dir", required=True)
    parser.add_argument(
        "--divisions", default=None, help="comma-separated divisions, e.g. vrl,phg,bct (default: all but con)"
    )
    parser.add_argument(
        "--max-files",
        "--max_files",
        dest="max_files",
        type=int,
        default=None,
        help="at most this many files per division, lowest numbers first (default: all)",
    )
    parser.add_argument("--retries", type=int, default=5)
    parser.add_argument("--backoff", type=float, default=2.0, help="seconds before the first retry; doubles each time")
    parser.add_argument("--timeout", type=float, default=60.0, help="connect/read timeout in seconds")
    parser.add_argument("--md5_file", default=None, help="optional md5sum-style list to check files against")
    args = parser.parse_args(argv)
    divisions = [d.strip() for d in args.divisions.split(",")] if args.divisions else None
    paths = download_genbank(
        args.base_url,
        args.out_dir,
        divisions,
        args.max_files,
        args.retries,
        args.backoff,
        args.timeout,
        args.md5_file,
        progress=sys.stderr.isatty(),
    )
    print(f"{len(paths)} file(s) in {args.out_dir}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
