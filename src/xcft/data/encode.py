"""Conversation -> token ids, labels and image slots, following the official template.

Template (:mod:`xcft.model.template_xcomposer2`): ``BOS`` then, per turn, ``[UNUSED_TOKEN_146]{role}\\n{value}
[UNUSED_TOKEN_145]\\n``, the last ``\\n`` replaced by ``EOS``. The text is split at every
``<ImageHere>``; each piece is tokenized on its own, and each image takes its slots (``-1`` in
:attr:`EncodedSample.input_ids`): ``(img_size / 14)²`` for a 2.0 model; for a 2.5 (HD) model the
token count of the image's crop grid, which :class:`ImageSpec` derives from the image's pixel size
(read from the file header, no decoding) and ``hd_num``.

2.5 layout of one image given without placeholder: ``<s>``, the image, then the conversation
(the layout the official 2.5 chat builds; 2.0 puts the image at the start of the first user turn).

Labels come from the roles, never from scanning ids: an assistant answer's tokens and its closing
``[UNUSED_TOKEN_145]`` are trained, and the final EOS when the conversation ends with an answer;
everything else (BOS, system and user turns, the ``[UNUSED_TOKEN_146]assistant\\n`` header, the
``\\n`` after a turn, image slots) is -100.

Truncation at ``max_length`` (where we deliberately differ from the official code): the sequence is
cut at ``max_length`` tokens, but never inside an image: when the limit falls inside an image the
sequence ends just before it, and the images after the cut are dropped with their slots. A cut
sequence has no EOS; its labels are still by role. A sample left with no supervised token is marked
(``num_supervised == 0``) for the caller to report and skip.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from xcft.data.schema import IMAGE_PLACEHOLDER, Conversation, Message
from xcft.model.image_processing_xcomposer2 import hd_crop_grid, hd_tokens_for_grid
from xcft.model.template_xcomposer2 import TURN_END, TURN_START, conversation_segments, turn_segments

IGNORE_INDEX = -100
IMAGE_SLOT = -1
PATCH_SIZE = 14


class TokenizerLike(Protocol):
    bos_token_id: int
    eos_token_id: int

    @property
    def turn_start_id(self) -> int: ...

    @property
    def turn_end_id(self) -> int: ...

    def encode_text(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...

    def convert_ids_to_tokens(self, ids: int) -> str: ...


def slots_per_image(img_size: int, patch_size: int = PATCH_SIZE) -> int:
    """Image-feature slots one image takes in the sequence: ``(img_size // patch)²`` (1225 at 490 px)."""
    if img_size <= 0 or img_size % patch_size:
        raise ValueError(f"img_size must be a positive multiple of {patch_size}, got {img_size}")
    return (img_size // patch_size) ** 2


Grid = tuple[int, int]


@dataclass(frozen=True)
class ImageSpec:
    """How a model family turns an image into sequence slots.

    2.0 (``hd_num`` None): one ``img_size`` view per image, ``(img_size / patch)²`` slots.
    2.5 (``hd_num`` set): a global view plus a ``rows x cols`` grid of ``img_size`` crops chosen
    from the image's pixel size and the crop budget ``hd_num``; the slots follow from the grid.
    Both are known before any pixel is decoded, so lengths (check-data, length grouping,
    packing) never cost an image decode.
    """

    img_size: int
    hd_num: int | None = None
    patch_size: int = PATCH_SIZE

    def __post_init__(self) -> None:
        if self.img_size <= 0 or self.img_size % self.patch_size:
            raise ValueError(f"img_size must be a positive multiple of {self.patch_size}, got {self.img_size}")
        if self.hd_num is not None:
            if self.hd_num < 1:
                raise ValueError(f"hd_num must be at least 1, got {self.hd_num}")
            if (self.img_size // self.patch_size) % 2:
                raise ValueError(f"a 2.5 view of {self.img_size} px has an odd patch grid; the 2x2 merge needs it even")

    @property
    def hd(self) -> bool:
        return self.hd_num is not None

    def grid(self, width: int, height: int) -> Grid:
        """2.5: ``(rows, cols)`` crop grid of an image of ``width x height`` pixels (the training transform)."""
        if self.hd_num is None:
            return (1, 1)
        return hd_crop_grid(width, height, self.hd_num, view_size=self.img_size)

    def slots(self, grid: Grid | None = None) -> int:
        """Slots of one image: fixed for 2.0; from its crop grid for 2.5."""
        if self.hd_num is None:
            return slots_per_image(self.img_size, self.patch_size)
        if grid is None:
            raise ValueError("a 2.5 image's slot count needs its crop grid")
        return hd_tokens_for_grid(int(grid[0]), int(grid[1]), self.img_size // self.patch_size // 2)


@dataclass
class EncodedSample:
    """One encoded sample. ``input_ids`` holds -1 at image slots (the dataset swaps in the pad id)."""

    input_ids: list[int]
    labels: list[int]
    image_mask: list[bool]
    image_spans: list[tuple[int, int]] = field(default_factory=list)  # (start, length) per kept image
    num_images: int = 0  # images kept (the first num_images of the conversation's images)
    truncated: bool = False
    untruncated_length: int = 0
    dropped_images: int = 0
    image_grids: list[Grid] = field(default_factory=list)  # 2.5: crop grid of each kept image

    @property
    def num_supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)

    def __len__(self) -> int:
        return len(self.input_ids)


def _chunks(conv: Conversation, last_answer_only: bool = False) -> list[tuple[str, bool, int]]:
    """The conversation text as ``(text, trained, kind)`` chunks (kind 1 = a role header), from the chat template.

    Concatenating the chunk texts gives exactly the official conversation string (minus the final
    ``\\n</s>``, which becomes the EOS id). ``last_answer_only``: only the last turn's segments keep
    their trained flag (a preference pair scores its final answer, not the shared earlier turns).
    """
    turns = [(m.role, m.text) for m in conv.messages]
    segments = conversation_segments(turns)
    if last_answer_only:
        n_last = len(turn_segments(*turns[-1], last=True))
        segments = [replace(s, trained=False) for s in segments[:-n_last]] + segments[-n_last:]
    return [(seg.text, seg.trained, int(seg.header)) for seg in segments]


def _split_at_images(chunks: list[tuple[str, bool, int]]) -> list[list[tuple[str, bool, int]]]:
    """Split the chunk list into pieces at each ``<ImageHere>`` (pieces between images)."""
    pieces: list[list[tuple[str, bool, int]]] = [[]]
    for text, trained, kind in chunks:
        parts = text.split(IMAGE_PLACEHOLDER)
        for k, part in enumerate(parts):
            if k:
                pieces.append([])
            if part:
                pieces[-1].append((part, trained, kind))
    return pieces


def _tokenize_piece(
    piece: list[tuple[str, bool, int]], tokenizer: TokenizerLike, turn_tokens: tuple[str, str]
) -> tuple[list[int], list[bool]]:
    """Token ids of one piece (tokenized as one text, like the official code) and a trained flag per id.

    The piece is split only where the split cannot change the ids: right before/after a turn token,
    which SentencePiece keeps as one atomic piece. A role header and the text after it are tokenized
    together; the header's token count is found by decoding (normally the header's own ids are a
    prefix of the joint ids).
    """
    ids: list[int] = []
    flags: list[bool] = []
    # group chunks into runs that lie between turn tokens
    run: list[tuple[str, bool, int]] = []

    def flush() -> None:
        if not run:
            return
        text = "".join(t for t, _, _ in run)
        run_ids = tokenizer.encode_text(text)
        if len(run) == 1:
            ids.extend(run_ids)
            flags.extend([run[0][1]] * len(run_ids))
        else:
            # header (+ value): find token boundaries between the chunks by decoded length
            boundaries: list[int] = []
            pos = 0
            for t, _, _ in run[:-1]:
                pos += len(t)
                boundaries.append(pos)
            chunk_of = _assign_chunks(run_ids, run, boundaries, tokenizer)
            ids.extend(run_ids)
            flags.extend(run[c][1] for c in chunk_of)
        run.clear()

    for chunk in piece:
        if chunk[0] in turn_tokens:
            flush()
            tok_ids = tokenizer.encode_text(chunk[0])
            ids.extend(tok_ids)
            flags.extend([chunk[1]] * len(tok_ids))
        else:
            run.append(chunk)
    flush()
    return ids, flags


def _assign_chunks(
    run_ids: list[int], run: list[tuple[str, bool, int]], boundaries: list[int], tokenizer: TokenizerLike
) -> list[int]:
    """Chunk index of each token of a jointly tokenized run of chunks."""
    # Fast path: the leading chunks' own ids (role headers, a few tokens) are a prefix of the joint
    # ids. SentencePiece is lossless here (identity normaliser, byte fallback), so those tokens
    # cover exactly the leading chunks' text and the rest belongs to the last chunk.
    out: list[int] = []
    pos = 0
    for c, (text, _, _) in enumerate(run[:-1]):
        own = tokenizer.encode_text(text)
        if run_ids[pos : pos + len(own)] != own:
            break
        out.extend([c] * len(own))
        pos += len(own)
    else:
        out.extend([len(run) - 1] * (len(run_ids) - pos))
        return out
    # General path: a token belongs to the chunk where its text starts.
    out = []
    prev_len = 0
    for k in range(1, len(run_ids) + 1):
        start = prev_len
        prev_len = len(tokenizer.decode(run_ids[:k], skip_special_tokens=False))
        out.append(sum(1 for b in boundaries if start >= b))
    return out


@dataclass
class _Layout:
    """A sample's ids and trained flags before labels are made, and where truncation cuts them."""

    ids: list[int]
    trained: list[bool]
    spans: list[tuple[int, int]]  # (start, slots) per image
    image_grids: list[Grid]
    total: int
    cut: int
    kept_spans: list[tuple[int, int]]


def _layout(
    conv: Conversation,
    tokenizer: TokenizerLike,
    img_size: int | ImageSpec,
    max_length: int,
    grids: Sequence[Grid] | None,
    last_answer_only: bool,
) -> _Layout:
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    spec = img_size if isinstance(img_size, ImageSpec) else ImageSpec(int(img_size))
    image_first = spec.hd and conv.image_prepended
    if image_first:
        conv = _without_prepended_placeholder(conv)
    pieces = _split_at_images(_chunks(conv, last_answer_only))
    if image_first:
        pieces.insert(0, [])  # only <s> before the image
    n_images = len(pieces) - 1
    if n_images != len(conv.images):
        raise ValueError(f"{conv.where}: {n_images} placeholders but {len(conv.images)} images (normalize the sample first)")
    if spec.hd:
        if grids is None or len(grids) != n_images:
            raise ValueError(f"{conv.where}: a 2.5 encoding needs one crop grid per image ({n_images}), got {grids!r}")
        image_grids = [(int(g[0]), int(g[1])) for g in grids]
        slots = [spec.slots(g) for g in image_grids]
    else:
        image_grids = []
        slots = [spec.slots()] * n_images

    ids: list[int] = [tokenizer.bos_token_id]
    trained: list[bool] = [False]
    spans: list[tuple[int, int]] = []
    for k, piece in enumerate(pieces):
        if k:
            n_slots = slots[k - 1]
            spans.append((len(ids), n_slots))
            ids.extend([IMAGE_SLOT] * n_slots)
            trained.extend([False] * n_slots)
        p_ids, p_flags = _tokenize_piece(piece, tokenizer, (TURN_START, TURN_END))
        ids.extend(p_ids)
        trained.extend(p_flags)
    ends_with_answer = conv.messages[-1].role == "assistant"
    ids.append(tokenizer.eos_token_id)
    trained.append(ends_with_answer)

    total = cut = len(ids)
    kept_spans = spans
    if total > max_length:
        cut = max_length
        kept_spans = []
        for start, length in spans:
            if start + length <= cut:
                kept_spans.append((start, length))
            else:
                cut = min(cut, start)  # never split an image: end before it
                break
    return _Layout(ids, trained, spans, image_grids, total, cut, kept_spans)


def encode_conversation(
    conv: Conversation,
    tokenizer: TokenizerLike,
    img_size: int | ImageSpec,
    max_length: int,
    grids: Sequence[Grid] | None = None,
    *,
    last_answer_only: bool = False,
) -> EncodedSample:
    """Encode one conversation (see the module docstring for the template and truncation rules).

    ``img_size`` is a 2.0 view size or an :class:`ImageSpec`; a 2.5 spec needs ``grids``, the
    crop grid of each of the conversation's images in order (:meth:`ImageSpec.grid` of its size).
    ``last_answer_only``: train only the final turn (an answer of a preference pair).
    """
    lay = _layout(conv, tokenizer, img_size, max_length, grids, last_answer_only)
    ids, trained = lay.ids[: lay.cut], lay.trained[: lay.cut]
    labels = [i if t else IGNORE_INDEX for i, t in zip(ids, trained)]
    mask = [i == IMAGE_SLOT for i in ids]
    return EncodedSample(
        input_ids=ids,
        labels=labels,
        image_mask=mask,
        image_spans=lay.kept_spans,
        num_images=len(lay.kept_spans),
        truncated=lay.total > max_length,
        untruncated_length=lay.total,
        dropped_images=len(lay.spans) - len(lay.kept_spans),
        image_grids=lay.image_grids[: len(lay.kept_spans)],
    )


@dataclass(frozen=True)
class EncodedSize:
    """What the read pass keeps of an encoding: its counts (:func:`encoded_size`)."""

    length: int
    untruncated_length: int
    supervised: int
    truncated: bool


def encoded_size(
    conv: Conversation,
    tokenizer: TokenizerLike,
    img_size: int | ImageSpec,
    max_length: int,
    grids: Sequence[Grid] | None = None,
) -> EncodedSize:
    """The counts of :func:`encode_conversation`'s result, without making its label and mask lists.

    Same ids, same truncation; ``supervised`` counts the trained ids kept (image slots are never trained).
    """
    lay = _layout(conv, tokenizer, img_size, max_length, grids, False)
    return EncodedSize(lay.cut, lay.total, sum(lay.trained[: lay.cut]), lay.total > max_length)


def _without_prepended_placeholder(conv: Conversation) -> Conversation:
    """The conversation without the placeholder that normalisation put before its first user turn."""
    messages = list(conv.messages)
    k = next(i for i, m in enumerate(messages) if m.role == "user")
    text = messages[k].text
    if not text.startswith(IMAGE_PLACEHOLDER):
        raise ValueError(f"{conv.where}: marked image_prepended but the first user turn does not start with {IMAGE_PLACEHOLDER}")
    messages[k] = Message("user", text[len(IMAGE_PLACEHOLDER) :])
    return replace(conv, messages=messages)


__all__ = [
    "IGNORE_INDEX",
    "IMAGE_SLOT",
    "EncodedSample",
    "EncodedSize",
    "Grid",
    "ImageSpec",
    "encode_conversation",
    "encoded_size",
    "slots_per_image",
]
