"""InternLM2 SentencePiece tokenizer, without remote code.

Self-contained (standard library, sentencepiece and transformers only): ``save_pretrained``
copies this file next to ``tokenizer.model`` and writes an ``auto_map`` naming
``tokenization_internlm2.InternLM2Tokenizer``, so ``AutoTokenizer.from_pretrained(dir,
trust_remote_code=True)`` works in a process that has never imported xcft.

Behaviour that matters for parity with the official tokenizer:

* the SentencePiece model adds no dummy prefix, so a piece of text that starts with a word gets
  no leading ``▁`` (we never add one either);
* BOS (``<s>``) is prepended by ``__call__``/``encode`` with special tokens, never by
  :meth:`InternLM2Tokenizer.encode_text`;
* the turn tokens ``[UNUSED_TOKEN_146]`` / ``[UNUSED_TOKEN_145]`` are user-defined pieces of the
  SentencePiece model, so they come out as single ids wherever they occur in the text. Their ids are
  looked up in the model, never assumed.
"""

from __future__ import annotations

import os
from pathlib import Path
from shutil import copyfile
from typing import Any

import sentencepiece as spm
from transformers import PreTrainedTokenizer

VOCAB_FILES_NAMES = {"vocab_file": "tokenizer.model"}

TURN_START_TOKEN = "[UNUSED_TOKEN_146]"
TURN_END_TOKEN = "[UNUSED_TOKEN_145]"


def _processor(kwargs: dict[str, Any]) -> spm.SentencePieceProcessor:
    """A SentencePieceProcessor with sentencepiece's own logging kept to errors.

    The real InternLM2 model makes sentencepiece warn on every load that piece 354 is a NUL
    character (an unused piece); that line only confuses users.
    """
    if hasattr(spm, "set_min_log_level"):
        spm.set_min_log_level(2)
    return spm.SentencePieceProcessor(**kwargs)


class InternLM2Tokenizer(PreTrainedTokenizer):
    """SentencePiece tokenizer of InternLM2 / InternLM-XComposer2 checkpoints.

    ``InternLM2Tokenizer.from_pretrained(folder)`` needs only ``folder/tokenizer.model``;
    :meth:`from_model_file` takes the file itself.
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]  # noqa: RUF012 (transformers declares it an instance attribute, so not a ClassVar)
    # save_pretrained copies this file and writes auto_map (see transformers' custom_object_save).
    _auto_class = "AutoTokenizer"

    def __init__(
        self,
        vocab_file: str,
        unk_token: str = "<unk>",
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        pad_token: str = "</s>",
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        sp_model_kwargs: dict[str, Any] | None = None,
        clean_up_tokenization_spaces: bool = False,
        **kwargs: Any,
    ) -> None:
        self.vocab_file = str(vocab_file)
        self.sp_model_kwargs = dict(sp_model_kwargs or {})
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        # The SentencePiece model must exist before the base class asks for the vocabulary.
        self.sp_model = _processor(self.sp_model_kwargs)
        self.sp_model.Load(self.vocab_file)
        kwargs.pop("special_tokens_pattern", None)
        pattern = {(True, False): "bos", (False, True): "eos", (True, True): "bos_eos"}.get(
            (add_bos_token, add_eos_token), "none"
        )
        kwargs.setdefault("extra_special_tokens", [TURN_START_TOKEN, TURN_END_TOKEN])
        super().__init__(
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            sp_model_kwargs=self.sp_model_kwargs,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            special_tokens_pattern=pattern,
            **kwargs,
        )

    # ------------------------------------------------------------------ construction helpers

    @classmethod
    def from_model_file(cls, path: str | os.PathLike[str], **kwargs: Any) -> InternLM2Tokenizer:
        """Load from a ``tokenizer.model`` file, or from a folder that holds one."""
        p = Path(path)
        if p.is_dir():
            p = p / VOCAB_FILES_NAMES["vocab_file"]
        if not p.is_file():
            raise FileNotFoundError(f"no SentencePiece tokenizer.model at {p}")
        return cls(vocab_file=str(p), **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        # SentencePieceProcessor is not picklable (DataLoader workers with spawn need pickling).
        state = self.__dict__.copy()
        state["sp_model"] = None
        state["_sp_model_proto"] = self.sp_model.serialized_model_proto()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        proto = state.pop("_sp_model_proto")
        self.__dict__.update(state)
        self.sp_model = _processor(self.sp_model_kwargs)
        self.sp_model.LoadFromSerializedProto(proto)

    # ------------------------------------------------------------------ ids the data pipeline needs

    @property
    def vocab_size(self) -> int:
        return self.sp_model.get_piece_size()

    def _piece_id(self, piece: str) -> int:
        idx = self.sp_model.piece_to_id(piece)
        if idx == self.sp_model.unk_id() or self.sp_model.id_to_piece(idx) != piece:
            raise ValueError(f"token {piece!r} is not a piece of {self.vocab_file}; this is not an InternLM2 tokenizer")
        return idx

    @property
    def turn_start_id(self) -> int:
        """Id of ``[UNUSED_TOKEN_146]``, which opens every chat turn."""
        return self._piece_id(TURN_START_TOKEN)

    @property
    def turn_end_id(self) -> int:
        """Id of ``[UNUSED_TOKEN_145]``, which closes every chat turn."""
        return self._piece_id(TURN_END_TOKEN)

    def encode_text(self, text: str) -> list[int]:
        """Ids of ``text`` exactly as the official tokenizer splits it, with no BOS/EOS.

        ``<s>``/``</s>`` written in ``text`` stay ordinary characters (training text must not be
        able to inject control tokens); the turn tokens are single pieces.
        """
        if not text:
            return []
        return list(self.sp_model.encode(text))

    # ------------------------------------------------------------------ PreTrainedTokenizer hooks

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_model.id_to_piece(int(index))

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Decode pieces; special tokens are written verbatim, the rest through SentencePiece."""
        special = set(self.all_special_tokens)
        out: list[str] = []
        run: list[str] = []
        for tok in tokens:
            if tok in special:
                if run:
                    out.append(self.sp_model.decode_pieces(run))
                    run = []
                out.append(tok)
            else:
                run.append(tok)
        if run:
            out.append(self.sp_model.decode_pieces(run))
        return "".join(out)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        """Copy ``tokenizer.model`` into ``save_directory`` (or serialise it when the file is gone)."""
        if not os.path.isdir(save_directory):
            raise NotADirectoryError(f"vocabulary path {save_directory} should be a directory")
        out = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model")
        if os.path.abspath(self.vocab_file) != os.path.abspath(out) and os.path.isfile(self.vocab_file):
            copyfile(self.vocab_file, out)
        elif not os.path.isfile(self.vocab_file):
            with open(out, "wb") as f:
                f.write(self.sp_model.serialized_model_proto())
        return (out,)


__all__ = ["TURN_END_TOKEN", "TURN_START_TOKEN", "InternLM2Tokenizer"]
