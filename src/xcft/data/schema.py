"""Reading training files and normalising samples into :class:`Conversation` objects.

Accepted input (see README "Training data"): a JSON array of samples, or JSON Lines (one sample per line;
a ``.json`` file that holds JSON Lines is accepted too). A sample is an object with
``conversations`` (list of ``{from, value}``), an optional ``id`` (string or integer; the sample
index when absent) and an optional ``image`` (absent, one path, or a list of paths).

Nothing here raises on bad data: every problem is collected as a :class:`Problem` so that
``xcft check-data`` can report all of them in one pass; :func:`raise_first` turns the first error
into a :class:`~xcft.errors.DataError` for training.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from xcft.data.images import image_file_problem
from xcft.errors import DataError

IMAGE_PLACEHOLDER = "<ImageHere>"
LLAVA_PLACEHOLDER = "<image>"

USER_ROLES = frozenset({"user", "human"})
ASSISTANT_ROLES = frozenset({"assistant", "gpt", "bot"})
SYSTEM_ROLE = "system"

Role = Literal["system", "user", "assistant"]
Level = Literal["error", "warning", "info"]


@dataclass(frozen=True)
class Message:
    """One turn; ``text`` is the value with surrounding whitespace stripped (as the official code does)."""

    role: Role
    text: str


@dataclass
class Conversation:
    """A normalised sample: turns, and its images in placeholder order (resolved paths)."""

    messages: list[Message]
    images: list[Path] = field(default_factory=list)
    id: str = ""
    file: str = ""
    index: int = 0
    image_prepended: bool = False  # one image, no placeholder: placed at the start of the first user turn

    @property
    def where(self) -> str:
        return f"{self.file}: sample {self.index} (id {self.id!r})"


@dataclass(frozen=True)
class Problem:
    """One thing wrong (or worth noting) about a file, a sample or a data.txt line."""

    file: str
    index: int | None  # sample index in the file (None: the whole file / a data.txt line)
    id: str | None
    message: str
    fix: str = ""
    level: Level = "error"
    line: int | None = None  # data.txt or JSON Lines line number

    def location(self) -> str:
        loc = self.file
        if self.line is not None:
            loc += f" line {self.line}"
        if self.index is not None:
            loc += f": sample {self.index}"
            if self.id is not None:
                loc += f" (id {self.id!r})"
        return loc

    def __str__(self) -> str:
        text = f"{self.location()}: {self.message}"
        if self.fix:
            text += f". Fix: {self.fix}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "file": self.file,
            "line": self.line,
            "index": self.index,
            "id": self.id,
            "message": self.message,
            "fix": self.fix,
        }


def errors(problems: Iterable[Problem]) -> list[Problem]:
    return [p for p in problems if p.level == "error"]


def raise_first(problems: Iterable[Problem]) -> None:
    """Raise a :class:`DataError` for the first error-level problem (training stops on bad data)."""
    errs = errors(problems)
    if errs:
        more = f" ({len(errs) - 1} more problem(s); run `xcft check-data` to list them all)" if len(errs) > 1 else ""
        raise DataError(str(errs[0]) + more)


# --------------------------------------------------------------------------- reading files


def read_records(path: Path, display: str | None = None) -> tuple[list[tuple[int | None, Any]], list[Problem]]:
    """Parse a JSON array or JSON Lines file into ``(line, record)`` pairs.

    ``line`` is the JSON Lines line number (None for a JSON array). Problems: unreadable file,
    non-UTF-8 bytes, empty file, unparsable JSON (line and column), wrong top-level type.
    """
    name = display or str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return [], [
            Problem(name, None, None, "file not found", "check the path (relative paths in data.txt are relative to its folder)")
        ]
    except OSError as exc:
        return [], [
            Problem(name, None, None, f"cannot read file: {exc.strerror or exc}", "check permissions and that it is a file")
        ]
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        return [], [
            Problem(
                name,
                None,
                None,
                f"file is not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}, line {line})",
                "re-save the file as UTF-8 (e.g. `iconv -f GBK -t UTF-8 in.json > out.json`)",
            )
        ]
    if not text.strip():
        return [], [
            Problem(
                name,
                None,
                None,
                "file is empty",
                "put a JSON array of samples (or one JSON object per line) in it, or remove it from data.txt",
            )
        ]

    jsonl = path.suffix.lower() == ".jsonl"
    if not jsonl:
        try:
            data = json.loads(text)
        except (RecursionError, ValueError) as exc:
            if not isinstance(exc, json.JSONDecodeError):
                msg, failure_line = _parse_failure(exc, text)
                return [], [
                    Problem(
                        name,
                        None,
                        None,
                        msg,
                        "fix or remove that value; a sample needs only strings, lists and objects a few levels deep",
                        line=failure_line,
                    )
                ]
            # A .json file holding JSON Lines is common; accept it if every line parses.
            if exc.msg == "Extra data" and text.lstrip().startswith("{"):
                recs, probs = _read_jsonl(text, name)
                if not probs:
                    return recs, probs
            return [], [
                Problem(
                    name,
                    None,
                    None,
                    f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}",
                    "fix the syntax there (a JSON validator such as `python -m json.tool FILE` shows it)",
                )
            ]
        if isinstance(data, dict):
            return [], [
                Problem(
                    name,
                    None,
                    None,
                    "top level is a single JSON object, expected an array of samples",
                    "wrap the samples in [ ... ], or write one sample per line in a .jsonl file",
                )
            ]
        if not isinstance(data, list):
            return [], [
                Problem(
                    name,
                    None,
                    None,
                    f"top level is a JSON {_json_type(data)}, expected an array of samples",
                    "the file must be [ {sample}, {sample}, ... ]",
                )
            ]
        if not data:
            return [], [Problem(name, None, None, "the array holds no samples", "add samples or remove the file from data.txt")]
        return [(None, rec) for rec in data], []
    return _read_jsonl(text, name)


def _read_jsonl(text: str, name: str) -> tuple[list[tuple[int | None, Any]], list[Problem]]:
    records: list[tuple[int | None, Any]] = []
    problems: list[Problem] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((lineno, json.loads(line)))
        except (RecursionError, ValueError) as exc:
            problems.append(jsonl_problem(exc, line, lineno, name))
    if not records and not problems:
        problems.append(Problem(name, None, None, "file is empty", "put one JSON object per line in it"))
    return records, problems


def jsonl_problem(exc: BaseException, line: str, lineno: int, name: str) -> Problem:
    """The problem of a JSON Lines line that does not parse (``exc`` from ``json.loads(line)``)."""
    if not isinstance(exc, json.JSONDecodeError):
        msg, _ = _parse_failure(exc, line)
        return Problem(name, None, None, msg, "fix or remove that value", line=lineno)
    return Problem(
        name,
        None,
        None,
        f"invalid JSON at line {lineno} column {exc.colno}: {exc.msg}",
        "each line of a JSON Lines file must be one complete JSON object",
        line=lineno,
    )


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


def _a_json_type(value: Any) -> str:
    """The JSON type of ``value`` with its article: "an object", "an array", "a string", "null"."""
    name = _json_type(value)
    if name == "null":
        return "null"
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _max_int_digits() -> int:
    """Digits beyond which Python refuses to make an int (``sys.get_int_max_str_digits``, 3.11+; 0: no limit)."""
    get = getattr(sys, "get_int_max_str_digits", None)
    return int(get()) if get is not None and get() else 0


def _parse_failure(exc: BaseException, text: str, line_offset: int = 0) -> tuple[str, int | None]:
    """(message, line) for a parser failure that is not a JSONDecodeError (hostile input)."""
    if isinstance(exc, RecursionError):
        return (
            "JSON nested too deeply for the parser (arrays/objects inside each other about a thousand levels deep)",
            _deep_nesting_line(text, line_offset),
        )
    limit = _max_int_digits()
    if limit:
        m = re.search(rf"\d{{{limit + 1},}}", text)
        if m:
            line = text.count("\n", 0, m.start()) + 1 + line_offset
            return f"a number with {len(m.group(0))} digits (Python reads at most {limit})", line
    return f"cannot parse the file ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})", None


def _deep_nesting_line(text: str, line_offset: int = 0, limit: int = 500) -> int | None:
    """The line where arrays/objects first nest deeper than ``limit`` (strings skipped), or None."""
    depth = 0
    line = 1
    in_string = escaped = False
    for ch in text:
        if ch == "\n":
            line += 1
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return line + line_offset
        elif ch in "]}":
            depth -= 1
    return None


# --------------------------------------------------------------------------- normalising samples


def image_candidates(image: str, search_dirs: Sequence[Path]) -> list[Path]:
    """Every place an image path may point to, in the order they are tried."""
    p = Path(os.path.expanduser(image))
    if p.is_absolute():
        return [p]
    out: list[Path] = []
    for d in search_dirs:
        c = d / p
        if c not in out:
            out.append(c)
    return out


@dataclass
class _Reporter:
    """Collects the problems of one sample (its file, index, line and, once known, id)."""

    file: str
    index: int
    line: int | None
    sid: str | None = None
    problems: list[Problem] = field(default_factory=list)

    def __call__(self, msg: str, fix: str, level: Level = "error") -> None:
        self.problems.append(Problem(self.file, self.index, self.sid, msg, fix, level, self.line))


def normalize_sample(
    record: Any,
    *,
    file: str,
    index: int,
    search_dirs: Sequence[Path],
    line: int | None = None,
    check_images_exist: bool = True,
    require_answer: bool = True,
    is_file: Callable[[Path], bool] | None = None,
) -> tuple[Conversation | None, list[Problem]]:
    """Validate one raw sample; return the :class:`Conversation` (None when it has errors) and its problems.

    ``require_answer`` False accepts a conversation without an assistant turn (a question to answer).
    ``is_file``: how an image path is tested (default ``Path.is_file``; a reader of many samples
    passes one that remembers its answers).
    """
    err = _Reporter(file, index, line)
    if not isinstance(record, dict):
        err(
            f"sample is a JSON {_json_type(record)}, expected an object",
            'each sample must look like {"id": ..., "conversations": [...]}',
        )
        return None, err.problems
    _sample_id(record, index, err)
    messages = _messages(record, err, require_answer)
    image_list = _image_list(record, err) if messages is not None else None
    if messages is None or image_list is None:
        return None, err.problems
    prepended = _place_images(messages, image_list, err)
    if prepended is None:
        return None, err.problems
    images = _find_images(image_list, search_dirs, check_images_exist, err, is_file or Path.is_file)
    if errors(err.problems):
        return None, err.problems
    assert err.sid is not None, "_sample_id sets it"
    return Conversation(messages, images, err.sid, file, index, prepended), err.problems


def _sample_id(record: dict, index: int, err: _Reporter) -> None:
    """The sample's id as a string (its index when it has none); a wrong type is an error."""
    raw_id = record.get("id")
    err.sid = str(index) if raw_id is None else str(raw_id)
    if raw_id is not None and (isinstance(raw_id, bool) or not isinstance(raw_id, (str, int))):
        err(f"id must be a string or an integer, got {_a_json_type(raw_id)}", 'use e.g. "id": "sample-1" or "id": 1')


def _messages(record: dict, err: _Reporter, require_answer: bool = True) -> list[Message] | None:
    """The turns as messages with normalised roles, alternating user/assistant; None after an error."""
    convs = record.get("conversations")
    if convs is None:
        other = [k for k in ("conversation", "messages", "dialog") if k in record]
        hint = f' (found "{other[0]}": rename it to "conversations")' if other else ""
        err(
            f'missing "conversations"{hint}',
            'add "conversations": [{"from": "user", "value": ...}, {"from": "assistant", "value": ...}]',
        )
        return None
    if not isinstance(convs, list):
        err(
            f'"conversations" is {_a_json_type(convs)}, expected a list of turns',
            'write "conversations": [{"from": ..., "value": ...}, ...]',
        )
        return None
    if not convs:
        err('"conversations" is empty', "add at least one user turn and one assistant answer")
        return None
    turns = [_message(t, turn, err) for t, turn in enumerate(convs)]
    messages = [m for m in turns if m is not None]
    if len(messages) != len(turns):
        return None
    return messages if _alternates(messages, err, require_answer) else None


def _message(t: int, turn: Any, err: _Reporter) -> Message | None:
    """Turn ``t`` as a message (role names normalised); None after an error."""
    if not isinstance(turn, dict):
        err(f"turn {t} is {_a_json_type(turn)}, expected an object", 'each turn is {"from": "user"|"assistant", "value": "..."}')
        return None
    frm = turn.get("from", turn.get("role"))
    value = turn.get("value", turn.get("content"))
    if not isinstance(frm, str):
        err(f'turn {t} has no "from" string', 'add "from": "user" or "from": "assistant"')
        return None
    key = frm.strip().lower()
    role: Role
    if key in USER_ROLES:
        role = "user"
    elif key in ASSISTANT_ROLES:
        role = "assistant"
    elif key == SYSTEM_ROLE and t == 0:
        role = "system"
    elif key == SYSTEM_ROLE:
        err(
            f'turn {t} has role "system"; a system turn is allowed only as the first turn',
            "move the system text into the first turn or drop it",
        )
        return None
    else:
        err(
            f'turn {t} has unknown role "{frm}"',
            'use "user"/"human" for questions and "assistant"/"gpt"/"bot" for answers (or "system" as the first turn)',
        )
        return None
    if not isinstance(value, str):
        err(
            f'turn {t} ("{frm}") value is {_a_json_type(value)}, not a string',
            'write the turn text as a JSON string: "value": "..."',
        )
        return None
    return Message(role, value.strip())


def _alternates(messages: list[Message], err: _Reporter, require_answer: bool = True) -> bool:
    """[system] user assistant user assistant ..., with at least one answer (unless not ``require_answer``)."""
    body = messages[1:] if messages and messages[0].role == "system" else messages
    for k, msg in enumerate(body):
        expected = "user" if k % 2 == 0 else "assistant"
        if msg.role != expected:
            t = k + (len(messages) - len(body))
            err(
                f"turn {t} is from the {msg.role} where the {expected} was expected: turns must alternate user, assistant, ... starting with the user",
                "reorder or merge consecutive turns of the same speaker",
            )
            return False
    if require_answer and not any(m.role == "assistant" for m in body):
        err("the conversation has no assistant answer, so nothing would be trained", "add an assistant turn after the user turn")
        return False
    return True


def _image_list(record: dict, err: _Reporter) -> list[str] | None:
    """The sample's image paths as written (``image`` or ``images``: a string or a list); None after an error."""
    raw_images = record.get("image", record.get("images"))
    if raw_images is None:
        image_list: list[str] = []
    elif isinstance(raw_images, str):
        image_list = [raw_images]
    elif isinstance(raw_images, list) and all(isinstance(x, str) for x in raw_images):
        image_list = list(raw_images)
    else:
        err(
            f'"image" is {_a_json_type(raw_images)}, expected a path string or a list of path strings',
            'write "image": "a.jpg" or "image": ["a.jpg", "b.jpg"]',
        )
        return None
    if any(not x.strip() for x in image_list):
        err('"image" holds an empty path', "remove the empty entry or give the file name")
        return None
    return image_list


def _place_images(messages: list[Message], image_list: list[str], err: _Reporter) -> bool | None:
    """Match placeholders to images; one image without a placeholder goes first (returns True). None after an error."""
    n_placeholders = sum(m.text.count(IMAGE_PLACEHOLDER) for m in messages)
    if n_placeholders == len(image_list):
        return False
    llava = any(LLAVA_PLACEHOLDER in m.text for m in messages)
    if n_placeholders == 0 and llava:
        err(
            f'found LLaVA-style "{LLAVA_PLACEHOLDER}" but no "{IMAGE_PLACEHOLDER}" ({len(image_list)} image(s))',
            f'replace "{LLAVA_PLACEHOLDER}" with "{IMAGE_PLACEHOLDER}" in the turn text',
        )
        return None
    if n_placeholders == 0 and len(image_list) == 1:
        first_user = next(i for i, m in enumerate(messages) if m.role == "user")
        messages[first_user] = Message("user", IMAGE_PLACEHOLDER + messages[first_user].text)
        err(
            f'one image and no "{IMAGE_PLACEHOLDER}": the image is placed at the start of the first user turn '
            "(InternLM-XComposer-2.5 models: right after <s>, before the first turn)",
            f'put "{IMAGE_PLACEHOLDER}" where the image belongs to choose its place',
            level="info",
        )
        return True
    hint = f' (the text contains "{LLAVA_PLACEHOLDER}": use "{IMAGE_PLACEHOLDER}" instead)' if llava else ""
    err(
        f'{n_placeholders} "{IMAGE_PLACEHOLDER}" placeholder(s) but {len(image_list)} image(s){hint}',
        f'give one "{IMAGE_PLACEHOLDER}" per image, in the order of the "image" list',
    )
    return None


def _find_images(
    image_list: list[str], search_dirs: Sequence[Path], check_exist: bool, err: _Reporter, is_file: Callable[[Path], bool]
) -> list[Path]:
    """Each image path resolved against the search folders (a missing or odd file is an error)."""
    images: list[Path] = []
    for img in image_list:
        cands = image_candidates(img.strip(), search_dirs)
        found = next((c for c in cands if is_file(c)), None) if check_exist else cands[0]
        if found is None:
            odd = next((c for c in cands if os.path.lexists(c)), None)
            if odd is not None:  # a folder or a FIFO named like an image: never opened
                err(f'image "{img}" {image_file_problem(odd)} ({odd.absolute()})', "point the path at the image file itself")
                continue
            looked = ", ".join(str(c.absolute()) for c in cands)
            err(
                f'image "{img}" not found (looked in: {looked})',
                "fix the path; relative image paths are resolved against the data.txt folder, then the JSON file's folder",
            )
            continue
        images.append(found)
    return images


def read_file(
    path: Path,
    *,
    search_dirs: Sequence[Path] | None = None,
    display: str | None = None,
    check_images_exist: bool = True,
    require_answer: bool = True,
) -> tuple[list[Conversation | None], list[Problem]]:
    """Read and normalise every sample of one file.

    Returns one entry per sample in file order (None for samples with errors, so that indices stay
    the file's own) and every problem found. ``search_dirs`` are the folders image paths are
    resolved against (default: the file's folder).
    """
    path = Path(path)
    name = display or str(path)
    dirs = list(search_dirs) if search_dirs is not None else [path.parent]
    records, problems = read_records(path, name)
    out: list[Conversation | None] = []
    for index, (line, record) in enumerate(records):
        conv, probs = normalize_sample(
            record,
            file=name,
            index=index,
            search_dirs=dirs,
            line=line,
            check_images_exist=check_images_exist,
            require_answer=require_answer,
        )
        out.append(conv)
        problems.extend(probs)
    return out, problems


def load_conversations(path: Path, *, search_dirs: Sequence[Path] | None = None) -> list[Conversation]:
    """Read one file for training: raise :class:`DataError` on the first error."""
    convs, problems = read_file(path, search_dirs=search_dirs)
    raise_first(problems)
    return [c for c in convs if c is not None]


__all__ = [
    "ASSISTANT_ROLES",
    "IMAGE_PLACEHOLDER",
    "USER_ROLES",
    "Conversation",
    "Message",
    "Problem",
    "errors",
    "image_candidates",
    "jsonl_problem",
    "load_conversations",
    "normalize_sample",
    "raise_first",
    "read_file",
    "read_records",
]
