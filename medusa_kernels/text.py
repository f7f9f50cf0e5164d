"""Prompts in, text out: what ``generate`` accepts as a prompt, and incremental detokenization.

``prompt_token_lists`` turns a prompt given as a string, a list of strings, a flat list of ids,
a list of id lists, or a [P] / [B, P] integer tensor (or numpy array) into one id list per
sequence, each id checked (an int, not a bool or a float, inside the vocabulary); text is
encoded with the checkpoint's ``tokenizers.Tokenizer`` (its post-processor adds BOS where the
checkpoint's tokenizer.json says so, as transformers does).

``IncrementalDetokenizer`` turns tokens arriving a few at a time into text pieces whose
concatenation is the decoding of all of them, and never emits a piece that ends inside a
multi-byte character (a byte-level BPE can split one over several tokens): text that decodes
to a trailing U+FFFD waits for the next tokens (vLLM's and transformers' streamers do the same).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .generation_config import describe, is_int

REPLACEMENT = "\ufffd"


def _check_ids(ids: Sequence[Any], where: str, vocab_size: int | None) -> list[int]:
    out = []
    for i, t in enumerate(ids):
        if not is_int(t):
            raise TypeError(f"{where}[{i}] must be an int token id, got {describe(t)}")
        if t < 0 or (vocab_size is not None and t >= vocab_size):
            limit = f"[0, vocab_size = {vocab_size})" if vocab_size is not None else ">= 0"
            raise ValueError(f"{where}[{i}] = {int(t)} is not a token id of this model: must be "
                             f"in {limit}")
        out.append(int(t))
    if not out:
        raise ValueError(f"{where} is empty: a prompt needs at least one token")
    return out


def _check_readable(t: Any, where: str) -> None:
    """A tensor whose values cannot be read (the meta device holds none): a ValueError naming
    it and the devices expected."""
    if getattr(t, "is_meta", False):
        raise ValueError(f"{where} is a tensor on the meta device, which holds no values: give "
                         "the token ids on the CPU or on the model's device")


def prompt_token_lists(prompt: Any, tokenizer=None, vocab_size: int | None = None,
                       bos_token_id: int | None = None, name: str = "prompt"
                       ) -> tuple[list[list[int]], bool]:
    """(one checked id list per sequence, whether the prompt was text).

    ``bos_token_id``: prepended to encoded text that does not start with it (a checkpoint
    whose tokenizer_config.json says ``add_bos_token`` but whose tokenizer.json does not add
    it); None leaves the encoding as the tokenizer makes it.
    """
    if hasattr(prompt, "dtype") and hasattr(prompt, "tolist"):  # a torch tensor, numpy array
        kind = str(prompt.dtype)
        if "int" not in kind or "bool" in kind:
            raise TypeError(f"{name} must hold integer token ids, got a tensor of {kind}")
        _check_readable(prompt, name)
        if prompt.ndim not in (1, 2):
            raise ValueError(f"{name} must be [P] or [B, P] token ids, got shape "
                             f"{tuple(prompt.shape)}")
        prompt = prompt.tolist()
        if prompt and is_int(prompt[0]):
            prompt = [prompt]
        if not prompt:
            raise ValueError(f"{name} is empty: give at least one prompt")
        return [_check_ids(p, f"{name}[{b}]", vocab_size) for b, p in enumerate(prompt)], False
    if isinstance(prompt, str):
        prompt = [prompt]
    if isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, Sequence):
        raise TypeError(f"{name} must be a string, a list of strings, a list of token ids, a "
                        f"list of such lists or an integer tensor, got {describe(prompt)}")
    if len(prompt) == 0:
        raise ValueError(f"{name} is empty: give at least one prompt")
    if all(isinstance(p, str) for p in prompt):
        if tokenizer is None:
            raise ValueError(f"{name} is text but the model has no tokenizer.json: give token "
                             "ids (a list of ints) instead")
        out = []
        for b, text in enumerate(prompt):
            ids = tokenizer.encode(text).ids
            if bos_token_id is not None and (not ids or ids[0] != bos_token_id):
                ids = [bos_token_id] + ids
            out.append(_check_ids(ids, f"{name}[{b}] (encoded)", vocab_size))
        return out, True
    def is_list(p):
        return (isinstance(p, Sequence) and not isinstance(p, str)) or \
            getattr(p, "ndim", 0) >= 1

    if not any(is_list(p) or isinstance(p, str) for p in prompt):  # one flat prompt
        return [_check_ids(prompt, name, vocab_size)], False
    out = []
    for b, p in enumerate(prompt):
        if getattr(p, "ndim", 0) >= 1 and hasattr(p, "tolist"):
            kind = str(p.dtype)
            if "int" not in kind or "bool" in kind:
                raise TypeError(f"{name}[{b}] must hold integer token ids, got {kind}")
            _check_readable(p, f"{name}[{b}]")
            p = p.tolist()
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence):
            raise TypeError(f"{name}[{b}] must be a list of token ids (a batch cannot mix "
                            f"texts, ids and lists), got {describe(p)}")
        out.append(_check_ids(p, f"{name}[{b}]", vocab_size))
    return out, False


class IncrementalDetokenizer:
    """Text pieces of one sequence's tokens as they arrive.

    ``push(ids)`` returns the new text those tokens complete ("" while a character is still
    split); ``flush()`` returns what is left at the end. The pieces add up to
    ``tokenizer.decode(all_ids, skip_special_tokens)``. Each call decodes only the tokens
    since the last emitted piece (and the ones before it, so decoders that treat a leading
    space specially see the same context as a whole decode does).
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the decoding window
        self.read = 0  # tokens before this are emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, ids: Sequence[int]) -> str:
        self.ids.extend(ids)
        if len(self.ids) == self.read:
            return ""
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) > len(before) and not text.endswith(REPLACEMENT):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(before):]
        return ""

    def flush(self) -> str:
        """The text still held back (an unfinished character at the very end, as U+FFFD)."""
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(before):]
