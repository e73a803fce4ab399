"""The shared settings loader: YAML + dotted overrides into a typed dataclass, deprecated names, one-line errors."""

from dataclasses import dataclass, field

import pytest

from biorecipes_shared import ConfigError, load_config, rename_overrides


@dataclass
class Train:
    max_steps: int = 10
    lr: float = 1e-3
    output_dir: str = "runs/x"


@dataclass
class Settings:
    train: Train = field(default_factory=Train)
    seed: int = 0
    weights: dict[str, float] = field(default_factory=lambda: {"a": 1.0, "b": 2.0})


RENAMED = {"train.num_steps": "train.max_steps"}


def test_defaults_then_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 50\n  lr: 0.01\nseed: 3\n")
    cfg = load_config(Settings, path, ["train.lr=0.5", "seed=4"])
    assert isinstance(cfg, Settings) and isinstance(cfg.train, Train)
    assert (cfg.train.max_steps, cfg.train.lr, cfg.train.output_dir, cfg.seed) == (50, 0.5, "runs/x", 4)


def test_old_names_work_with_one_note(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  num_steps: 7\n")
    assert load_config(Settings, path, renamed=RENAMED).train.max_steps == 7
    assert load_config(Settings, None, ["train.num_steps=8"], renamed=RENAMED).train.max_steps == 8
    notes = capsys.readouterr().err.strip().splitlines()
    assert len(notes) == 2 and all("'train.num_steps' is now called 'train.max_steps'" in n for n in notes)
    assert rename_overrides(["+train.num_steps=1", "seed=2"], RENAMED) == ["+train.max_steps=1", "seed=2"]


@pytest.mark.parametrize(
    ("yaml_text", "overrides", "expected"),
    [
        (None, ["train.foo=1"], "command line: train.foo"),
        (None, ["train.max_steps=ten"], "train.max_steps"),
        (None, ["train.max_steps"], "is not key=value"),
        ("train:\n  bar: 1\n", [], "c.yaml: train.bar"),
        ("train: [1, 2\n", [], "not valid YAML"),
        ("- 1\n", [], "a mapping of settings"),
    ],
)
def test_bad_settings_are_one_line(tmp_path, yaml_text, overrides, expected):
    path = None
    if yaml_text is not None:
        path = tmp_path / "c.yaml"
        path.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_config(Settings, path, overrides)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: no such config file"):
        load_config(Settings, tmp_path / "nope.yaml")


def test_a_mapping_setting_is_replaced_not_merged(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("weights:\n  c: 3\ntrain:\n  lr: 0.1\n")
    cfg = load_config(Settings, path)
    assert cfg.weights == {"c": 3.0} and cfg.train.max_steps == 10 and cfg.train.lr == 0.1
    assert load_config(Settings, path, ["weights={d: 4}"]).weights == {"d": 4.0}
    with pytest.raises(ConfigError, match="weights.c"):
        load_config(Settings, None, ["weights={c: x}"])
