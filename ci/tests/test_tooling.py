"""The Makefile and ci/ scripts: help lists every target, errors are clear, export is standalone and non-destructive."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def make(*args, env=None):
    return subprocess.run(["make", "-s", "-C", str(ROOT), *args], capture_output=True, text=True, env=env)


def test_help_lists_every_phony_target():
    phony = re.search(r"^\.PHONY:(.*)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()
    listed = {line.split()[0] for line in make("help").stdout.splitlines()[1:]}
    assert set(phony) - {"check-recipe"} <= listed


@pytest.mark.parametrize("docker_script", [None, '#!/bin/sh\n[ "$1" = info ] && exit 1\nexit 0\n'])
def test_docker_build_without_engine_is_a_clear_error(tmp_path, docker_script):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for tool in ("make", "bash", "sh", "grep", "awk", "ls", "test", "env"):
        if shutil.which(tool):
            (fake_bin / tool).symlink_to(shutil.which(tool))
    if docker_script:
        (fake_bin / "docker").write_text(docker_script)
        (fake_bin / "docker").chmod(0o755)
    result = make("docker-build", "recipe=geneformer", env={**os.environ, "PATH": str(fake_bin)})
    assert result.returncode != 0
    assert "error: docker" in result.stderr


def test_unknown_recipe_is_named(tmp_path):
    result = make("bench", "recipe=no_such_recipe")
    assert result.returncode != 0 and "no recipe 'no_such_recipe'" in result.stderr


@pytest.fixture
def mini_repo(tmp_path):
    """A copy of ci/ and shared/ with one small recipe, so export is tested independently of the real recipes."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "ci", repo / "ci", ignore=shutil.ignore_patterns("__pycache__", "tests"))
    shutil.copytree(ROOT / "shared", repo / "shared", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(ROOT / "docker", repo / "docker")
    recipe = repo / "recipes" / "demo"
    (recipe / "tests").mkdir(parents=True)
    (recipe / "tests" / "test_demo.py").write_text("def test_nothing_to_do():\n    pass\n")
    (recipe / "train.py").write_text("import biorecipes_shared\n")
    (recipe / "requirements.txt").write_text("# deps\nnumpy\n")
    for ignored in ("outputs", "fixture"):  # run outputs and generated data stay behind
        (recipe / ignored).mkdir()
        (recipe / ignored / "big.bin").write_bytes(b"0" * 10)
    (recipe / ".gitignore").write_text("outputs/\nfixture/\n")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    return repo


def export(repo, dest):
    return subprocess.run(
        ["bash", str(repo / "ci" / "export_recipe.sh"), "demo", str(dest)], capture_output=True, text=True
    )


def test_export_is_standalone(mini_repo, tmp_path):
    dest = tmp_path / "out" / "demo"
    assert export(mini_repo, dest).returncode == 0
    assert (dest / "train.py").is_file() and (dest / "tests").is_dir()
    assert (dest / "shared" / "biorecipes_shared" / "checkpoint.py").is_file()
    assert not (dest / "outputs").exists() and not (dest / "fixture").exists()
    assert not (dest / "shared" / "tests").exists()
    assert (dest / "requirements.txt").read_text() == "# deps\nnumpy\n"
    standalone = [line for line in (dest / "requirements-standalone.txt").read_text().splitlines() if line[:1] != "#"]
    assert standalone == ["./shared", "-r requirements.txt"]
    env = {**os.environ, "PYTHONPATH": str(dest / "shared")}
    where = subprocess.run(
        [sys.executable, "-c", "import biorecipes_shared; print(biorecipes_shared.__file__)"],
        cwd=dest,
        env=env,
        capture_output=True,
        text=True,
    ).stdout
    assert where.startswith(str(dest))
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".export-")]
    assert (dest / "Dockerfile.base").read_text() == (ROOT / "docker" / "base.Dockerfile").read_text()


@pytest.mark.parametrize("dockerfile", sorted((ROOT / "recipes").glob("*/Dockerfile")), ids=lambda p: p.parent.name)
def test_recipe_images_share_one_base(dockerfile):
    """The common part (NGC image, environment, biorecipes_shared) lives once, in docker/base.Dockerfile."""
    text = dockerfile.read_text()
    assert "ARG BASE_IMAGE=biorecipes/base:latest\nFROM ${BASE_IMAGE}\n" in text
    assert "nvcr.io" not in text.split("FROM", 1)[1] and "shared/" not in text.split("FROM", 1)[1]


def test_export_never_writes_into_a_non_empty_dir(mini_repo, tmp_path):
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "notes.txt").write_text("keep me")
    result = export(mini_repo, dest)
    assert result.returncode != 0 and "not empty" in result.stderr
    assert [p.name for p in dest.iterdir()] == ["notes.txt"]
