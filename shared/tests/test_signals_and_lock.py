"""Stop signals whenever and however often they arrive, and one live run per output folder (toy_train.py)."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import time
from pathlib import Path

from conftest import toy_command

from biorecipes_shared.checkpoint import latest_checkpoint, verify_checkpoint
from biorecipes_shared.run import ConfigError, resolve_resume, run_cli


def start_toy(tmp_path, *extra):
    args = ["--output-dir", str(tmp_path), "--resume", *extra]
    return subprocess.Popen(toy_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_line(proc, wanted: str) -> None:
    for line in proc.stdout:
        if line.strip() == wanted:
            return
    raise AssertionError(f"the toy run ended before printing {wanted!r}: {proc.communicate()[1][-800:]}")


def test_a_sigterm_during_the_imports_is_a_clean_stop(tmp_path):
    proc = start_toy(tmp_path, "--steps", "50")
    time.sleep(0.3)  # the interpreter is still importing torch
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "received SIGTERM" in err
    assert "step 50" not in out  # it stopped at its first check, not after the whole run
    saved = latest_checkpoint(tmp_path / "checkpoints")  # None (stopped before a step) or a complete checkpoint
    if saved is not None:
        verify_checkpoint(saved, check_hashes=True)
    rerun = subprocess.run(toy_command(*start_toy_args(tmp_path, "50")), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "step 50" in rerun.stdout


def start_toy_args(tmp_path, steps: str) -> list[str]:
    return ["--output-dir", str(tmp_path), "--resume", "--steps", steps]


def test_a_sigterm_during_set_up_and_repeated_sigterms_during_the_save_all_exit_0(tmp_path):
    proc = start_toy(tmp_path, "--steps", "100000", "--setup-sleep", "1.0", "--save-sleep", "1.0", "--sleep", "0.05")
    wait_for_line(proc, "setting up")
    proc.send_signal(signal.SIGTERM)  # before the loop: the first check stops it
    wait_for_line(proc, "saving 1")
    for _ in range(3):  # the scheduler insists while the checkpoint is written
        time.sleep(0.25)
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    saved = latest_checkpoint(tmp_path / "checkpoints")
    assert saved is not None and saved.name == "step_00000001"
    verify_checkpoint(saved, check_hashes=True)
    assert err.count("received SIGTERM") == 1  # one notice, however many signals


def test_a_live_run_holds_its_folder_and_a_dead_one_does_not(tmp_path):
    first = start_toy(tmp_path, "--steps", "100000", "--sleep", "0.05")
    try:
        wait_for_line(first, "step 2")
        second = subprocess.run(
            toy_command(*start_toy_args(tmp_path, "3")), capture_output=True, text=True, timeout=300
        )
        assert second.returncode == 1
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert f"pid {first.pid} on {socket.gethostname()}" in lines[0] and str(tmp_path) in lines[0]
        assert not (tmp_path / "final_model").exists()
    finally:
        first.kill()  # SIGKILL: the kernel drops the lock with the process
        first.communicate(timeout=60)
    third = subprocess.run(toy_command(*start_toy_args(tmp_path, "3")), capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr
    assert (tmp_path / "final_model" / "model.safetensors").is_file()


def test_only_rank_0_reports_an_error_every_rank_raises(monkeypatch, capsys, tmp_path):
    def refuse():
        raise ConfigError("learning_rate must be positive")

    monkeypatch.setenv("RANK", "1")
    assert run_cli(refuse) == 1
    assert capsys.readouterr().err == ""
    assert run_cli(lambda: (_ for _ in ()).throw(FileNotFoundError(2, "No such file", "x.fa"))) == 1
    assert capsys.readouterr().err == "error (rank 1): x.fa: No such file\n"  # a rank's own problem is still said

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    assert run_cli(refuse) == 1
    assert capsys.readouterr().err == "error: learning_rate must be positive\n"
    assert json.loads(error_file.read_text())["message"]["message"] == "error: learning_rate must be positive"


def test_sigterm_every_50_ms_from_start_to_exit_still_exits_0(tmp_path):
    proc = start_toy(tmp_path, "--steps", "100000", "--sleep", "0.05")
    wait_until_sigterm_is_caught(proc.pid)  # the interpreter's own start-up (~30 ms) is the one unguarded window
    sent = 0
    while proc.poll() is None:  # imports, set-up, the loop, the save, the export and interpreter shutdown
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM if sent % 2 else signal.SIGUSR1)
        sent += 1
        time.sleep(0.05)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert sent > 10


def wait_until_sigterm_is_caught(pid: int) -> None:
    """Until the process has a handler for SIGTERM (Linux: the SigCgt mask in /proc/PID/status)."""
    for _ in range(2000):
        with contextlib.suppress(FileNotFoundError):
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
            if int(fields["SigCgt"].strip(), 16) & (1 << (signal.SIGTERM - 1)):
                return
        time.sleep(0.005)
    raise AssertionError("the toy run never installed its SIGTERM handler")


def test_a_refusal_under_torchrun_is_one_line_and_names_the_cause_in_torchruns_summary(tmp_path):
    result = subprocess.run(
        toy_command(*start_toy_args(tmp_path, "0"), nproc=2), capture_output=True, text=True, timeout=600
    )
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert ours == ["error: --steps=0 must be > 0"], result.stderr
    # torchrun's own failure report quotes the cause for every rank instead of pointing at a web page
    assert result.stderr.count("traceback : error: --steps=0") == 2, result.stderr[-1500:]
    assert "To enable traceback" not in result.stderr


def test_a_run_refused_during_set_up_leaves_no_folder_behind(tmp_path):
    output_dir = tmp_path / "runs" / "new"

    def refused_after_taking_the_folder():
        resolve_resume("auto", output_dir / "checkpoints")
        assert (output_dir / ".run.lock").is_file()
        raise ConfigError("the checkpoint was trained with another vocabulary")

    assert run_cli(refused_after_taking_the_folder) == 1
    assert not (tmp_path / "runs").exists()

    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "metrics.jsonl").write_text("{}\n")  # a folder with the user's files stays as it was

    def refused_in_an_existing_folder():
        resolve_resume("auto", tmp_path / "kept" / "checkpoints")
        raise ConfigError("no")

    assert run_cli(refused_in_an_existing_folder) == 1
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == [".run.lock", "metrics.jsonl"]
