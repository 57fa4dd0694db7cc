"""The embedded default's tokenizer, built offline with the ``tokenizers`` library.

It mirrors TraDo's conventions (Qwen chat format, same special-token strings), so the
embedded default exercises exactly the code paths of a real checkpoint:

- ``<|endoftext|>``: pad (as in Qwen/TraDo),
- ``<|im_start|>`` / ``<|im_end|>``: chat turns; ``<|im_end|>`` ends a response (EOS),
- ``<|MASK|>``: the diffusion mask token.

The vocabulary is character-level over printable ASCII plus newline (every digit its
own token, which small models need for arithmetic): about a hundred tokens, so a tiny
model spends its parameters on the task, not the embedding table. The build is
deterministic and takes milliseconds; :func:`save_default_tokenizer` writes files that
``AutoTokenizer.from_pretrained`` loads.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|MASK|>"]

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def _alphabet() -> list[str]:
    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    return sorted(set(chars), key=chars.index)


def build_default_tokenizer() -> PreTrainedTokenizerFast:
    """Build the character-level chat tokenizer of the embedded default.

    Example:
        >>> tok = build_default_tokenizer()
        >>> tok.mask_token, tok.eos_token, tok.pad_token
        ('<|MASK|>', '<|im_end|>', '<|endoftext|>')
        >>> tok.decode(tok.encode("12+3=15"))
        '12+3=15'
    """
    vocab: dict[str, int] = {}
    for tok in SPECIAL_TOKENS + _alphabet() + ["<unk>"]:
        vocab.setdefault(tok, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # split into single characters; special tokens are matched before this runs
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        mask_token="<|MASK|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def save_default_tokenizer(out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    build_default_tokenizer().save_pretrained(str(out))
    return out
