"""Vocabularies and gene-median dictionaries: this recipe's text/JSON files and the published Geneformer pickles.

The published Geneformer models ship `token_dictionary.pkl` (gene id -> token id) and `gene_median_dictionary.pkl`
(gene id -> non-zero median) as pickled dicts. Unpickling runs code named by the file, so they are read with
`SafeUnpickler`, which builds only plain containers and numbers and refuses every other object.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import pickle
import re
from pathlib import Path

PAD, MASK, CLS, EOS = "<pad>", "<mask>", "<cls>", "<eos>"
SPECIAL_TOKENS = {"v1": [PAD, MASK], "v2": [PAD, MASK, CLS, EOS]}
# An Ensembl stable id (ENSG, ENSMUSG, ENSDARG, ... followed by 11 digits) with a ".<version>" suffix.
ENSEMBL_VERSIONED = re.compile(r"(ENS[A-Z]*\d{11})\.\d+", re.IGNORECASE)
# numpy scalars (np.float32 medians, np.int64 token ids) pickle as a call to numpy's scalar constructor with a dtype;
# these two are admitted (numpy 1.x and 2.x spell the module differently) and their results checked to be numbers.
NUMPY_SCALAR_GLOBALS = {
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "dtype"),
}


class DataError(ValueError):
    """A problem with the user's data files (counts, vocabulary, tokens); the message names the file and record."""


def without_version(gene: str, keep_version: bool = False) -> str:
    """`ENSG00000001000.7` -> `ENSG00000001000` (any Ensembl stable id); other ids only lose surrounding spaces."""
    gene = str(gene).strip()
    match = None if keep_version else ENSEMBL_VERSIONED.fullmatch(gene)
    return match.group(1) if match else gene


def canonical_gene_id(gene: str, keep_version: bool = False) -> str:
    """The id used for lookups: upper-cased (as the original tokenizer does) and without an Ensembl version.

    `ENSG00000001000.7` and `ensg00000001000` both become `ENSG00000001000`; gene symbols only change case."""
    return without_version(gene, keep_version).upper()


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (streamed: vocabularies and median files can be large)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class SafeUnpickler(pickle.Unpickler):
    """Loads only what pickle opcodes build by themselves (dict, list, tuple, str, bytes, int, float, bool, None)
    plus numpy scalar reconstruction; any other global (os.system, builtins.eval, ...) raises before it is called."""

    def find_class(self, module: str, name: str):
        if (module, name) in NUMPY_SCALAR_GLOBALS:
            import numpy  # noqa: F401  (only when a file really holds numpy scalars)

            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name} (only plain dicts of numbers are accepted)")


def load_pickled_dict(path: str | Path, what: str) -> dict:
    """A pickled {str: number} dict through SafeUnpickler; DataError for anything else (never runs its code)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            value = SafeUnpickler(io.BytesIO(handle.read())).load()
    except FileNotFoundError:
        raise DataError(f"{path}: no such {what} file") from None
    except Exception as error:  # UnpicklingError, EOFError, ValueError, ... from a damaged or hostile file
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DataError(f"{path}: not a usable {what} pickle ({reason})") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: a {what} pickle must hold a dict, not {type(value).__name__}")
    for key, number in value.items():
        if not isinstance(key, str) or isinstance(number, bool) or not _is_number(number):
            raise DataError(f"{path}: entry {key!r} -> {number!r} is not gene id -> number")
    return {key: number.item() if hasattr(number, "item") else number for key, number in value.items()}


def _is_number(value) -> bool:
    if isinstance(value, (int, float)):
        return True
    return hasattr(value, "dtype") and getattr(value.dtype, "kind", "") in "iuf" and getattr(value, "ndim", 1) == 0


def read_text(path: str | Path, what: str) -> str:
    """The text of a UTF-8 file (a leading byte-order mark dropped). DataError naming the file when it is missing,
    unreadable, not UTF-8 (e.g. Latin-1, UTF-16, a pickle under a .txt/.json name) or binary (NUL bytes)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such {what} file")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read the {what} file ({error.strerror or error})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line, byte = data[: error.start].count(b"\n") + 1, data[error.start : error.start + 1]
        raise DataError(
            f"{path}: the {what} file is not UTF-8 text (line {line}, byte {error.start} is {byte!r}); save it as "
            f"UTF-8{'' if what == 'gene medians' else ', or name a pickled dictionary .pkl'}"
        ) from None
    if "\0" in text:
        line = text[: text.index("\0")].count("\n") + 1
        raise DataError(f"{path}: the {what} file holds NUL bytes (line {line}); it is binary, not UTF-8 text")
    return text


def read_vocab(path: str | Path) -> list[str]:
    """Tokens in id order: `vocab.txt` (one token per line, UTF-8) or a pickled token dictionary {token: id}.

    Raises DataError (one line naming the file, and the line where it applies) for a missing, unreadable, non-UTF-8
    or binary file, an empty or repeated token, or a vocabulary without <pad> first and <mask>."""
    path = Path(path)
    if path.suffix == ".pkl":
        return vocab_from_token_dictionary(load_pickled_dict(path, "token dictionary"), path)
    tokens = read_text(path, "vocabulary").splitlines()
    if not tokens or tokens[0] != PAD or MASK not in tokens:
        raise DataError(f"{path}: a vocabulary starts with {PAD} and contains {MASK}")
    seen: dict[str, int] = {}
    for line, token in enumerate(tokens, start=1):
        if not token.strip():
            raise DataError(f"{path}: line {line} is empty; a vocabulary has one token per line")
        if token in seen:
            raise DataError(f"{path}: line {line} repeats the token {token!r} of line {seen[token]}")
        seen[token] = line
    return tokens


def vocab_from_token_dictionary(token_ids: dict, path: Path) -> list[str]:
    """{token: id} with ids 0..n-1, each once -> tokens in id order; DataError naming the first gap or repeat."""
    by_id: dict[int, str] = {}
    for token, index in token_ids.items():
        if not float(index).is_integer() or index < 0:
            raise DataError(f"{path}: token {token!r} has id {index!r}, not a non-negative integer")
        if int(index) in by_id:
            raise DataError(f"{path}: tokens {by_id[int(index)]!r} and {token!r} share id {int(index)}")
        by_id[int(index)] = token
    missing = sorted(set(range(len(by_id))) - set(by_id))
    if missing:
        raise DataError(f"{path}: token ids are not 0..{len(by_id) - 1} (id {missing[0]} is missing)")
    tokens = [by_id[i] for i in range(len(by_id))]
    if not tokens or tokens[0] != PAD or MASK not in tokens:
        raise DataError(f"{path}: a token dictionary needs {PAD} as id 0 and a {MASK} token")
    return tokens


def read_gene_medians(path: str | Path) -> dict[str, float]:
    """{gene id: non-zero median}: this recipe's `gene_medians.json` or a pickled `gene_median_dictionary.pkl`."""
    path = Path(path)
    if path.suffix == ".pkl":
        medians = load_pickled_dict(path, "gene median dictionary")
    else:
        text = read_text(path, "gene medians")
        try:
            medians = json.loads(text)
        except ValueError as error:
            raise DataError(f"{path}: not a JSON file of gene medians ({error})") from None
    if not isinstance(medians, dict):
        raise DataError(f"{path}: expected a dictionary of gene id -> positive median, not {type(medians).__name__}")
    for gene, value in medians.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise DataError(f"{path}: gene {gene!r} has median {value!r}; expected gene id -> positive median")
    return {str(gene): float(value) for gene, value in medians.items()}


def lookup_table(names: list[str] | dict, keep_version: bool, source: str | Path) -> dict[str, object]:
    """Map canonical gene id -> the entry of `names` (a vocabulary list: its index; a dict: its value).

    Two entries that become the same id (e.g. `ENSG...1.7` and `ENSG...1.8`) would make a lookup ambiguous."""
    items = names.items() if isinstance(names, dict) else ((name, i) for i, name in enumerate(names))
    table: dict[str, object] = {}
    original: dict[str, str] = {}
    for name, value in items:
        if name.startswith("<") and name.endswith(">"):
            continue
        key = canonical_gene_id(name, keep_version)
        if key in table:
            raise DataError(
                f"{source}: {original[key]!r} and {name!r} are the same gene once upper-cased and without a version "
                "suffix; pass --keep-version or deduplicate the file"
            )
        table[key], original[key] = value, name
    return table
