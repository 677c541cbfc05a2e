"""The XComposer2 chat template: one definition of a turn, used for training and for chat.

A turn is ``[UNUSED_TOKEN_146]{role}\\n{text}[UNUSED_TOKEN_145]\\n``. Training encodes a whole
conversation this way, after ``<s>``, with the final ``\\n`` replaced by ``</s>``, and trains the
answers (their text and closing turn token). Chat renders the earlier turns the same way, adds the
system turn when there is one, and ends with the answer header ``[UNUSED_TOKEN_146]assistant\\n``
where generation starts. So the chat prompt of a conversation prefix is, token for token, what
training saw before that answer.

Self-contained (standard library only): it is copied into saved model folders beside the model code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

TURN_START = "[UNUSED_TOKEN_146]"
TURN_END = "[UNUSED_TOKEN_145]"
IMAGE_PLACEHOLDER = "<ImageHere>"
ANSWER_ROLE = "assistant"

#: The system prompt the official 2.0 chat uses by default (the released models were tuned with it).
OFFICIAL_SYSTEM_PROMPT = "\n".join(
    [
        "You are an AI assistant whose name is InternLM-XComposer (浦语·灵笔).",
        "- InternLM-XComposer (浦语·灵笔) is a multi-modality conversational language model that is developed by "
        "Shanghai AI Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.",
        "- InternLM-XComposer (浦语·灵笔) can understand and communicate fluently in the language chosen by the user "
        "such as English and 中文.",
        "- InternLM-XComposer (浦语·灵笔) is capable of comprehending and articulating responses effectively based on "
        "the provided image.",
    ]
)


class _FamilyDefault:
    """Marks "the model family's own default" for the system prompt (an immutable marker)."""

    def __repr__(self) -> str:
        return "FAMILY_DEFAULT"


#: ``meta_instruction`` default of ``model.chat``: the official system prompt for 2.0, none for 2.5.
FAMILY_DEFAULT = _FamilyDefault()


#: Prompt layouts a model folder records in ``config.json`` (``prompt_layout``), and that chat uses by default.
#: "official": the official chat of the family (2.0: the official system prompt and a ``<s>`` before every
#: text piece; 2.5: no system prompt, one ``<s>``) -- official checkpoints and their finetunes.
#: "training": as xcft training encodes samples (no system prompt, one ``<s>``) -- models xcft created
#: from scratch, which never saw the official prompt.
LAYOUT_OFFICIAL = "official"
LAYOUT_TRAINING = "training"
PROMPT_LAYOUTS = (LAYOUT_OFFICIAL, LAYOUT_TRAINING)


def default_system_prompt(hd: bool, layout: str = LAYOUT_OFFICIAL) -> str | None:
    """The chat's default system prompt: the official one for 2.0 in the official layout, else none.

    (The official 2.5 chat passes ``use_meta=False``.)
    """
    return OFFICIAL_SYSTEM_PROMPT if layout == LAYOUT_OFFICIAL and not hd else None


def bos_per_piece_default(hd: bool, layout: str = LAYOUT_OFFICIAL) -> bool:
    """Whether every text piece of the prompt gets its own ``<s>``: only in the official 2.0 layout."""
    return layout == LAYOUT_OFFICIAL and not hd


#: Sampling settings of the official chat (both families); ``do_sample=False`` gives greedy decoding.
OFFICIAL_GENERATION = {"do_sample": True, "temperature": 1.0, "top_p": 0.8, "repetition_penalty": 1.005}


@dataclass(frozen=True)
class Segment:
    """A run of template text: whether it is trained, and whether it is a role header."""

    text: str
    trained: bool = False
    header: bool = False


def turn_segments(role: str, text: str, *, last: bool = False) -> list[Segment]:
    """One turn; ``last`` leaves off the closing newline (training puts ``</s>`` there)."""
    trained = role == ANSWER_ROLE
    segments = [Segment(TURN_START), Segment(f"{role}\n", header=True), Segment(text, trained), Segment(TURN_END, trained)]
    if not last:
        segments.append(Segment("\n"))
    return segments


def conversation_segments(turns: Sequence[tuple[str, str]]) -> list[Segment]:
    """A whole training conversation ``[(role, text), ...]`` as segments."""
    out: list[Segment] = []
    for i, (role, text) in enumerate(turns):
        out += turn_segments(role, text, last=i == len(turns) - 1)
    return out


def chat_turns(query: str, history: Sequence[tuple[str, str]] = (), system: str | None = None) -> list[tuple[str, str]]:
    """The turns of a chat prompt: the system turn (when non-empty), the history, then the query."""
    turns: list[tuple[str, str]] = [("system", system)] if system else []
    for question, answer in history:
        turns += [("user", question), (ANSWER_ROLE, answer)]
    return [*turns, ("user", query)]


def chat_prompt(query: str, history: Sequence[tuple[str, str]] = (), system: str | None = None) -> str:
    """The chat prompt text, ending with the answer header where generation starts."""
    turns = chat_turns(query, history, system)
    return "".join(seg.text for role, text in turns for seg in turn_segments(role, text)) + f"{TURN_START}{ANSWER_ROLE}\n"


def place_images(query: str, history: Sequence[tuple[str, str]], num_images: int, *, numbered: bool = False) -> str:
    """The query with placeholders for images given without any ``<ImageHere>`` in the conversation.

    They go at the start of the query: one placeholder each, or with ``numbered``
    ``Image1 <ImageHere>; Image2 <ImageHere>; `` (the multi-image convention of the 2.5 release).
    """
    if not num_images or IMAGE_PLACEHOLDER in query or any(IMAGE_PLACEHOLDER in q for q, _ in history):
        return query
    if numbered and num_images > 1:
        return "".join(f"Image{k + 1} {IMAGE_PLACEHOLDER}; " for k in range(num_images)) + query
    return IMAGE_PLACEHOLDER * num_images + query


__all__ = [
    "ANSWER_ROLE",
    "FAMILY_DEFAULT",
    "IMAGE_PLACEHOLDER",
    "LAYOUT_OFFICIAL",
    "LAYOUT_TRAINING",
    "OFFICIAL_GENERATION",
    "OFFICIAL_SYSTEM_PROMPT",
    "PROMPT_LAYOUTS",
    "TURN_END",
    "TURN_START",
    "Segment",
    "bos_per_piece_default",
    "chat_prompt",
    "chat_turns",
    "conversation_segments",
    "default_system_prompt",
    "place_images",
    "turn_segments",
]
