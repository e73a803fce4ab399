"""Train the shared DNA/RNA/protein sentencepiece model on a sample of record shards.

    python -m preprocessing.train_tokenizer data/records/*.tsv.gz --model_file data/tokenizer.model \
        --vocab_size 65536 --model_type bpe

Sequences are cut into chunk_length windows and an equal-sized random sample is kept per modality (a reservoir),
so protein pieces are learnt even when DNA is most of the data.
"""

import argparse
import io
import os
import random
import re
import sys
from pathlib import Path

import sentencepiece as spm

from errors import PreprocessError, run_cli
from preprocessing.preprocess_genbank import IUPAC_NUCLEOTIDES
from preprocessing.preprocess_uniprot import AMINO_ACIDS
from preprocessing.shards import iter_shard_records, remove_empty_dirs
from tokenizer import TRAINER_SPECIALS, OmniTokenizer


def sample_training_text(shard_paths, chunk_length: int, sentences_per_modality: int, seed: int) -> list[str]:
    """Reservoir-sample up to sentences_per_modality windows of each modality present in the shards."""
    rng = random.Random(seed)
    reservoirs: dict[str, list[str]] = {}
    seen: dict[str, int] = {}
    for modality, _, sequence in iter_shard_records(shard_paths):
        reservoir = reservoirs.setdefault(modality, [])
        for start in range(0, len(sequence), chunk_length):
            window = sequence[start : start + chunk_length]
            seen[modality] = seen.get(modality, 0) + 1
            if len(reservoir) < sentences_per_modality:
                reservoir.append(window)
            else:
                slot = rng.randrange(seen[modality])
                if slot < sentences_per_modality:
                    reservoir[slot] = window
    sentences = [window for reservoir in reservoirs.values() for window in reservoir]
    if not sentences:
        raise PreprocessError("no records in the given shards")
    # one line with every letter, so each gets a piece even when the sample lacks it (e.g. U without RNA
    # records); sentencepiece's required_chars does not add characters that never occur
    sentences.append("".join(sorted(IUPAC_NUCLEOTIDES | AMINO_ACIDS)))
    rng.shuffle(sentences)
    return sentences


def train_tokenizer(
    shard_paths,
    model_file: str | Path,
    vocab_size: int = 65536,
    model_type: str = "bpe",
    chunk_length: int = 2048,
    sentences_per_modality: int = 200_000,
    seed: int = 0,
    num_threads: int = 2,
) -> OmniTokenizer:
    """Train and save `model_file`, plus a readable `.vocab` (piece, score) beside it; temp names, then renamed."""
    model_file = Path(model_file)
    if model_file.exists():
        raise PreprocessError(f"{model_file}: already exists; choose another --model_file")
    if model_file.parent.exists() and not model_file.parent.is_dir():
        raise PreprocessError(f"{model_file.parent}: exists and is not a folder; choose another --model_file")
    sentences = sample_training_text(shard_paths, chunk_length, sentences_per_modality, seed)
    model_bytes = io.BytesIO()  # rather than model_prefix, which would write the temp path into the model
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model_bytes,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=1.0,
            add_dummy_prefix=False,
            normalization_rule_name="identity",
            max_sentence_length=max(4192, 2 * chunk_length),
            shuffle_input_sentence=True,
            num_threads=num_threads,
            minloglevel=2,
            **TRAINER_SPECIALS,
        )
    except RuntimeError as exc:  # e.g. a vocab_size the sample cannot fill
        raise PreprocessError(explain_sentencepiece_error(str(exc), vocab_size, model_type, chunk_length)) from None
    made = [p for p in (model_file.parent, *model_file.parent.parents) if not p.exists()]
    model_file.parent.mkdir(parents=True, exist_ok=True)
    processor = spm.SentencePieceProcessor(model_proto=model_bytes.getvalue())
    vocab = "".join(
        f"{processor.id_to_piece(i)}\t{processor.get_score(i)}\n" for i in range(processor.get_piece_size())
    )
    try:
        for path, content in ((model_file.with_suffix(".vocab"), vocab.encode()), (model_file, model_bytes.getvalue())):
            tmp = path.with_name(f".tmp-{path.name}")
            tmp.write_bytes(content)
            os.replace(tmp, path)
    except BaseException:
        for path in (model_file.with_suffix(".vocab"), model_file):
            path.with_name(f".tmp-{path.name}").unlink(missing_ok=True)
        remove_empty_dirs(made)
        raise
    return OmniTokenizer(model_file)


def explain_sentencepiece_error(message: str, vocab_size: int, model_type: str, chunk_length: int) -> str:
    """One line that says what to change, for sentencepiece's multi-line INTERNAL check failures."""
    too_high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", message)
    if too_high:
        return (
            f"--vocab_size {vocab_size} is more than this sample of sequences can fill (at most {too_high[2]}"
            " pieces); lower --vocab_size or train on more records"
        )
    too_low = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
    if too_low:
        return f"--vocab_size {vocab_size} is below the {too_low[2]} letters and special pieces; raise --vocab_size"
    if "isfinite(score)" in message:
        return (
            f"sentencepiece {model_type} training failed on long sentences (std::isfinite(score));"
            f" use a shorter --chunk_length than {chunk_length} (e.g. 1024) or --model_type bpe"
        )
    first_line = (message.strip().splitlines() or ["(no message)"])[0]
    return f"sentencepiece training failed: {first_line}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", nargs="+", help="record shards (*.tsv.gz) from the preprocess_* scripts")
    parser.add_argument("--model_file", required=True, help="output sentencepiece model, e.g. data/tokenizer.model")
    parser.add_argument("--vocab_size", type=int, default=65536)
    parser.add_argument("--model_type", choices=["bpe", "unigram"], default="bpe")
    parser.add_argument("--chunk_length", type=int, default=2048, help="training window length in residues")
    parser.add_argument("--sentences_per_modality", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    tokenizer = train_tokenizer(
        args.shards, args.model_file, args.vocab_size, args.model_type, args.chunk_length,
        args.sentences_per_modality, args.seed, args.num_threads,
    )  # fmt: skip
    print(f"wrote {args.model_file} ({tokenizer.vocab_size} pieces)")


if __name__ == "__main__":
    sys.exit(run_cli(main))
