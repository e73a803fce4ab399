"""One sentencepiece tokenizer for DNA, RNA and protein; each record becomes `<modality> pieces... </s>`.

The modality token keeps the three alphabets apart (protein and DNA share the letters A, C, G, T), so the same
piece id can mean different things only after different prefixes, as in the original OmniBioTE.
"""

import hashlib
from pathlib import Path

import sentencepiece as spm

from errors import DataError

PAD, UNK, EOS, MASK = "<pad>", "<unk>", "</s>", "<mask>"
MODALITY_TOKENS = {"dna": "<dna>", "rna": "<rna>", "protein": "<protein>"}

# Arguments given to SentencePieceTrainer so the special pieces land on fixed, known ids.
TRAINER_SPECIALS = dict(
    pad_id=0,
    pad_piece=PAD,
    unk_id=1,
    unk_piece=UNK,
    eos_id=2,
    eos_piece=EOS,
    bos_id=-1,
    control_symbols=[MASK],
    user_defined_symbols=list(MODALITY_TOKENS.values()),
)


class OmniTokenizer:
    """Wraps a trained sentencepiece model: record encoding, decoding and the special ids the model needs."""

    def __init__(self, model_file: str | Path):
        model_file = Path(model_file)
        if not model_file.is_file():
            raise DataError(f"{model_file}: tokenizer model not found")
        self.model_file = model_file
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        missing = [p for p in (PAD, EOS, MASK, *MODALITY_TOKENS.values()) if self.sp.piece_to_id(p) == self.sp.unk_id()]
        if missing or self.sp.pad_id() != 0:
            raise DataError(f"{model_file}: not an omnibiote tokenizer (missing special pieces {missing})")
        self.vocab_size = self.sp.get_piece_size()
        self.pad_id = self.sp.pad_id()
        self.eos_id = self.sp.eos_id()
        self.unk_id = self.sp.unk_id()
        self.mask_id = self.sp.piece_to_id(MASK)
        self.modality_ids = {name: self.sp.piece_to_id(piece) for name, piece in MODALITY_TOKENS.items()}
        # ids that are never masked or predicted during MLM
        self.special_ids = sorted({self.pad_id, self.eos_id, self.unk_id, self.mask_id, *self.modality_ids.values()})
        self.sha256 = hashlib.sha256(model_file.read_bytes()).hexdigest()  # what encoded data records and checks

    def special_id_map(self) -> dict[str, int]:
        """{name: id} of every special piece, as recorded in an encoded split's meta.json."""
        return {"pad": self.pad_id, "unk": self.unk_id, "eos": self.eos_id, "mask": self.mask_id, **self.modality_ids}

    def encode(self, modality: str, sequences: list[str], num_threads: int = 1, chunk_length: int = 100_000):
        """Token ids `[<modality>] + pieces + [</s>]` for each sequence; very long sequences are encoded in
        chunk_length pieces so memory stays bounded (a merge across a chunk border is lost, nothing else)."""
        pieces, owners = [], []
        for index, sequence in enumerate(sequences):
            for start in range(0, len(sequence), chunk_length):
                pieces.append(sequence[start : start + chunk_length])
                owners.append(index)
        encoded = self.sp.encode(pieces, num_threads=num_threads) if pieces else []
        out = [[self.modality_ids[modality]] for _ in sequences]
        for owner, ids in zip(owners, encoded):
            out[owner].extend(ids)
        for ids in out:
            ids.append(self.eos_id)
        return out

    def decode(self, ids) -> str:
        """Text of the ids; the modality token prints as e.g. `<dna>`, pad/eos/mask are dropped."""
        return self.sp.decode([int(i) for i in ids])
