"""`make gpu-check`: install the carried wheels, measure the bf16 matmul peak, run each recipe's checks in its own
process (recipe folder as cwd: several recipes have a `model.py`), print one row per check and write
OUT/results.json + OUT/results.md (and a junit XML with --junit). Exit status 1 when any check failed.

    python ci/gpu_check/run.py --device cuda --out gpu_check_out     # on the GPU machine, after make gpu-wheels
    python ci/gpu_check/run.py --device cpu --out /tmp/dry            # the CPU dry run (tiny sizes, FP8 skipped)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

CI_DIR = Path(__file__).resolve().parents[1]
ROOT = CI_DIR.parent
sys.path.insert(0, str(CI_DIR))

from gpu_check.report import write_reports  # noqa: E402
from gpu_check.sizes import CHECKS, FAESM_SITE_VARIABLE, RECIPES, SIZES, TOTAL_BUDGET_S  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", type=Path, default=ROOT / "gpu_check_out")
    parser.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="wheels from make gpu-wheels")
    parser.add_argument("--site", type=Path, default=ROOT / ".gpu_site", help="pip --target folder for the wheels")
    parser.add_argument("--only", default=",".join(RECIPES), help="comma-separated recipes (default: all)")
    parser.add_argument("--junit", type=Path, default=None, help="also write a junit XML (one testcase per row)")
    args = parser.parse_args(argv)
    args.only = [name for name in args.only.split(",") if name]
    unknown = sorted(set(args.only) - set(RECIPES))
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}; known: {', '.join(RECIPES)}")
    return args


def install_wheels(wheels: Path, site: Path) -> str:
    """pip install --no-index --no-deps --target site wheels/*.whl; returns a one-line account.

    Without pip on the machine, the wheels are unpacked into `site` instead (a wheel is a zip of the installed tree)."""
    files = sorted(wheels.glob("*.whl"))
    if not files:
        return f"no wheels in {wheels} (run make gpu-wheels on a networked machine): using the image's packages only"
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--upgrade"]
    result = subprocess.run([*command, "--target", str(site), *map(str, files)], capture_output=True, text=True)
    if result.returncode == 0:
        return f"installed {len(files)} wheels from {wheels} into {site}"
    if "No module named pip" not in result.stderr:
        raise SystemExit(f"error: pip install of {wheels}/*.whl failed: {result.stderr.strip().splitlines()[-1]}")
    for wheel in files:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)
    return f"unpacked {len(files)} wheels from {wheels} into {site} (no pip here)"


def child_env(device: str, site: Path | None) -> dict[str, str]:
    """PYTHONPATH: carried wheels first (they must win over the image's conflicting versions), ci/, shared/."""
    env = dict(os.environ)
    paths = [str(site)] if site else []
    paths += [str(CI_DIR), str(ROOT / "shared"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run takes the CPU paths even on a GPU machine
    return env


def measure_peak(device: str, env: dict[str, str], out: Path) -> dict:
    size = SIZES[device]["peak"]
    command = [sys.executable, "-m", "gpu_check.peak", "--device", device, "--n", str(size["n"])]
    result = subprocess.run(
        [*command, "--repeats", str(size["repeats"])], env=env, capture_output=True, text=True, timeout=120
    )
    (out / "peak.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        return {"peak_tflops": float("nan"), "error": lines[-1] if lines else f"exit {result.returncode}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_recipe(recipe: str, args, env: dict[str, str], peak: float, timeout: float) -> list[dict]:
    """One recipe's check process; rows it did not finish become FAIL rows naming why."""
    out = args.out / recipe
    shutil.rmtree(out, ignore_errors=True)  # nothing of an earlier run may pass for this one's
    out.mkdir(parents=True)
    rows_path = out / "rows.json"
    command = [sys.executable, "-m", f"gpu_check.check_{recipe}", "--device", args.device, "--out", str(out)]
    command += ["--peak-tflops", str(peak)]
    timed_out = threading.Event()
    with open(out / "process.log", "w") as log:
        process = subprocess.Popen(
            command,
            cwd=ROOT / "recipes" / recipe,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group: the budget kill also ends the training runs it started
        )

        def kill() -> None:
            timed_out.set()
            os.killpg(process.pid, signal.SIGKILL)

        watchdog = threading.Timer(timeout, kill)
        watchdog.start()
        for line in process.stdout:  # echo the row lines; everything goes to the log
            log.write(line)
            if line.startswith(f"[{recipe}]"):
                print(line, end="", flush=True)
        process.wait()
        watchdog.cancel()
    reason = f"killed at the recipe budget of {timeout:.0f} s" if timed_out.is_set() else None
    if reason is None and process.returncode != 0:
        lines = [line for line in (out / "process.log").read_text(errors="replace").splitlines() if line.strip()]
        reason = f"check process exited {process.returncode}: {lines[-1] if lines else 'no output'}"
    rows = json.loads(rows_path.read_text()) if rows_path.is_file() else []
    done = {row["check"] for row in rows}
    for check in CHECKS[recipe]:
        if check not in done:
            rows.append({"recipe": recipe, "check": check, "status": "FAIL", "summary": reason or "not run"})
    return rows


def environment(args, peak: dict, install_note: str) -> dict:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {
        "device": args.device,
        "device_name": peak.get("device"),
        "torch": peak.get("torch"),
        "python": platform.python_version(),
        "host": platform.node(),
        "git_commit": commit or "unknown",
        "peak_tflops_bf16": peak.get("peak_tflops"),
        "peak_matmul_n": peak.get("n"),
        "wheels": install_note,
        "sizes": {recipe: SIZES[args.device][recipe] for recipe in args.only},
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    site = None
    install_note = "not installed (CPU dry run uses the current environment)"
    faesm_site = args.site.with_name(args.site.name + "_faesm")
    if args.device == "cuda":
        install_note = install_wheels(args.wheels, args.site)
        site = args.site if args.site.is_dir() else None
        # esm2_fa's faesm row: transformers 4.53 in a site of its own, put first for that row's process only
        install_note += "; faesm row: " + install_wheels(args.wheels / "faesm", faesm_site)
    print(install_note, flush=True)
    env = child_env(args.device, site)
    if args.device == "cuda" and faesm_site.is_dir():
        env[FAESM_SITE_VARIABLE] = str(faesm_site)
    peak = measure_peak(args.device, env, args.out)
    print(f"bf16 matmul peak: {peak.get('peak_tflops', float('nan')):.4g} TFLOP/s on {peak.get('device')}", flush=True)
    rows, total = [], TOTAL_BUDGET_S[args.device]
    for recipe in args.only:
        remaining = total - (time.perf_counter() - start)
        timeout = max(10.0, min(SIZES[args.device][recipe]["budget_s"], remaining))
        rows += run_recipe(recipe, args, env, peak.get("peak_tflops", float("nan")), timeout)
    meta = environment(args, peak, install_note)
    meta["wall_s"] = round(time.perf_counter() - start, 1)
    table = write_reports(args.out, rows, meta, args.junit)
    print(table)
    print(f"results: {args.out / 'results.json'}, {args.out / 'results.md'} ({meta['wall_s']} s)")
    return 1 if any(row["status"] == "FAIL" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
