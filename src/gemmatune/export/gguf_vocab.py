"""A Gemma tokenizer as llama.cpp's SentencePiece vocabulary ("llama" tokenizer model) in a GGUF.

llama.cpp tokenizes with the pieces, scores and types it finds in the file: Gemma's tokenizer is SentencePiece BPE
with byte fallback, so the vocabulary is written as one, also where a folder has only tokenizer.json (the embedded
model, converted from a GGUF): written as a GPT-2 byte-level vocabulary it would tokenize and decode differently.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from gguf import GGUFWriter, SpecialVocab, TokenType

from gemmatune.errors import GemmatuneError

_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")
# A score below every real piece: added tokens are matched whole, before BPE merges, so their score never ranks.
_ADDED_SCORE = -1000.0
# Added tokens some tokenizers leave unmarked although they are control tokens (Gemma's <unusedN>, <mask>, ...).
_LOOK_SPECIAL = re.compile(r"<pad>|<mask>|<2mass>|\[@BOS@\]|<unused.*>|<\|.*\|>|<｜.*｜>")


def vocabulary_size(folder: Path, config) -> int:
    """The GGUF's vocabulary size: the model's `vocab_size` (its embedding rows), which may exceed the tokenizer's
    pieces (unused ids, padded), else the tokenizer's."""
    size = getattr(config, "vocab_size", None)
    return int(size) if size else len(_pieces(folder)[0])


def write_vocabulary(writer: GGUFWriter, folder: Path, n_vocab: int, chat_template: str) -> None:
    """Tokenizer keys: pieces, scores and types; BOS/EOS/UNK/PAD ids and whether BOS/EOS are added; the chat
    template llama.cpp applies (the run's training template)."""
    pieces, scores, types = _pieces(folder)
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    all_scores = [-10000.0] * n_vocab
    all_types = [int(TokenType.UNUSED)] * n_vocab
    for i, (piece, score, kind) in enumerate(zip(pieces[:n_vocab], scores, types, strict=False)):
        tokens[i], all_scores[i], all_types[i] = piece, score, kind
    for i, content, kind in _added_tokens(folder):
        if i < n_vocab:
            tokens[i], all_scores[i], all_types[i] = content, _ADDED_SCORE, kind
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(all_scores)
    writer.add_token_types(all_types)
    special = SpecialVocab(folder, load_merges=False, n_vocab=n_vocab)
    special.chat_template = chat_template
    special.add_to_gguf(writer, quiet=True)
    # Gemma's normalizer replaces spaces with U+2581 and adds no dummy prefix: "Hi" is one piece, not "▁Hi".
    writer.add_add_space_prefix(False)


def _pieces(folder: Path) -> tuple[list[str], list[float], list[int]]:
    """(piece, score, type) per id, from tokenizer.model, or from tokenizer.json where the folder has no
    tokenizer.model."""
    if (folder / "tokenizer.model").is_file():
        from sentencepiece import SentencePieceProcessor

        sp = SentencePieceProcessor()
        sp.LoadFromFile(str(folder / "tokenizer.model"))
        pieces, scores, types = [], [], []
        for i in range(sp.vocab_size()):
            pieces.append(sp.IdToPiece(i))
            scores.append(sp.GetScore(i))
            # User-defined pieces are NORMAL here: llama.cpp would match a USER_DEFINED one against the raw text,
            # and Gemma's spell spaces as U+2581, which raw text never holds.
            types.append(int(TokenType.UNKNOWN if sp.IsUnknown(i) else TokenType.CONTROL if sp.IsControl(i)
                             else TokenType.UNUSED if sp.IsUnused(i) else TokenType.BYTE if sp.IsByte(i)
                             else TokenType.NORMAL))
        return pieces, scores, types
    return _pieces_from_tokenizer_json(folder)


def _pieces_from_tokenizer_json(folder: Path) -> tuple[list[str], list[float], list[int]]:
    """The SentencePiece pieces a BPE tokenizer.json with byte fallback describes. A normal piece's score is minus its
    id, which ranks merges as Gemma's own model does (its scores fall by one per id)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise GemmatuneError(f"{folder} has neither tokenizer.model nor tokenizer.json; cannot describe its "
                             "tokenizer to llama.cpp")
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data["model"]
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise GemmatuneError(f"{path} is not a SentencePiece-style BPE tokenizer (byte fallback); cannot describe it "
                             "to llama.cpp")
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    size = max([*model["vocab"].values(), *added]) + 1
    known: dict[int, str] = {i: piece for piece, i in model["vocab"].items()}
    known.update({i: token["content"] for i, token in added.items()})
    pieces, scores, types = [], [], []
    for i in range(size):
        piece = known.get(i)
        if piece is None:
            entry = (f"<gemmatune-unused-{i}>", _ADDED_SCORE, TokenType.UNUSED)
        elif piece == model.get("unk_token"):
            entry = (piece, 0.0, TokenType.UNKNOWN)
        elif i in added:
            # As a Google tokenizer.model reads (see _pieces): its user-defined pieces (whitespace runs, "\n\n")
            # come back NORMAL; llama.cpp then reaches them through merges, as the HF tokenizer does.
            entry = (piece, _ADDED_SCORE, TokenType.CONTROL if added[i].get("special") else TokenType.NORMAL)
        elif _BYTE_PIECE.fullmatch(piece):
            entry = (piece, 0.0, TokenType.BYTE)
        else:
            entry = (piece, -float(i), TokenType.NORMAL)
        pieces.append(entry[0])
        scores.append(entry[1])
        types.append(int(entry[2]))
    return pieces, scores, types


def _added_tokens(folder: Path) -> list[tuple[int, str, int]]:
    """(id, text, type) of the tokens added on top of the SentencePiece model, which override its pieces:
    added_tokens.json, then tokenizer_config.json's added_tokens_decoder."""
    found: list[tuple[int, str, int]] = []
    if (folder / "added_tokens.json").is_file():
        added = json.loads((folder / "added_tokens.json").read_text(encoding="utf-8"))
        found += [(int(i), text, int(TokenType.USER_DEFINED)) for text, i in added.items()]
    if (folder / "tokenizer_config.json").is_file():
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        for i, token in (config.get("added_tokens_decoder") or {}).items():
            text = token["content"]
            if token.get("special") or _LOOK_SPECIAL.fullmatch(text):
                found.append((int(i), text, int(TokenType.CONTROL)))
            else:  # llama.cpp matches user-defined tokens on text whose U+2581 are spaces again
                found.append((int(i), text.replace("\u2581", " "), int(TokenType.USER_DEFINED)))
    return found
