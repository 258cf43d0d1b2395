"""The tiny preset's tokenizer: a byte-level BPE in Qwen2's format, built with `tokenizers`.

Why Qwen2's format: a mimo checkpoint's config.json says ``"model_type": "qwen2"`` (that is what
lets vLLM and transformers load it without remote code), and transformers 5 then always builds a
``Qwen2Tokenizer`` from ``tokenizer.json``'s vocab and merges with Qwen2's own pre-tokenizer
(digits split one by one, letter runs kept with one leading non-letter, byte-level symbols).
So the tiny tokenizer *is* a Qwen2-style BPE: the 256 byte symbols, four special tokens, and
merges that make each task word (``" sort"``, ``" answer"``, ...) a single token. The same
``tokenizer.json`` therefore tokenizes identically in `tokenizers`, transformers and vLLM.
"""

from __future__ import annotations

import json
from pathlib import Path

from skyrl_mtp.models.mimo import TINY_BOS_ID, TINY_EOS_ID, TINY_PAD_ID, TINY_UNK_ID

SPECIAL_TOKENS = {TINY_PAD_ID: "<pad>", TINY_BOS_ID: "<s>", TINY_EOS_ID: "</s>", TINY_UNK_ID: "<unk>"}
# Words of the synthetic tasks, each merged into one token (with and without a leading space).
WORDS = ["sort", "reverse", "copy", "count", "add", "sum", "from", "to", "by", "step", "answer",
         "list", "is", "the", "of", "and", "then", "next", "digits", "numbers", "Q", "A"]


def _qwen2_pretokenize_regex() -> str:
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    return PRETOKENIZE_REGEX


def tiny_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(token -> id, merges). Ids: specials 0-3, then the 256 byte symbols, then merged words."""
    from tokenizers import pre_tokenizers

    vocab = {SPECIAL_TOKENS[i]: i for i in range(len(SPECIAL_TOKENS))}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    merges: list[tuple[str, str]] = []
    space = "\u0120"  # byte-level symbol of " "
    for word in WORDS:
        for form in (word, space + word):
            if len(form) < 2:
                continue
            built = form[0]
            for ch in form[1:]:
                merged = built + ch
                if merged not in vocab:
                    vocab[merged] = len(vocab)
                    merges.append((built, ch))
                built = merged
    return vocab, merges


def build_tiny_tokenizer():
    """A `tokenizers.Tokenizer` equal to what transformers' Qwen2Tokenizer builds from it."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab, merges = tiny_vocab_and_merges()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_qwen2_pretokenize_regex()), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS.values()])
    return tok


def tiny_vocab_size() -> int:
    return len(tiny_vocab_and_merges()[0])


def save_tiny_tokenizer(out_dir: str | Path, model_max_length: int = 512) -> None:
    """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer().save(str(out / "tokenizer.json"))
    specials = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": model_max_length,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        **specials,
    }, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
