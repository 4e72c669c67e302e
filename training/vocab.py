"""A CLIPTokenizer over the caption vocabulary: every grammar word is one whole token."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer

from training.shapes import BACKGROUNDS, COLOURS, SHAPES, SIZES

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 16  # BOS + at most 8 words + EOS, with room to spare; the service's prompt limit


def caption_words() -> list[str]:
    words = ["a", "on", "background", *SIZES, *COLOURS, *SHAPES, *BACKGROUNDS]
    return list(dict.fromkeys(words))


def _apply_merges(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: merge the lowest-ranked adjacent pair until none applies."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = [*symbols[:i], symbols[i] + symbols[i + 1], *symbols[i + 2 :]]
    return symbols


def _build_merges(words: list[str]) -> list[tuple[str, str]]:
    """Merges that turn every word into one token. A word's new merges rank after all earlier
    ones, so they only apply once the earlier merges are exhausted and cannot change earlier words."""
    merges: list[tuple[str, str]] = []
    for word in words:
        symbols = _apply_merges(word, {pair: rank for rank, pair in enumerate(merges)})
        while len(symbols) > 1:
            merges.append((symbols[0], symbols[1]))
            symbols = [symbols[0] + symbols[1], *symbols[2:]]
    return merges


def write_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """Write vocab.json, merges.txt and the tokenizer config to `folder`; return it reloaded."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = caption_words()
    merges = _build_merges(words)
    tokens: list[str] = []
    for char in sorted({c for word in words for c in word}):
        tokens += [char, char + "</w>"]
    tokens += ["".join(pair) for pair in merges]
    tokens = list(dict.fromkeys(tokens)) + [BOS, EOS]
    tokenizer = CLIPTokenizer(
        vocab={token: i for i, token in enumerate(tokens)},
        merges=merges,
        model_max_length=MODEL_MAX_LENGTH,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
    )
    tokenizer.save_pretrained(folder)
    # Slow-tokenizer files too, so older transformers versions load the folder as well.
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    reloaded = CLIPTokenizer.from_pretrained(folder)
    for word in words:
        ids = reloaded(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise RuntimeError(f"tokenizer splits the caption word {word!r} into {ids}")
    return reloaded
