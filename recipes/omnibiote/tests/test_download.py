"""GenBank downloader against a loopback HTTP server: listing, filters, Range resume after a dropped connection,
retries (also on HTTP 408/429/5xx), and the size / gzip checks. The server binds 127.0.0.1 on a free port and is
shut down after each test."""

import gzip
import http.server
import itertools
import random
import re
import subprocess
import sys
import threading

import pytest

from errors import DownloadError, run_cli
from preprocessing.download_genbank import download_genbank, main, select_files

random.seed(0)
CONTENT = {
    name: gzip.compress(("LOCUS " + "".join(random.choices("ACGT", k=150_000)) + "\n//\n").encode(), mtime=0)
    for name in ("gbvrl1.seq.gz", "gbvrl2.seq.gz", "gbphg1.seq.gz", "gbbct1.seq.gz", "gbcon1.seq.gz")
}


class FixtureServer(http.server.ThreadingHTTPServer):
    """Serves CONTENT; `drop_first` names files whose first transfer stops half-way; `corrupt` names files served
    with a flipped byte (right size, bad gzip CRC); `fail` maps a name ("" for the listing) to the HTTP error
    statuses it answers before it is served normally (an iterator, e.g. itertools.repeat(503) for always)."""

    def __init__(self, drop_first=(), corrupt=(), honour_range=True, fail=None):
        super().__init__(("127.0.0.1", 0), FixtureHandler)
        self.drop_first, self.corrupt, self.honour_range = set(drop_first), set(corrupt), honour_range
        self.fail = {name: iter(statuses) for name, statuses in (fail or {}).items()}
        self.requests: list[tuple[str, str | None]] = []


class FixtureHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output quiet
        pass

    def do_GET(self):
        server = self.server
        name = self.path.strip("/")
        server.requests.append((name, self.headers.get("Range")))
        status = next(server.fail.get(name, iter(())), None)
        if status is not None:
            self._send(status, b"try again later" if status != 404 else b"not found", {})
            return
        if name == "":
            body = "".join(f'<a href="{n}">{n}</a>\n' for n in CONTENT) + '<a href="README.genbank">x</a>'
            self._send(200, body.encode(), {"Content-Type": "text/html"})
            return
        if name not in CONTENT:
            self._send(404, b"not found", {})
            return
        data = CONTENT[name]
        if name in server.corrupt:
            data = data[:5000] + bytes([data[5000] ^ 0xFF]) + data[5001:]
        start = 0
        match = re.match(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and server.honour_range:
            start = int(match.group(1))
            headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
            status = 206
        else:
            headers, status = {}, 200
        body = data[start:]
        if name in server.drop_first:
            server.drop_first.discard(name)
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True  # the client sees the connection end before Content-Length bytes
            return
        self._send(status, body, headers)

    def _send(self, status, body, headers):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def serve():
    servers = []

    def start(**kwargs):
        server = FixtureServer(**kwargs)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server, f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


FAST = dict(retries=3, backoff=0.01, timeout=10, progress=False)


def test_divisions_and_max_files_filter(serve, tmp_path):
    _, url = serve()
    paths = download_genbank(url, tmp_path, divisions=["vrl", "phg"], max_files=2, **FAST)
    assert [p.name for p in paths] == ["gbvrl1.seq.gz", "gbvrl2.seq.gz", "gbphg1.seq.gz"]  # 2 per division
    for path in paths:
        assert path.read_bytes() == CONTENT[path.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)  # no .part left
    paths = download_genbank(url, tmp_path / "one", divisions=["vrl", "phg", "bct"], max_files=1, **FAST)
    assert [p.name for p in paths] == ["gbvrl1.seq.gz", "gbphg1.seq.gz", "gbbct1.seq.gz"]  # --divisions order


def test_default_divisions_skip_con(serve, tmp_path):
    _, url = serve()
    paths = download_genbank(url, tmp_path, max_files=1, **FAST)
    assert [p.name for p in paths] == ["gbbct1.seq.gz", "gbphg1.seq.gz", "gbvrl1.seq.gz"]  # sorted, no gbcon1


def test_files_are_in_numeric_order_and_max_files_is_per_division():
    listing = [(f"gb{division}{n}.seq.gz", division) for division in ("bct", "phg", "vrl") for n in range(1, 121)]
    names = select_files(sorted(listing), ["vrl", "phg", "bct"], 20)
    assert names[:3] == ["gbvrl1.seq.gz", "gbvrl2.seq.gz", "gbvrl3.seq.gz"]  # not gbvrl1, gbvrl10, gbvrl100
    assert names[19:21] == ["gbvrl20.seq.gz", "gbphg1.seq.gz"] and names[-1] == "gbbct20.seq.gz"
    assert len(names) == 60 and len(select_files(sorted(listing), ["bct"], None)) == 120


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max-files", "0"], "--max-files must be at least 1"),
        (["--divisions", "vrl,phq"], "no gb*.seq.gz files for divisions ['phq']"),
    ],
)
def test_bad_selection_is_a_one_line_error(serve, tmp_path, capsys, extra, message):
    _, url = serve()
    assert run_cli(main, ["--base_url", url, "--out_dir", str(tmp_path / "out"), *extra]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("status", [503, 500, 429, 408])
def test_passing_http_errors_are_retried(serve, tmp_path, status):
    server, url = serve(fail={"": [status], "gbvrl2.seq.gz": [status, status]})
    paths = download_genbank(url, tmp_path, divisions=["vrl"], **FAST)
    assert [p.read_bytes() for p in paths] == [CONTENT["gbvrl1.seq.gz"], CONTENT["gbvrl2.seq.gz"]]
    assert [name for name, _ in server.requests].count("gbvrl2.seq.gz") == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gbvrl1.seq.gz", "gbvrl2.seq.gz"]


def test_http_503_to_the_end_is_a_one_line_error_without_a_file(serve, tmp_path, recipe_dir):
    server, url = serve(fail={"gbphg1.seq.gz": itertools.repeat(503)})
    out_dir = tmp_path / "out"
    args = ["--base_url", url, "--out_dir", str(out_dir), "--divisions", "phg", "--retries", "2", "--backoff", "0.01"]
    result = subprocess.run(
        [sys.executable, "-m", "preprocessing.download_genbank", *args], cwd=recipe_dir, capture_output=True, text=True
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {url}gbphg1.seq.gz: failed after 3 attempts: HTTP 503 Service Unavailable"
    ]
    assert [name for name, _ in server.requests].count("gbphg1.seq.gz") == 3
    assert list(out_dir.iterdir()) == []  # nothing received: no file, no .part


def test_404_is_an_immediate_error(serve, tmp_path):
    server, url = serve(fail={"gbphg1.seq.gz": itertools.repeat(404)})
    with pytest.raises(DownloadError, match=r"gbphg1.seq.gz: HTTP 404 Not Found$"):
        download_genbank(url, tmp_path, divisions=["phg"], **FAST)
    assert [name for name, _ in server.requests].count("gbphg1.seq.gz") == 1  # no retries
    assert list(tmp_path.iterdir()) == []


def test_dropped_connection_is_resumed_with_a_range_request(serve, tmp_path):
    server, url = serve(drop_first={"gbvrl1.seq.gz"})
    (path,) = download_genbank(url, tmp_path, divisions=["vrl"], max_files=1, **FAST)
    assert path.read_bytes() == CONTENT["gbvrl1.seq.gz"]
    ranges = [rng for name, rng in server.requests if name == "gbvrl1.seq.gz"]
    assert ranges[0] is None and len(ranges) == 2
    assert ranges[1] == f"bytes={len(CONTENT['gbvrl1.seq.gz']) // 2}-"  # continued where the drop happened


def test_partial_file_from_an_earlier_run_is_continued(serve, tmp_path):
    server, url = serve()
    data = CONTENT["gbbct1.seq.gz"]
    (tmp_path / "gbbct1.seq.gz.part").write_bytes(data[:12345])
    (path,) = download_genbank(url, tmp_path, divisions=["bct"], **FAST)
    assert path.read_bytes() == data
    assert ("gbbct1.seq.gz", "bytes=12345-") in server.requests


def test_server_without_range_support_restarts_the_file(serve, tmp_path):
    _, url = serve(drop_first={"gbphg1.seq.gz"}, honour_range=False)
    (path,) = download_genbank(url, tmp_path, divisions=["phg"], **FAST)
    assert path.read_bytes() == CONTENT["gbphg1.seq.gz"]


def test_corrupt_file_fails_after_retries_and_is_not_kept(serve, tmp_path):
    server, url = serve(corrupt={"gbvrl2.seq.gz"})
    with pytest.raises(DownloadError, match="gbvrl2.seq.gz: failed after 2 attempts: gzip check failed"):
        download_genbank(url, tmp_path, divisions=["vrl"], **dict(FAST, retries=1))
    assert (tmp_path / "gbvrl1.seq.gz").read_bytes() == CONTENT["gbvrl1.seq.gz"]
    assert not (tmp_path / "gbvrl2.seq.gz").exists()
    assert len([1 for name, _ in server.requests if name == "gbvrl2.seq.gz"]) == 2


def test_md5_mismatch_is_an_error(serve, tmp_path):
    _, url = serve()
    sums = tmp_path / "sums.md5"
    sums.write_text("0" * 32 + "  gbphg1.seq.gz\n")
    with pytest.raises(DownloadError, match="MD5 mismatch"):
        download_genbank(url, tmp_path / "out", divisions=["phg"], md5_file=str(sums), **dict(FAST, retries=0))


def test_existing_files_are_skipped_and_cli_errors_are_one_line(serve, tmp_path, capsys):
    server, url = serve()
    (tmp_path / "gbphg1.seq.gz").write_bytes(b"the user's own file")
    download_genbank(url, tmp_path, divisions=["phg"], **FAST)
    assert (tmp_path / "gbphg1.seq.gz").read_bytes() == b"the user's own file"
    assert not any(name == "gbphg1.seq.gz" for name, _ in server.requests)
    assert run_cli(main, ["--base_url", url, "--out_dir", str(tmp_path), "--divisions", "xyz"]) == 1
    assert capsys.readouterr().err.strip() == f"error: {url}: no gb*.seq.gz files for divisions ['xyz']"
    assert run_cli(main, ["--base_url", url + "missing/", "--out_dir", str(tmp_path), "--retries", "0"]) == 1
