"""Every check of the Hydra settings, in one place, run before any split, index or run_dir is written.

A bad value is one `ConfigError` line naming the key (`biorecipes_shared.run.check_settings` does the range rules).
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from biorecipes_shared.run import ConfigError, check_settings
from data import KmerTokenizer, check_crop
from preprocess import GtdbDataError

# Minimum of each integer setting: below it the run would divide by zero, loop zero times or build an empty tensor,
# mostly long after the index build. The AUC needs 2 genomes with 2 fragments each.
MIN_COUNTS = {
    "data.kmer": 1,
    "data.fragment_bp": 1,
    "data.train_tokens": 1,
    "data.val_tokens": 1,
    "data.val_species_target": 1,
    "data.family_count_cap": 1,
    "data.n_val_genomes": 2,
    "data.val_per_genus": 1,
    "data.train_per_genus": 1,
    "data.num_workers": 0,
    "model.d_model": 1,
    "model.n_layers": 1,
    "model.d_state": 1,
    "model.d_conv": 1,
    "model.expand": 1,
    "train.batch_size": 1,
    "train.grad_accumulation": 1,
    "train.max_steps": 1,
    "train.steps_per_epoch": 1,
    "train.warmup_steps": 0,
    "train.log_every": 1,
    "train.checkpoint_every": 1,
    "train.keep_last_k": 0,
    "val.fragments_per_genome": 2,
    "val.batch_size": 1,
}

# (key, rule) for the real-valued settings; rules are those of biorecipes_shared.run.check_settings.
NUMBER_RULES = (
    ("train.lr", "non_negative"),  # 0 is allowed: a frozen run (e.g. to check an init_from export round-trips)
    ("train.min_lr", "non_negative"),
    ("train.weight_decay", "non_negative"),
    ("train.grad_clip", "positive"),
    ("data.max_n_fraction", "fraction"),
    ("data.max_contamination", "finite"),
    ("head.scale", "positive"),
    ("head.margin", "non_negative"),
    ("head.t_momentum", "fraction"),
)

CHOICES = {
    "model.norm": ("layernorm", "rmsnorm"),
    "model.pooling": ("sum", "mean"),
    "model.backend": ("auto", "pure"),
}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError (one line naming the key) for any setting that cannot work; writes nothing."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"required setting(s) not given: {', '.join(missing)} (pass them as key=value)")
    for key, allowed in CHOICES.items():
        if OmegaConf.select(cfg, key) not in allowed:
            raise ConfigError(f"{key}={OmegaConf.select(cfg, key)!r}: must be one of {', '.join(allowed)}")
    for key, minimum in MIN_COUNTS.items():
        value = OmegaConf.select(cfg, key)
        if not _is_int(value) or value < minimum:
            raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")
    stop = cfg.train.stop_at_step
    if stop is not None and (not _is_int(stop) or stop < 1):
        raise ConfigError(f"train.stop_at_step must be null or an integer >= 1, got {stop!r}")
    check_settings((key, OmegaConf.select(cfg, key), rule) for key, rule in NUMBER_RULES)
    # Checked here too (not only by the data classes) so that it fails before the split and index are built.
    tokenizer = KmerTokenizer(cfg.data.kmer)
    try:
        check_crop(cfg.data.train_tokens, cfg.data.fragment_bp, tokenizer, "data.train_tokens")
        check_crop(cfg.data.val_tokens, cfg.data.fragment_bp, tokenizer, "data.val_tokens")
    except GtdbDataError as err:
        raise ConfigError(str(err)) from None
