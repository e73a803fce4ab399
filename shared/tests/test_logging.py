import json
import logging
import sys
import types

import pytest

from biorecipes_shared.distributed import DistributedContext
from biorecipes_shared.logging_utils import (
    MetricsWriter,
    ThroughputMeter,
    get_logger,
    peak_memory,
    plot_loss_curve,
    read_metrics,
)


def ctx(rank):
    import torch

    return DistributedContext(rank=rank, local_rank=rank, world_size=2, device=torch.device("cpu"), backend="gloo")


def test_jsonl_and_tsv_written_and_read_back(tmp_path):
    with MetricsWriter(
        tmp_path, ctx(0), tsv_files={"log_file.txt": ["loss", "step"], "AUC_log.tsv": ["auc", "step"]}
    ) as m:
        m.log(1, loss=2.5, lr=1e-3)
        m.log(2, loss=float("nan"), auc=0.75)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert records == [{"step": 1, "loss": 2.5, "lr": 1e-3}, {"step": 2, "loss": "nan", "auc": 0.75}]
    assert (tmp_path / "log_file.txt").read_text().splitlines() == ["loss\tstep", "2.5\t1", "nan\t2"]
    assert (tmp_path / "AUC_log.tsv").read_text().splitlines() == ["auc\tstep", "0.75\t2"]


def test_resumed_writer_appends_without_second_header(tmp_path):
    MetricsWriter(tmp_path, ctx(0), tsv_files={"log_file.txt": ["loss", "step"]}).log(1, loss=1.0)
    MetricsWriter(tmp_path, ctx(0), tsv_files={"log_file.txt": ["loss", "step"]}).log(2, loss=0.5)
    assert (tmp_path / "log_file.txt").read_text().splitlines() == ["loss\tstep", "1.0\t1", "0.5\t2"]


def test_other_ranks_write_nothing(tmp_path):
    MetricsWriter(tmp_path / "out", ctx(1), tsv_files={"log_file.txt": ["loss", "step"]}).log(1, loss=1.0)
    assert not (tmp_path / "out").exists()


def test_wandb_only_when_asked_and_never_sees_the_key(tmp_path, monkeypatch):
    calls = []
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or fake_run)
    fake_run = types.SimpleNamespace(
        log=lambda data, step: calls.append(("log", data, step)), finish=lambda: calls.append(("finish",))
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_API_KEY", "secret-key-123")
    MetricsWriter(tmp_path / "a", ctx(0)).log(1, loss=1.0)
    assert calls == []
    with MetricsWriter(tmp_path / "b", ctx(0), wandb_init_args={"project": "p", "mode": "offline"}) as m:
        m.log(3, loss=0.5)
    assert calls == [("init", {"project": "p", "mode": "offline"}), ("log", {"loss": 0.5}, 3), ("finish",)]
    assert "secret-key-123" not in repr(calls) + (tmp_path / "b" / "metrics.jsonl").read_text()


def test_logger_is_quiet_off_rank_zero(capsys):
    get_logger("t0", ctx(0)).info("hello from main")
    get_logger("t1", ctx(1)).info("hello from worker")
    err = capsys.readouterr().err
    assert "hello from main" in err and "hello from worker" not in err
    assert get_logger("t1", ctx(1)).level == logging.WARNING


def test_throughput_meter_counts_since_last_call(monkeypatch):
    clock = iter([0.0, 2.0, 3.0])
    monkeypatch.setattr("biorecipes_shared.logging_utils.time.perf_counter", lambda: next(clock))
    meter = ThroughputMeter()
    meter.update(samples=4, tokens=1000, positions=1600)
    meter.update(samples=0, tokens=0, positions=400)  # an all-padding micro-batch still costs compute
    assert meter.rates() == {"samples_per_s": 2.0, "tokens_per_s": 500.0, "useful_token_fraction": 0.5}
    meter.update(samples=1, tokens=10)  # no padding: positions default to tokens
    assert meter.rates() == {"samples_per_s": 1.0, "tokens_per_s": 10.0, "useful_token_fraction": 1.0}


def test_peak_memory_reports_rss():
    before = peak_memory()
    block = bytearray(300 * 2**20)  # touch 300 MiB
    block[::4096] = b"x" * len(block[::4096])
    after = peak_memory()
    assert after["cpu_peak_rss_gib"] >= before["cpu_peak_rss_gib"]
    assert after["cpu_peak_rss_gib"] >= after["cpu_rss_gib"] > 0.25
    del block


def test_loss_curve_png(tmp_path):
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps({"step": s, "loss": 1 / s}) for s in range(1, 6)))
    out = plot_loss_curve(tmp_path / "m.jsonl", tmp_path / "loss_curve.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no records"):
        plot_loss_curve(tmp_path / "m.jsonl", tmp_path / "x.png", key="auc")


def test_interleaved_medians_warms_up_then_alternates():
    from biorecipes_shared.logging_utils import interleaved_medians

    calls = []
    medians = interleaved_medians({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3)
    assert calls == ["a", "b"] * 4  # one warm-up round, then three timed rounds in turns
    assert set(medians) == {"a", "b"} and all(value >= 0 for value in medians.values())
