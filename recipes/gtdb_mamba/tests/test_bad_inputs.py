"""Bad inputs: a clear error and exit 1 where the run cannot go on, a warning and a skip for one bad genome."""

import gzip
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    RECIPE_DIR,
    TWO_STEPS,
    compose_config,
    copy_two_step_run,
    metadata_files,
    tiny_overrides,
    write_fasta_gz,
)

from data import prepare_data
from preprocess import GtdbDataError, read_metadata


class _Ctx:  # a single-process distributed context, as setup_distributed returns for plain python
    rank, local_rank, world_size, is_main, is_distributed = 0, 0, 1, True, False


@pytest.fixture()
def fixture_copy(gtdb_fixture, tmp_path):
    return shutil.copytree(gtdb_fixture, tmp_path / "release")


def test_metadata_missing_column_names_file_and_column(fixture_copy):
    bac = fixture_copy / "bac120_metadata_r0.tsv"
    lines = bac.read_text().splitlines()
    bac.write_text("\n".join(line.replace("checkm_contamination", "contamination") for line in lines) + "\n")
    with pytest.raises(
        GtdbDataError, match=r"bac120_metadata_r0.tsv: metadata is missing column\(s\) checkm_contamination"
    ):
        read_metadata(metadata_files(fixture_copy), fixture_copy / "database", "checkm_contamination", 5)


def test_non_numeric_contamination_names_the_record(fixture_copy):
    bac = fixture_copy / "bac120_metadata_r0.tsv"
    header, first, *rest = bac.read_text().splitlines()
    fields = first.split("\t")
    fields[5] = "high"
    bac.write_text("\n".join([header, "\t".join(fields), *rest]) + "\n")
    with pytest.raises(GtdbDataError, match=rf"record {fields[0]}: checkm_contamination='high' is not a number"):
        read_metadata(metadata_files(fixture_copy), fixture_copy / "database", "checkm_contamination", 5)


def test_bad_genomes_are_skipped_and_counted(fixture_copy, tmp_path, caplog, monkeypatch):
    for name in ("preprocess", "data", "test"):  # an in-process training run may have set propagate=False
        monkeypatch.setattr(logging.getLogger(name), "propagate", True)
    cfg = compose_config(tiny_overrides(fixture_copy, tmp_path))
    from preprocess import cached_family_split

    split = cached_family_split(
        list(cfg.data.metadata_files),
        cfg.data.genomes_root,
        tmp_path / "probe",
        seed=cfg.seed,
        contamination_column="checkm_contamination",
        max_contamination=5.0,
        val_species_target=6,
        n_val_genomes=8,
        family_count_cap=100,
        val_per_genus=10,
        train_per_genus=20,
    )
    paths = [entry.path for entry in split.train[:5]]
    Path(paths[0]).unlink()  # missing
    Path(paths[1]).write_bytes(b"\x1f\x8b not really gzip")  # damaged gzip
    write_fasta_gz(Path(paths[2]), [])  # empty
    write_fasta_gz(Path(paths[3]), [("c", "N" * 500)])  # only N
    write_fasta_gz(Path(paths[4]), [("c", "ACGT" * 10)])  # shorter than the 150 bp fragment
    with caplog.at_level(logging.WARNING):
        _, train_sampler, _ = prepare_data(cfg, _Ctx(), logging.getLogger("test"))
    assert len(train_sampler) == len(split.train) - 5
    # A skipped genome is not a class: classes are numbered densely over the genomes actually indexed and usable.
    assert train_sampler.n_classes == len(split.train) - 5
    assert sorted(set(train_sampler.labels.tolist())) == list(range(len(split.train) - 5))
    messages = "\n".join(caplog.messages)
    reasons = (
        "file not found",
        "not a gzip file",
        "no records (empty file)",
        "all 1 contig(s) are only N",
        "shorter than the 150 bp",
    )
    for reason in reasons:
        assert reason in messages
    assert f"{len(split.train) - 5} training classes" in messages
    assert "skipped 5 training and 0 validation genomes" in messages


def test_fewer_validation_genomes_than_requested(fixture_copy, tmp_path):
    cfg = compose_config([*tiny_overrides(fixture_copy, tmp_path), "data.n_val_genomes=50"])
    with pytest.raises(GtdbDataError, match="only 8 validation genomes .* data.n_val_genomes=50"):
        prepare_data(cfg, _Ctx(), logging.getLogger("test"))


def test_zero_training_classes(fixture_copy, tmp_path):
    cfg = compose_config(
        [*tiny_overrides(fixture_copy, tmp_path), "data.val_species_target=1000", "data.n_val_genomes=4"]
    )
    with pytest.raises(GtdbDataError, match="no training classes left"):
        prepare_data(cfg, _Ctx(), logging.getLogger("test"))


def test_truncated_gzip_is_skipped(tmp_path):
    from preprocess import GenomeSkipped, read_genome_contigs

    path = tmp_path / "g.fna.gz"
    path.write_bytes(gzip.compress(b">c\n" + b"ACGT" * 1000)[:-20])
    with pytest.raises(GenomeSkipped, match="truncated"):
        read_genome_contigs(path)
    write_fasta_gz(path, [("c", "ACGU")])
    with pytest.raises(GenomeSkipped, match="record c: 'U' not DNA"):
        read_genome_contigs(path)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (">r1\nAC-GT\n", "record r1: '-' not DNA"),
        (">r1\nAC.GT\n", "record r1: '.' not DNA"),
        (">   \nACGT\n", "record 1: empty FASTA header"),
    ],
)
def test_dna_contract_shared_with_plant_lm(tmp_path, text, problem):
    """Alignment gaps and blank headers are refused, the same as plant_lm's reader (one DNA contract, issue 18)."""
    from preprocess import GenomeSkipped, read_genome_contigs

    path = tmp_path / "g.fna"
    path.write_text(text)
    with pytest.raises(GenomeSkipped, match=f"^{re.escape(f'{path}: {problem}')}$"):
        read_genome_contigs(path)


def test_empty_fasta_header_skips_the_genome(tmp_path, caplog):
    from preprocess import GenomeEntry, GenomeSkipped, build_or_load_index, read_genome_contigs

    bad_char = write_fasta_gz(tmp_path / "a.fna.gz", [("", "ACGU")])
    second = write_fasta_gz(tmp_path / "b.fna.gz", [("c1", "ACGT" * 10), ("", "ACGT" * 10)])
    good = write_fasta_gz(tmp_path / "c.fna.gz", [("c1", "ACGT" * 10)])
    for path, record in ((bad_char, 1), (second, 2)):
        with pytest.raises(GenomeSkipped, match=f"record {record}: empty FASTA header"):
            read_genome_contigs(path)
    entries = [GenomeEntry(f"GCA_00000000{i}.1", "F", "G", str(p)) for i, p in enumerate((bad_char, second, good))]
    with caplog.at_level(logging.WARNING):
        index = build_or_load_index(entries, [0, 1, 2], tmp_path / "cache", "t", show_progress=False)
    assert index.accessions == ["GCA_000000002.1"]
    assert sorted(index.skipped) == ["GCA_000000000.1", "GCA_000000001.1"]
    assert f"genome GCA_000000000.1 skipped: {bad_char}: record 1: empty FASTA header" in caplog.text


@pytest.mark.smoke
def test_cli_prints_one_line_error_and_exits_1_and_takes_the_old_names(tmp_path):
    """The process itself (the other CLI tests call train.main in-process); the seed's setting names still work."""
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--config-name",
            "sample",
            f"data.metadata_files=[{tmp_path / 'nope.tsv'}]",
            f"run_dir={tmp_path / 'run'}",
            "train.checkpoint_every=3",
            "train.keep_last_k=1",
            f"data.cache_dir={tmp_path / 'cache'}",
        ],
        cwd=RECIPE_DIR,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"note: command line: '{old}' is now called '{new}'; the old name still works for now"
        for old, new in (("run_dir", "output_dir"), ("train.checkpoint_every", "train.save_every"),
                         ("train.keep_last_k", "train.keep_last"))
    ] + [f"error: {tmp_path / 'nope.tsv'}: metadata file not found"]  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_old_names_land_on_the_new_settings():
    from sweep import parse_cli

    cli = parse_cli(["run_dir=a", "train.checkpoint_every=3", "+train.keep_last_k=1", "train.lr=0.1"])
    assert cli.overrides == ["output_dir=a", "train.save_every=3", "+train.keep_last=1", "train.lr=0.1"]


def _cli(overrides: list[str], capsys) -> tuple[int, str]:
    """`python train.py --config-name sample ...` in this process: (exit code, stderr)."""
    import train

    capsys.readouterr()
    code = train.main(["--config-name", "sample", *overrides])
    return code, capsys.readouterr().err


def test_missing_required_setting_is_one_line(tmp_path, capsys):
    import train

    assert train.main([f"output_dir={tmp_path / 'run'}", "model.norm=batchnorm"]) == 1
    assert (
        capsys.readouterr().err.strip()
        == "error: required setting(s) not given: data.genomes_root, data.metadata_files (pass them as key=value)"
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.log_every=0", "train.log_every=0 must be an integer >= 1"),
        ("train.save_every=0", "train.save_every=0 must be an integer >= 1"),
        ("val.batch_size=0", "val.batch_size=0 must be an integer >= 1"),
        ("data.kmer=0", "data.kmer=0 must be an integer >= 1"),
        ("data.val_tokens=1000", "data.val_tokens=1000 tokens needs fragments of >= 1004 bp, data.fragment_bp is 150"),
        ("train.lr=-1", "train.lr=-1.0 must be >= 0"),
        ("train.lr=nan", "train.lr=nan must be a finite number"),
        ("data.max_n_fraction=2", "data.max_n_fraction=2.0 must be in [0, 1]"),
    ],
)
def test_bad_counts_fail_before_anything_is_written(gtdb_fixture, tmp_path, capsys, override, message):
    code, err = _cli([*tiny_overrides(gtdb_fixture, tmp_path), override], capsys)
    assert code == 1 and err.strip() == f"error: {message}"
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.grad_accumulation=0", "train.grad_accumulation=0 must be an integer >= 1"),
        ("val.fragments_per_genome=1", "val.fragments_per_genome=1 must be an integer >= 2"),
        ("data.n_val_genomes=1", "data.n_val_genomes=1 must be an integer >= 2"),
        ("data.num_workers=-1", "data.num_workers=-1 must be an integer >= 0"),
        ("model.d_model=0", "model.d_model=0 must be an integer >= 1"),
        (
            "train.log_every=2.5",
            "Error merging override train.log_every=2.5; Value '2.5' of type 'float' could not be converted to Integer",
        ),  # fmt: skip
        ("train.stop_at_step=0", "train.stop_at_step=0 must be an integer >= 1"),
        ("head.t_momentum=1.5", "head.t_momentum=1.5 must be in [0, 1]"),
        ("data.train_tokens=200", "data.train_tokens=200 tokens needs fragments of >= 204 bp"),
    ],
)
def test_check_config_rejects_bad_values(gtdb_fixture, tmp_path, override, message):
    from biorecipes_shared import ConfigError
    from config import validate as check_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        check_config(compose_config([*tiny_overrides(gtdb_fixture, tmp_path), override]))


@pytest.mark.parametrize(
    "change",
    ["model.d_model=8", "data.val_species_target=12"],  # another width; 3 held-out families: 36 classes, not 40
)
def test_resume_with_another_model_is_one_line(gtdb_fixture, two_step_run, tmp_path, capsys, change):
    copy_two_step_run(two_step_run, tmp_path)
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000002"
    assert checkpoint.is_dir()
    code, err = _cli([*tiny_overrides(gtdb_fixture, tmp_path), "train.max_steps=4", change], capsys)
    assert code == 1 and "Traceback" not in err and "HYDRA_FULL_ERROR" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: {checkpoint}: cannot resume: the checkpoint does not fit this model/config (")
    assert last.endswith("); use a new output_dir")


def test_resume_error_from_load_state_dict_is_one_line(gtdb_fixture, two_step_run, tmp_path, monkeypatch):
    import biorecipes_shared.training_run
    import train
    from biorecipes_shared import CheckpointError

    overrides = [*tiny_overrides(gtdb_fixture, tmp_path), *TWO_STEPS]
    copy_two_step_run(two_step_run, tmp_path)

    def load_state_dict_fails(*args, **kwargs):  # what torch raises when nothing checked the shapes first
        raise RuntimeError(
            "Error(s) in loading state_dict for EmbedderWithHead:\n\tsize mismatch for head.weight: copying a param "
            "with shape torch.Size([30, 16]) from checkpoint, the shape in current model is torch.Size([20, 16])."
        )

    monkeypatch.setattr(biorecipes_shared.training_run, "load_checkpoint", load_state_dict_fails)
    with pytest.raises(CheckpointError) as caught:
        train.run(compose_config([*overrides, "train.max_steps=4"]))
    message = str(caught.value)
    assert "\n" not in message and "size mismatch for head.weight" in message
    assert message.startswith(f"{tmp_path / 'run' / 'checkpoints' / 'step_00000002'}: cannot resume: ")
