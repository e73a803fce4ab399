"""Settings: the YAML file, the original's flags and dotted overrides land in one TrainConfig, in that order."""

from pathlib import Path

import pytest

from biorecipes_shared import ConfigError
from config import TrainConfig, parse_config

SAMPLE = Path(__file__).resolve().parents[1] / "configs" / "sample.yaml"


@pytest.mark.smoke
def test_file_then_flags_then_overrides(capsys):
    config = parse_config(["--config", str(SAMPLE), "--lr", "0.02", "n_layer=3", "--n_layer", "5"])
    assert (config.base_dir, config.n_embd, config.ctx_len) == (Path("sample_data/encoded"), 128, 256)  # the file
    assert config.lr == 0.02 and config.n_layer == 3  # a flag over the file, an override over a flag
    assert config.source_weights == "genbank=0.5,uniprot=0.5" and config.output_dir == Path("runs/sample")
    assert config.weight_decay == TrainConfig.weight_decay  # not in the file: the dataclass default
    assert capsys.readouterr().err == ""


def test_flags_keep_the_originals_names_and_defaults_live_in_the_dataclass():
    assert parse_config(["--base_dir", "data"]) == TrainConfig(base_dir=Path("data"))
    config = parse_config(["--base_dir", "d", "--out_dir", "/tmp/o", "--save_name", "yes", "--compile"])
    assert config.output_dir == Path("/tmp/o/yes") and config.compile  # "yes" stays a name, not YAML's true
    assert parse_config(["--base_dir", "d", "--save_name", "x"]).output_dir == Path("runs/x")
    assert parse_config(["--config", str(SAMPLE), "--save_name", "s2"]).output_dir == Path("runs/s2")
    assert parse_config(["--base_dir", "d", "--token_budget", "10_000_000_000"]).token_budget == 1e10


def test_keep_last_k_is_the_old_name_of_keep_last(capsys):
    assert parse_config(["--base_dir", "d", "--keep_last_k", "3"]).keep_last == 3
    (note,) = capsys.readouterr().err.strip().splitlines()
    assert "'keep_last_k' is now called 'keep_last'" in note


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--base_dir", "d", "n_layers=3"], "n_layers"),
        (["--base_dir", "d", "n_layer=three"], "n_layer"),
        (["--config", "nowhere.yaml"], "nowhere.yaml: no such config file"),
        (["--lr", "0.1"], "--base_dir is required"),
        (["--base_dir", "d", "--save_name", "a/b"], "--save_name 'a/b' must be a plain folder name"),
    ],
)
def test_bad_settings_are_one_line_errors(argv, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_config(argv)
    assert "\n" not in str(err.value)
