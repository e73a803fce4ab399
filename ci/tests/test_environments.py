"""The two virtual environments and the faesm test job: what setup_venv.sh installs, in which order, under which pins,
and that run_tests.sh fails when the faesm tests fail, skip or are missing.

Both scripts run in a small copy of the repo (ci/ plus stand-in recipes), so these tests depend on neither the real
requirement files nor the network: setup_venv.sh runs against a stand-in `python` that records each pip command."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Records its arguments; for `-c FILE` also the constraints (setup_venv.sh deletes that temp file when it exits).
FAKE_PYTHON = """#!/bin/sh
echo "$*" >> "$PIP_LOG"
prev=""
for arg in "$@"; do [ "$prev" = "-c" ] && cat "$arg" > "$PIP_LOG.constraints"; prev=$arg; done
[ "$3" = show ] && exit "$FAESM_SHOWN"
exit 0
"""


@pytest.fixture
def setup_repo(tmp_path):
    repo = tmp_path / "repo"
    (repo / "ci").mkdir(parents=True)
    for name in ("setup_venv.sh", "constraints.txt"):
        shutil.copy(ROOT / "ci" / name, repo / "ci" / name)
    (repo / "shared").mkdir()
    files = {
        "esm2_fa/requirements.txt": "transformers==5.25.0\n",
        "esm2_fa/requirements-faesm.txt": "transformers==4.53.3\n",
        "esm2_fa/requirements-faesm-nodeps.txt": "faesm==0.1.1\n",
        "omnibiote/requirements.txt": "PyYAML==6.0.4\n",
        "omnibiote/requirements-nodeps.txt": "mup==1.0.0\n",
    }
    for path, text in files.items():
        (repo / "recipes" / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / "recipes" / path).write_text(text)
    return repo


def run_setup(repo, profile, faesm_installed=False):
    """setup_venv.sh with a stand-in python; returns (result, pip commands, constraints of the last -c)."""
    venv = repo / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    (venv / "bin" / "python").write_text(FAKE_PYTHON)
    (venv / "bin" / "python").chmod(0o755)
    log = repo / "pip.log"
    env = {**os.environ, "PIP_LOG": str(log), "TORCH_VERSION": "9.9.9", "FAESM_SHOWN": "0" if faesm_installed else "1"}
    result = subprocess.run(
        ["bash", str(repo / "ci" / "setup_venv.sh"), str(venv), *profile], capture_output=True, text=True, env=env
    )
    commands = log.read_text().splitlines() if log.is_file() else []
    constraints = Path(f"{log}.constraints")
    return result, commands, constraints.read_text() if constraints.is_file() else ""


def installs(commands):
    prefix = "-m pip install --disable-pip-version-check --no-compile -q "
    return [line.removeprefix(prefix) for line in commands if line.startswith(prefix)]


def test_faesm_env_pins_torch_then_installs_only_the_faesm_backend(setup_repo):
    result, commands, constraints = run_setup(setup_repo, ["faesm"])
    assert result.returncode == 0, result.stderr
    steps = installs(commands)
    assert steps[0] == "torch==9.9.9"
    assert steps[1].startswith("-c ")
    assert steps[1].endswith("-e shared/ pytest pytest-timeout -r recipes/esm2_fa/requirements-faesm.txt")
    assert steps[2] == "--no-deps -r recipes/esm2_fa/requirements-faesm-nodeps.txt"
    assert len(steps) == 3  # no other recipe's requirements, no dev tools
    assert "torch==9.9.9" in constraints.splitlines() and "torch==2.13.0" not in constraints


def test_main_env_keeps_nodeps_installs_and_never_gets_faesm(setup_repo):
    result, commands, _ = run_setup(setup_repo, [], faesm_installed=True)
    assert result.returncode == 0, result.stderr
    steps = installs(commands)
    assert steps[0] == "torch==9.9.9"
    assert "--no-deps -r recipes/omnibiote/requirements-nodeps.txt" in steps
    assert not [step for step in steps if "faesm" in step]
    # a .venv from before the split still holds faesm, broken under transformers 5: it is removed
    assert "-m pip uninstall -y -q faesm" in commands


def test_faesm_env_without_its_requirements_is_a_one_line_error(setup_repo):
    (setup_repo / "recipes" / "esm2_fa" / "requirements-faesm.txt").unlink()
    result, commands, _ = run_setup(setup_repo, ["faesm"])
    assert result.returncode == 1 and commands == []
    assert result.stderr.strip() == (
        "error: recipes/esm2_fa/requirements-faesm.txt is missing (esm2_fa's faesm backend lists its pins there)"
    )


def test_make_setup_faesm_runs_the_faesm_profile():
    result = subprocess.run(["make", "-n", "-B", "-C", str(ROOT), "setup-faesm"], capture_output=True, text=True)
    assert f'bash ci/setup_venv.sh "{ROOT}/.venv-faesm" faesm' in result.stdout
    test_plan = subprocess.run(["make", "-n", "-B", "-C", str(ROOT), "test", "recipe=geneformer"], capture_output=True)
    assert b"setup_venv.sh" in test_plan.stdout and b'.venv-faesm" faesm' not in test_plan.stdout


FAESM_TESTS = {
    "passing": "def test_backend():\n    assert 1 + 1 == 2\n",
    "failing": "def test_backend():\n    assert 1 + 1 == 3\n",
    "skipped": "import pytest\n\n\ndef test_backend():\n    pytest.skip('faesm does not import')\n",
}


@pytest.fixture(scope="module")
def faesm_job_repo(tmp_path_factory):
    """ci/ and shared/ with a stand-in esm2_fa: one ordinary test (also the export's smoke test) and one faesm test."""
    repo = tmp_path_factory.mktemp("faesm_job") / "repo"
    shutil.copytree(ROOT / "ci", repo / "ci", ignore=shutil.ignore_patterns("__pycache__", "tests", "gpu_check"))
    shutil.copytree(ROOT / "shared", repo / "shared", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(ROOT / "docker", repo / "docker")
    tests = repo / "recipes" / "esm2_fa" / "tests"
    tests.mkdir(parents=True)
    markers = "markers =\n    faesm: faesm backend\n    smoke: the exported copy runs these\n"
    (tests.parent / "pytest.ini").write_text("[pytest]\ntestpaths = tests\n" + markers)
    (tests / "test_main.py").write_text("import pytest\n\n\n@pytest.mark.smoke\ndef test_main():\n    pass\n")
    return repo


@pytest.mark.parametrize("case", ["passing", "failing", "skipped"])
def test_faesm_job_counts_and_fails_the_run(faesm_job_repo, case):
    repo = faesm_job_repo
    test_file = repo / "recipes" / "esm2_fa" / "tests" / "test_faesm.py"
    test_file.write_text("import pytest\n\npytestmark = pytest.mark.faesm\n\n\n" + FAESM_TESTS[case])
    bin_dir = str(Path(sys.executable).parent)  # the faesm job runs in this same venv here
    result = subprocess.run(
        ["bash", str(repo / "ci" / "run_tests.sh"), bin_dir, "esm2_fa"],
        capture_output=True,
        text=True,
        env={**os.environ, "FAESM_BIN": bin_dir},
    )
    total = result.stdout.strip().splitlines()[-2:]
    if case == "passing":
        assert result.returncode == 0, result.stdout
        # in-tree 2 (this stand-in does not skip its faesm test in the main venv), the faesm job 1, the export's
        # smoke test 1
        assert total[0] == "tests: 4 passed, 0 failed, 0 skipped" and total[1] == "all suites passed"
    else:
        assert result.returncode == 1, result.stdout
        expected = {"failing": "esm2_fa-faesm", "skipped": "esm2_fa-faesm-vacuous"}[case]
        assert expected in total[1].split()


def test_the_main_environment_lists_no_faesm():
    """faesm next to transformers 5 fails at import: only esm2_fa's faesm files may name it."""
    main = sorted(ROOT.glob("recipes/*/requirements.txt")) + sorted(ROOT.glob("recipes/*/requirements-nodeps.txt"))
    pins = [line.partition("#")[0].strip().lower() for p in main for line in p.read_text().splitlines()]
    faesm = [pin for pin in pins if pin.startswith("faesm")]
    assert any(pin.startswith("transformers==") for pin in pins) and not faesm
    assert "faesm==" in (ROOT / "recipes" / "esm2_fa" / "requirements-faesm-nodeps.txt").read_text()
