"""Vocabulary and gene-median files that are not UTF-8 text, or otherwise garbled (issue 18 item 5): one line naming
the file and exit 1 from every entry point that reads them (preprocess.py, train.py, embed.py, evaluate.py)."""

from __future__ import annotations

import pickle
import shutil
import subprocess
import sys

import pytest
from conftest import RECIPE_DIR, SAMPLE_DIR, tiny_overrides

import embed
import evaluate
import train
from dictionaries import DataError, read_gene_medians, read_vocab
from preprocess import main as preprocess_main

VOCAB_TEXT = (SAMPLE_DIR / "vocab.txt").read_text()
GENES = VOCAB_TEXT.splitlines()[2:]


def bad_vocab_bytes(case: str) -> bytes:
    """The sample vocabulary spoiled the ways users spoil it."""
    return {
        "latin-1": ("<pad>\n<mask>\nGène\n" + "\n".join(GENES) + "\n").encode("latin-1"),
        "utf-16": VOCAB_TEXT.encode("utf-16"),
        "pickle": pickle.dumps({token: i for i, token in enumerate(VOCAB_TEXT.split())}),
        "nul": VOCAB_TEXT.encode()[:40] + b"\0\0\0" + VOCAB_TEXT.encode()[40:],
        "empty line": ("<pad>\n<mask>\n\n" + "\n".join(GENES) + "\n").encode(),
        "repeat": ("<pad>\n<mask>\n" + "\n".join(GENES + GENES[:1]) + "\n").encode(),
    }[case]


VOCAB_MESSAGES = {
    "latin-1": "the vocabulary file is not UTF-8 text (line 3, byte 14 is b'\\xe8')",
    "utf-16": "the vocabulary file is not UTF-8 text (line 1, byte 0 is b'\\xff')",
    "pickle": "the vocabulary file is not UTF-8 text (line 1, byte 0 is b'\\x80'); save it as UTF-8, or name a pickled",
    "nul": "the vocabulary file holds NUL bytes (line ",
    "empty line": "line 3 is empty; a vocabulary has one token per line",
    "repeat": f"line {len(GENES) + 3} repeats the token {GENES[0]!r} of line 3",
}


@pytest.mark.parametrize("case", list(VOCAB_MESSAGES))
def test_read_vocab_refuses_garbled_files_in_one_line(tmp_path, case):
    path = tmp_path / "vocab.txt"
    path.write_bytes(bad_vocab_bytes(case))
    with pytest.raises(DataError) as error:
        read_vocab(path)
    assert str(error.value).startswith(f"{path}: {VOCAB_MESSAGES[case]}") and "\n" not in str(error.value)


def test_byte_order_mark_is_accepted(tmp_path):
    (tmp_path / "vocab.txt").write_bytes(b"\xef\xbb\xbf" + VOCAB_TEXT.encode())
    assert read_vocab(tmp_path / "vocab.txt") == VOCAB_TEXT.splitlines()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"Gène": 2.0}'.encode("latin-1"), "the gene medians file is not UTF-8 text (line 1, byte 3 is b'\\xe8')"),
        (b'{"A": NaN}', "gene 'A' has median nan; expected gene id -> positive median"),
        (b'{"A": 1.0', "not a JSON file of gene medians (Expecting"),
    ],
)
def test_read_gene_medians_refuses_garbled_files(tmp_path, content, message):
    (tmp_path / "medians.json").write_bytes(content)
    with pytest.raises(DataError, match="^" + str(tmp_path / "medians.json").replace("\\", "\\\\")) as error:
        read_gene_medians(tmp_path / "medians.json")
    assert message in str(error.value)


@pytest.mark.parametrize("flag", ["--vocab", "--token-dictionary", "--gene-medians"])
def test_preprocess_cli(tmp_path, capsys, flag):
    bad = tmp_path / ("medians.json" if flag == "--gene-medians" else "vocab.txt")
    bad.write_bytes('{"Gène": 2.0}'.encode("latin-1") if flag == "--gene-medians" else bad_vocab_bytes("latin-1"))
    out = tmp_path / "out"
    code = preprocess_main([str(SAMPLE_DIR / "pbmc500_counts.h5ad"), "--out-dir", str(out), flag, str(bad)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith(f"error: {bad}: the "), lines
    assert "is not UTF-8 text" in lines[0] and not out.exists()


def test_pickled_token_dictionary_with_bytes_that_are_not_utf8(tmp_path):
    data = pickle.dumps({"<pad>": 0, "<mask>": 1, "GENE": 2}, protocol=4).replace(b"GENE", b"G\xe8NE")
    (tmp_path / "token_dictionary.pkl").write_bytes(data)
    with pytest.raises(DataError, match=r"token_dictionary.pkl: not a usable token dictionary pickle \('utf-8' codec"):
        read_vocab(tmp_path / "token_dictionary.pkl")


def train_overrides(tmp_path):
    bad = tmp_path / "vocab.txt"
    bad.write_bytes(bad_vocab_bytes("latin-1"))
    return bad, tiny_overrides(tmp_path / "run") + [
        f"data.train_path={SAMPLE_DIR / 'cells.parquet'}",
        f"data.vocab_path={bad}",
    ]


def test_train_in_process(tmp_path, capsys):
    bad, overrides = train_overrides(tmp_path)
    assert train.main(overrides) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        f"error: {bad}: the vocabulary file is not UTF-8 text (line 3, byte 14 is b'\\xe8'); save it as "
        "UTF-8, or name a pickled dictionary .pkl"
    ]
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow  # a fresh interpreter importing torch and transformers: ~15 s on 2 loaded cores
def test_train_as_a_command(tmp_path):
    bad, overrides = train_overrides(tmp_path)
    result = subprocess.run([sys.executable, "train.py", *overrides], cwd=RECIPE_DIR, capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: the vocabulary file is not UTF-8 text"), lines
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from test_embed import VOCAB, tiny_model

    return tiny_model(tmp_path_factory.mktemp("model"), len(VOCAB))


def test_embed_and_evaluate(model_dir, tmp_path, capsys):
    bad = tmp_path / "vocab.txt"
    bad.write_bytes(bad_vocab_bytes("latin-1"))
    cells = str(SAMPLE_DIR / "cells.parquet")
    assert embed.main([str(model_dir), cells, "--vocab", str(bad), "--out", str(tmp_path / "e.npy")]) == 1
    assert evaluate.main([str(model_dir), "--vocab", str(bad)]) == 1
    folder = tmp_path / "model_with_bad_vocab"  # a model folder's own vocab.txt, read when --vocab is not given
    shutil.copytree(model_dir, folder)
    (folder / "vocab.txt").write_bytes(bad_vocab_bytes("utf-16"))
    assert embed.main([str(folder), cells, "--out", str(tmp_path / "e.npy")]) == 1
    assert embed.main([str(folder), cells, "--vocab", str(SAMPLE_DIR / "vocab.txt"), "--out", "e.npy"]) == 1
    assert evaluate.main([str(folder)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(": the vocabulary file")[0] for line in lines] == [f"error: {bad}"] * 2 + [
        f"error: {folder / 'vocab.txt'}"
    ] * 3, lines
    assert all("is not UTF-8 text" in line for line in lines)
    assert not list(tmp_path.glob("e.*"))


def test_a_published_folder_with_a_garbled_vocabulary_is_one_line(tmp_path):
    from pretrained import check_folder_vocab

    (tmp_path / "vocab.txt").write_bytes(bad_vocab_bytes("latin-1"))
    with pytest.raises(DataError, match=r"vocab.txt: the vocabulary file is not UTF-8 text"):
        check_folder_vocab(tmp_path, ["<pad>", "<mask>", "g"], tmp_path / "data_vocab.txt", 3)
