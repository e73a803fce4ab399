"""The training settings: one typed dataclass (`TrainConfig`, every default written once, here), filled from an
optional YAML file (`--config configs/sample.yaml`), the original's flags and dotted `key=value` overrides, and
checked in one place (`validate`, through the shared `check_settings`).

    python train_encoder.py --config configs/sample.yaml max_steps=20      # YAML + overrides
    python train_encoder.py --base_dir data/encoded --save_name omni_small --n_layer 12 ...   # the original's flags

Each flag is the setting of the same name (`--lr 0.02` is `lr=0.02`); `--out_dir` / `--save_name` (the original's run
folder `<out_dir>/<save_name>`) set the parent and the name of `output_dir`. Later wins: the file, then the flags,
then the `key=value` overrides. A bad value is one `error:` line before any data is read or any folder exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from biorecipes_shared import ConfigError, check_settings, load_config

DESCRIPTION = """Train OmniBioTA with masked-language modelling on encoded DNA/RNA/protein tokens.

    torchrun --nnodes=1 --nproc_per_node=4 train_encoder.py --base_dir data/encoded --save_name omni_small \\
        --n_layer 12 --n_head 12 --n_embd 768 --ctx_len 1024 --mini_batch_size 16 --batch_size 1024 \\
        --lr 0.01 --token_budget 10_000_000_000
    python train_encoder.py --config configs/sample.yaml output_dir=runs/sample max_steps=20

Outputs go to output_dir (= <out_dir>/<save_name>): checkpoints/step_XXXXXXXX (the same command resumes from the
newest valid one), metrics.jsonl, log_file.txt, loss_curve.png, final_model/ (config.json, model.safetensors,
tokenizer.model) and run_finished.json once the run is over.
"""

# Settings that fix the data stream and the step plan: a resumed run must share them with its checkpoint.
PLAN_FIELDS = ("batch_size", "mini_batch_size", "token_budget", "ramp_fraction", "warmup_fraction", "seed",
               "source_weights")  # fmt: skip

# Deprecated setting names (still accepted, with a one-line note).
RENAMED = {"keep_last_k": "keep_last"}


def setting(default, doc: str = ""):
    return dataclasses.field(default=default, metadata={"help": doc})


@dataclasses.dataclass
class TrainConfig:
    """All settings of one training run (names and meanings of the original train_encoder.py's flags, plus ours).

    Units: token_budget, test_freq, save_freq in tokens (summed over ranks); batch sizes in sequences."""

    # the flags of the original train_encoder.py, same names and meanings
    mini_batch_size: int = setting(16, "sequences per rank per micro-step")
    batch_size: int = setting(1024, "global batch in sequences (after the ramp)")
    n_head: int = setting(12)
    n_embd: int = setting(768)
    n_layer: int = setting(12)
    ctx_len: int = setting(1024, "tokens per row; at most the smallest source's tokens")
    dropout: float = setting(0.0)
    lr: float = setting(1e-2, "muP base LR, scaled by sqrt(batch_size)/32 unless --force_lr")
    beta1: float = setting(0.9)
    beta2: float = setting(0.98)
    epsilon: float = setting(1e-8)
    weight_decay: float = setting(0.01)
    token_budget: float = setting(1e9, "tokens to train on, ramp included (approx.)")
    test_freq: float = setting(1e7, "validate every this many tokens (0: at the end)")
    save_freq: float = setting(1e8, "checkpoint every this many tokens (0: at the end)")
    disable_flash: bool = setting(False, "use the plain math attention path")
    wandb_project_name: str | None = setting(None, "log to this wandb project (off when unset)")
    base_dir: Path | None = setting(None, "encoded data: train/, val/ and tokenizer.model (required)")
    force_lr: bool = setting(False, "use --lr as given, without the batch-size scaling")
    # additions of this recipe
    output_dir: Path = setting(Path("runs/omnibiota"), "the run folder (= <out_dir>/<save_name>)")
    tokenizer: Path | None = setting(None, "sentencepiece model (default: <base_dir>/tokenizer.model)")
    ramp_fraction: float = setting(0.05, "share of steps over which the batch grows")
    warmup_fraction: float = setting(0.0, "share of steps of linear LR warmup")
    grad_clip: float = setting(1.0, "max gradient norm (0: off)")
    source_weights: str | None = setting(None, "e.g. genbank=0.8,uniprot=0.2 (default: by token count)")
    val_batches: int = setting(8, "mini-batches per rank in each validation")
    log_freq: int = setting(10, "log the training loss every this many steps")
    seed: int = setting(0)
    max_steps: int | None = setting(None, "end the run at this step (final model written)")
    resume: str = setting("auto", "auto: newest valid checkpoint, else fresh; none: fresh (refused when checkpoints"
                          " exist); or a checkpoint folder")  # fmt: skip
    init_from: Path | None = setting(None, "final_model/ folder whose weights start a fresh run")
    keep_last: int = setting(2, "checkpoints kept (older ones are removed)")
    compile: bool = setting(False, "torch.compile each transformer block (off: slower on CPU, BENCHMARKS)")
    activation_checkpointing: bool = setting(False, "recompute each block's activations in backward")

    @property
    def tokenizer_file(self) -> Path:
        return Path(self.tokenizer) if self.tokenizer else Path(self.base_dir) / "tokenizer.model"

    def plan_settings(self) -> dict:
        return {name: getattr(self, name) for name in PLAN_FIELDS}


def build_parser() -> argparse.ArgumentParser:
    """One flag per setting, generated from TrainConfig (defaults stay in the dataclass: flags left out are not
    set), plus the original's run-folder flags and the deprecated `--keep_last_k`."""
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=None, help="YAML file of settings (e.g. configs/sample.yaml)")
    for field in dataclasses.fields(TrainConfig):
        help = f"{field.metadata['help']} (default: {field.default})".lstrip()
        if field.type == "bool":
            p.add_argument(f"--{field.name}", action="store_true", default=argparse.SUPPRESS, help=help)
        else:
            p.add_argument(f"--{field.name}", type=flag_type(field), default=argparse.SUPPRESS, help=help)
    p.add_argument("--out_dir", type=Path, default=argparse.SUPPRESS, help="parent folder of the run folder")
    p.add_argument("--save_name", default=argparse.SUPPRESS, help="run name: the run folder is <out_dir>/<save_name>")
    p.add_argument("--keep_last_k", type=int, default=argparse.SUPPRESS, help="old name of --keep_last")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. max_steps=20")
    return p


def flag_type(field: dataclasses.Field):
    """The argparse type of a field annotated as e.g. "int | None" (annotations are strings here)."""
    name = field.type.split("|")[0].strip()
    return {"int": int, "float": float, "str": str, "Path": Path}[name]


def as_override(key: str, value) -> str:
    # strings are quoted so that YAML keeps e.g. "yes", "1e3" or "null" as the text the user typed
    text = json.dumps(str(value)) if isinstance(value, (str, Path)) else repr(value)
    return f"{key}={text}"


def parse_config(argv=None) -> TrainConfig:
    """Flags (and --config, key=value overrides) → a checked TrainConfig; raises ConfigError (one line)."""
    args = vars(build_parser().parse_args(argv))
    config_file, overrides = args.pop("config"), args.pop("overrides")
    out_dir, save_name = args.pop("out_dir", None), args.pop("save_name", None)
    flags = [as_override(key, value) for key, value in args.items()]
    config = load_config(TrainConfig, config_file, [*flags, *overrides], renamed=RENAMED)
    if save_name is not None and (not save_name or Path(save_name).name != save_name):
        raise ConfigError(f"--save_name {save_name!r} must be a plain folder name")
    if out_dir is not None or save_name is not None:
        parent = Path(out_dir) if out_dir is not None else Path(config.output_dir).parent
        config.output_dir = parent / (save_name if save_name is not None else Path(config.output_dir).name)
    validate(config)
    return config


def validate(c: TrainConfig) -> None:
    """Every check of the settings alone (the data-dependent ones follow once the data is open), in one place."""
    if c.base_dir is None:
        raise ConfigError("--base_dir is required (the encoded data: train/, val/, tokenizer.model)")
    check_settings(
        [(f"--{name}", getattr(c, name), "count") for name in
         ("mini_batch_size", "batch_size", "n_head", "n_embd", "n_layer", "ctx_len", "val_batches", "log_freq",
          "keep_last")]
        + [("--token_budget", c.token_budget, "positive")]
        # --lr 0 freezes the weights (a check of --init_from)
        + [(f"--{name}", getattr(c, name), "non_negative") for name in
           ("lr", "epsilon", "weight_decay", "grad_clip", "test_freq", "save_freq")]
        + [(f"--{name}", getattr(c, name), "unit_interval_right_open") for name in
           ("dropout", "beta1", "beta2", "ramp_fraction", "warmup_fraction")]
        + [("--seed", c.seed, "count0")]
        + ([("--max_steps", c.max_steps, "count")] if c.max_steps is not None else [])
    )  # fmt: skip
    if c.ctx_len < 2:  # a window needs its modality token and at least one residue to mask
        raise ConfigError(f"--ctx_len={c.ctx_len} must be at least 2")
    if c.n_embd % c.n_head or (c.n_embd // c.n_head) % 2:
        raise ConfigError(f"--n_embd {c.n_embd} must split into {c.n_head} heads of even size (rotary)")
    if c.batch_size % c.mini_batch_size:
        raise ConfigError(f"--batch_size {c.batch_size} must be a multiple of --mini_batch_size {c.mini_batch_size}")
    if c.resume == "":
        raise ConfigError("--resume must be auto, none or a checkpoint folder")
    if c.init_from is not None and not (Path(c.init_from) / "model.safetensors").is_file():
        raise ConfigError(f"--init_from {c.init_from}: no model.safetensors there (give a final_model/ folder)")


def check_world_size(config: TrainConfig, world_size: int) -> None:
    """The global batch must split evenly over the ranks' micro-batches (after the ramp)."""
    per_micro_step = config.mini_batch_size * world_size
    if config.batch_size % per_micro_step:
        raise ConfigError(
            f"--batch_size {config.batch_size} must be a positive multiple of world size {world_size} x"
            f" --mini_batch_size {config.mini_batch_size} = {per_micro_step}"
        )
