"""Settings, one style for every recipe: a typed dataclass schema, filled from a YAML file and dotted `key=value`
overrides, checked in the recipe's one `validate()` with the shared rules (`run.check_settings`).

OmegaConf does the typing and merging (a well-kept library; Hydra, which two recipes keep for their users, is built
on it), so a Hydra recipe and a plain one produce the same dataclass:

    cfg = load_config(Config, "configs/sample.yaml", ["train.max_steps=20"], renamed={"train.num_steps": "train.max_steps"})

Every problem is a `ConfigError` of one line naming the file or override and the setting.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .run import ConfigError

T = TypeVar("T")

__all__ = ["load_config", "rename_overrides", "rename_keys"]


def _deprecation(old: str, new: str, where: str) -> None:
    print(f"note: {where}: '{old}' is now called '{new}'; the old name still works for now", file=sys.stderr)


def rename_overrides(overrides: Sequence[str], renamed: Mapping[str, str] | None) -> list[str]:
    """Command-line overrides with deprecated dotted keys (`old.key=v`, `+old.key=v`) rewritten to their new names,
    with a one-line note on stderr for each. Usable before Hydra parses `sys.argv`."""
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        bare = key.lstrip("+~")
        new = (renamed or {}).get(bare) if sep else None
        if new:
            _deprecation(bare, new, "command line")
            item = f"{key[: len(key) - len(bare)]}{new}={value}"
        out.append(item)
    return out


def rename_keys(tree: Any, renamed: Mapping[str, str] | None, where: str) -> None:
    """Move deprecated dotted keys of a loaded YAML tree (an OmegaConf DictConfig) to their new names, in place."""
    from omegaconf import OmegaConf

    for old, new in (renamed or {}).items():
        parent_key, _, leaf = old.rpartition(".")
        parent = OmegaConf.select(tree, parent_key) if parent_key else tree
        if parent is None or not OmegaConf.is_dict(parent) or leaf not in parent:
            continue
        _deprecation(old, new, where)
        value = parent.pop(leaf)
        OmegaConf.update(tree, new, value, force_add=True)


def _one_line(err: Exception) -> str:
    key = getattr(err, "full_key", None)
    message = str(getattr(err, "msg", "") or err).strip().splitlines()[0]
    return f"{key}: {message}" if key and key not in message else message


def _replace_mappings(base: Any, layer: Any) -> None:
    """A mapping-valued setting (a `dict[str, X]` field, not a section) that a layer gives replaces the default
    mapping instead of adding keys to it (OmegaConf's merge would union them); sections still merge key by key."""
    from omegaconf import DictConfig, OmegaConf

    for key in list(layer.keys()):
        node = base._get_node(key) if key in base else None
        if not isinstance(node, DictConfig) or not OmegaConf.is_dict(layer[key]):
            continue
        if OmegaConf.get_type(node) is dict:
            base[key] = layer.pop(key)
        else:
            _replace_mappings(node, layer[key])


def _merge(base: Any, layer: Any, where: str) -> Any:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        _replace_mappings(base, layer)
        return OmegaConf.merge(base, layer)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{where}: {_one_line(err)}") from None


def _read_yaml(path: Path) -> Any:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        tree = OmegaConf.load(path)
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read ({err})") from None
    except (YAMLError, OmegaConfBaseException) as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not OmegaConf.is_dict(tree):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    return tree


def load_config(
    schema: type[T],
    config_file: str | Path | None = None,
    overrides: Sequence[str] = (),
    renamed: Mapping[str, str] | None = None,
) -> T:
    """An instance of the dataclass `schema`: its defaults, then `config_file` (YAML), then `overrides`
    (`a.b=value`, later wins). `renamed` maps deprecated dotted keys to current ones (one-line note each).

    Raises ConfigError (one line) for a missing/unreadable/invalid file, an unknown key, a value of the wrong type,
    or an override without `=`. Range checks are the recipe's `validate()` (shared rules: `check_settings`).
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    tree = OmegaConf.structured(schema)
    if config_file is not None:
        path = Path(config_file)
        layer = _read_yaml(path)
        rename_keys(layer, renamed, str(path))
        tree = _merge(tree, layer, str(path))
    items = rename_overrides(list(overrides), renamed)
    for item in items:
        if "=" not in item or not item.partition("=")[0].strip():
            raise ConfigError(f"override {item!r} is not key=value (for example train.max_steps=100)")
    if items:
        try:
            layer = OmegaConf.from_dotlist(items)
        except OmegaConfBaseException as err:
            raise ConfigError(f"command line: {_one_line(err)}") from None
        tree = _merge(tree, layer, "command line")
    try:
        return OmegaConf.to_object(tree)
    except OmegaConfBaseException as err:  # a required (MISSING) setting left unset
        raise ConfigError(f"settings: {_one_line(err)}") from None
