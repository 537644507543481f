"""A deterministic word + byte-fallback tokenizer (no downloads, no model files).

Why this shape: it behaves like the tokenizers serving stacks use (frequent words are one
token, anything else falls back to one token per UTF-8 byte, so every string encodes and
decodes losslessly), and it is small enough to read. Ids 0..255 are bytes, 256.. words.
"""
from __future__ import annotations

import re

WORDS = (
    "the of and to a in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if so no will more can who out up what about into "
    "than them only other new some could time these two may then do first any my now such like our over man me even "
    "most made after also did many before must through back years where much your way well down should because each "
    "just those people how too little state good very make world still own see men work long get here between both "
    "life being under never day same another know while last might us great old year off come since against go came "
    "right used take three model token server request client fair share serve queue batch prompt answer question "
    "write explain summarize story poem code python rpc daemon policy latency throughput memory network hotel"
).split()
WORD_ID = {w: 256 + i for i, w in enumerate(WORDS)}
VOCAB_SIZE = 256 + len(WORDS)
_SPLIT = re.compile(r"\s+|[A-Za-z]+|[^A-Za-z\s]")


def encode(text: str) -> list[int]:
    """Words of the vocabulary (lowercase) are one id; everything else, its UTF-8 bytes."""
    ids: list[int] = []
    for m in _SPLIT.finditer(text):
        piece = m.group()
        if piece.isspace():
            continue
        wid = WORD_ID.get(piece)
        if wid is not None:
            ids.append(wid)
        else:
            ids.extend(piece.encode("utf-8"))
    return ids


def piece(token_id: int) -> str:
    """The text of one generated token (words get a leading space)."""
    if not 0 <= token_id < VOCAB_SIZE:
        raise ValueError(f"token id {token_id} outside the vocabulary (0..{VOCAB_SIZE - 1})")
    if token_id >= 256:
        return " " + WORDS[token_id - 256]
    return bytes([token_id]).decode("latin-1")
