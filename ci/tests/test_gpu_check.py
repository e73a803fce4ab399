"""The GPU check's harness: size table, one failing check not stopping the others, reports, resume helpers, wheel list.

The CPU dry run itself runs as its own suite in ci/run_tests.sh (one junit testcase per check row)."""

import json
import math
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "ci"))

from gpu_check import common, report, sizes  # noqa: E402


def test_cpu_sizes_exercise_the_same_checks_as_cuda():
    assert set(sizes.SIZES["cpu"]) == set(sizes.SIZES["cuda"])
    for recipe in sizes.RECIPES:
        cuda, cpu = sizes.SIZES["cuda"][recipe], sizes.SIZES["cpu"][recipe]
        assert set(cuda) == set(cpu), recipe
        for key, value in cuda.items():
            if isinstance(value, dict):
                assert set(value) == set(cpu[key]), f"{recipe}.{key}"
        assert (ROOT / "ci" / "gpu_check" / f"check_{recipe}.py").is_file()
        assert (ROOT / "recipes" / recipe).is_dir()
    assert sum(sizes.SIZES["cuda"][r]["budget_s"] for r in sizes.RECIPES) <= sizes.TOTAL_BUDGET_S["cuda"]


def test_a_failing_check_is_a_row_and_the_next_check_runs(tmp_path):
    recorder = common.Recorder("demo", tmp_path)

    def broken():
        raise RuntimeError("CUDA error: an illegal memory access\nwas encountered")

    def skipped():
        raise common.CheckSkipped("needs a GPU")

    recorder.run("first", broken)
    recorder.run("second", lambda: ("ok", {"x": 1.0}))
    recorder.run("third", skipped)
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["check"], r["status"]) for r in rows] == [("first", "FAIL"), ("second", "PASS"), ("third", "SKIP")]
    assert rows[0]["summary"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert "Traceback" in (tmp_path / "first.traceback.txt").read_text()
    assert rows[1]["metrics"] == {"x": 1.0}


def test_parity_fails_on_nan_and_on_large_errors():
    summary, metrics = common.parity_result({"bf16": 4e-3}, {"bf16": 3e-2}, "what")
    assert summary == "what: bf16 4.0e-03" and metrics["rel_err"] == {"bf16": 4e-3}
    with pytest.raises(common.CheckFailed, match="bf16 nan"):
        common.parity_result({"bf16": float("nan")}, {"bf16": 3e-2}, "what")
    with pytest.raises(common.CheckFailed, match=r"bf16 5.00e-02 > 3e-02"):
        common.parity_result({"bf16": 5e-2}, {"bf16": 3e-2}, "what")
    ref = torch.ones(10)
    assert common.relative_error(ref * 1.01, ref) == pytest.approx(0.01)
    assert math.isnan(common.relative_error(torch.full((10,), float("nan")), ref))


def test_reports_count_rows_in_junit_and_markdown(tmp_path):
    rows = [
        {"recipe": "a", "check": "parity", "status": "PASS", "summary": "fine", "seconds": 1.0},
        {"recipe": "a", "check": "fp8", "status": "SKIP", "summary": "needs a GPU"},
        {"recipe": "b", "check": "train", "status": "FAIL", "summary": "loss did not fall | x"},
    ]
    meta = {"device": "cpu", "device_name": "cpu", "peak_tflops_bf16": 1.0}
    table = report.write_reports(tmp_path, rows, meta, tmp_path / "junit.xml")
    assert len(table.splitlines()) == 4 and "loss did not fall" in table
    suite = ET.parse(tmp_path / "junit.xml").getroot()
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("3", "1", "1")
    failure = suite.find("testcase[@name='train']/failure")
    assert failure.get("message") == "loss did not fall | x"
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == rows
    assert "| b | train | FAIL | loss did not fall \\| x |" in (tmp_path / "results.md").read_text()
    assert not list(tmp_path.glob(".*.tmp"))


def test_resume_helpers(tmp_path):
    for step in (5, 10, 40):
        (tmp_path / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
    (tmp_path / "final_model").mkdir()
    (tmp_path / "run_finished.json").write_text("{}")
    common.interrupt_after_first_checkpoint(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000005"]
    with pytest.raises(common.CheckFailed, match="expected >= 2 checkpoints"):
        common.interrupt_after_first_checkpoint(tmp_path)
    a = {"w": torch.ones(4), "n": torch.tensor(3)}
    assert common.weights_difference(a, {"w": torch.ones(4), "n": torch.tensor(4)}) == 0.0
    assert common.weights_difference(a, {"w": torch.full((4,), 1.1), "n": torch.tensor(3)}) == pytest.approx(0.1)
    with pytest.raises(common.CheckFailed, match="differ in keys"):
        common.weights_difference(a, {"w": torch.ones(4)})
    run = tmp_path / "run" / "logs"
    run.mkdir(parents=True)
    lines = [{"step": 2, "loss": 2.0}, {"step": 1, "loss": 3.0}, {"step": 2, "val_loss": 9.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert common.read_losses(tmp_path / "run") == [(1, 3.0), (2, 2.0)]


def test_wheel_list_is_pinned_and_says_who_needs_each():
    lines = [line for line in (ROOT / "ci" / "gpu_wheels.txt").read_text().splitlines() if line and line[0] != "#"]
    names = set()
    for line in lines:
        requirement, _, comment = line.partition("#")
        assert re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][A-Za-z0-9.]*", requirement.strip()), line
        assert any(recipe in comment for recipe in sizes.RECIPES), line
        names.add(requirement.split("==")[0].lower())
    assert {"torchao", "mambapy", "mup", "transformers", "huggingface-hub", "accelerate", "hydra-core"} <= names
    assert "torch" not in names  # the image's torch is used as is
    # the carried versions are the ones the recipes pin (the image's transformers 5.17 / accelerate 1.15 are older)
    pinned = {}
    for req in sorted((ROOT / "recipes").glob("*/requirements.txt")):
        for line in req.read_text().splitlines():
            name, _, version = line.partition("#")[0].strip().partition("==")
            pinned.setdefault(name.lower(), set()).add(version)
    carried = dict(line.partition("#")[0].strip().lower().split("==") for line in lines)
    for name in ("transformers", "accelerate", "datasets", "hydra-core", "omegaconf", "biopython", "mambapy"):
        assert pinned[name] == {carried[name]}, f"{name}: recipes pin {pinned[name]}, carried {carried[name]}"


def test_carried_wheels_come_first_and_the_dry_run_hides_gpus(tmp_path, monkeypatch):
    from gpu_check import run

    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = run.child_env("cpu", tmp_path / "site")
    paths = env["PYTHONPATH"].split(":")
    assert paths == [str(tmp_path / "site"), str(ROOT / "ci"), str(ROOT / "shared"), "/elsewhere"]
    assert env["CUDA_VISIBLE_DEVICES"] == ""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert "CUDA_VISIBLE_DEVICES" not in run.child_env("cuda", None)
    assert "no wheels in" in run.install_wheels(tmp_path / "empty", tmp_path / "site")
    with pytest.raises(SystemExit):
        run.parse_args(["--only", "esm2_fa,nope"])


class ToyBlocks(torch.nn.Module):
    """Two blocks with the switches the recipes have: `.compile()` per block and an activation_checkpointing flag."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()) for _ in "ab")
        self.activation_checkpointing = False

    def forward(self, x):
        for block in self.blocks:
            use = self.activation_checkpointing and torch.is_grad_enabled()
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if use else block(x)
        return x.square().mean()


def toy_case(apply=None):
    from gpu_check.switches import SwitchCase

    def switches(model, compile, activation_checkpointing):
        if compile:
            for block in model.blocks:
                block.compile()
        model.activation_checkpointing = activation_checkpointing

    batch = torch.randn(4, 8)
    return SwitchCase(ToyBlocks, lambda model: model(batch), apply or switches, tokens=4, what="toy")


def cpu_context(tmp_path):
    return common.Context("toy", torch.device("cpu"), tmp_path, float("nan"), sizes.sizes_for("cpu", "plant_lm"))


def test_switch_rows_check_parity_through_the_recipe_switch(tmp_path):
    from gpu_check import switches

    original = torch.compile
    summary, metrics = switches.compile_row(cpu_context(tmp_path), toy_case())
    assert torch.compile is original  # the dry-run backend is patched in for the row only
    assert metrics["backend"] == "eager" and metrics["rel_err"]["compiled loss"] <= 1e-6
    assert "speed on CUDA only" in summary
    summary, metrics = switches.checkpointing_row(cpu_context(tmp_path), toy_case())
    assert metrics["rel_err"] == {"checkpointed loss": 0.0, "checkpointed grads": 0.0}

    def wrong_switch(model, compile, activation_checkpointing):  # a switch that changes the math must fail
        with torch.no_grad():
            model.blocks[0][0].weight.mul_(1.1)

    with pytest.raises(common.CheckFailed, match="checkpointed loss"):
        switches.checkpointing_row(cpu_context(tmp_path), toy_case(wrong_switch))


def test_genecorpus_like_lengths_and_real_flops():
    from gpu_check.geneformer_batching import cell_lengths, real_flops

    lengths = cell_lengths(20000, 2048)
    assert 0.05 < (lengths == 2048).mean() < 0.09  # ~7% at the cap, as Genecorpus-30M at 2,048
    assert 900 < np.median(lengths) < 1100
    config = type("Config", (), {"hidden_size": 4, "num_hidden_layers": 2, "intermediate_size": 8, "vocab_size": 10})
    # 6 x 2 layers x (4*16 + 2*32) per token + 6 x 4 x 10 x 0.5 per token, + 12 x 2 x 4 x (1 + 9) for attention
    assert real_flops(config, np.array([1, 3]), 0.5) == 1536 * 4 + 120 * 4 + 960


def test_the_faesm_site_carries_esm2_fa_faesm_pins():
    """The faesm row's own site (transformers 4.53) holds the versions of esm2_fa's faesm environment."""
    pins = {}
    for req in sorted((ROOT / "recipes" / "esm2_fa").glob("requirements-faesm*.txt")):
        for line in req.read_text().splitlines():
            name, _, version = line.partition("#")[0].strip().lower().partition("==")
            pins[name] = version
    carried = {}
    for line in (ROOT / "ci" / "gpu_wheels_faesm.txt").read_text().splitlines():
        requirement, _, comment = line.partition("#")
        if requirement.strip():
            name, version = requirement.strip().lower().split("==")
            carried[name] = version
            assert "esm2_fa" in comment, line
    assert set(carried) == {"transformers", "tokenizers", "huggingface-hub", "faesm"}
    assert all(pins[name] == version for name, version in carried.items()), (carried, pins)
