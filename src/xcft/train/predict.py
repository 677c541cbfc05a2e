"""Answers of a model to every sample of a data set, in batches, as one JSON line per sample.

A sample's conversation up to its last user turn is the prompt (a first system turn is the system
prompt, earlier turns the history, its images where its placeholders put them); the assistant turn
after it, when there is one, is the reference. The prompt is built as ``model.chat`` builds it
(:meth:`~xcft.model.modeling_xcomposer2.XComposer2ForCausalLM.chat_inputs`) and the answers come from
:meth:`~xcft.model.modeling_xcomposer2.XComposer2ForCausalLM.answer_batch`, so greedy answers equal
what ``xcft chat`` gives for the same question.

The prediction file is appended batch by batch and read back before a run: samples whose
``(source, id)`` it already holds are skipped, so an interrupted run continues where it stopped
(a line cut short by the interruption is dropped and its sample predicted again).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from xcft.data.cache_options import CacheOptions
from xcft.data.images import open_checked_image
from xcft.data.mixture import resolve_data
from xcft.data.read_pass import source_table
from xcft.data.schema import Conversation, Problem, normalize_sample
from xcft.data.sizes import ModelSizes, model_sizes, resolve_sizes
from xcft.data.table import SampleTable
from xcft.errors import DataError, XcftError

logger = logging.getLogger(__name__)

__all__ = [
    "NOT_PREDICTED",
    "PREDICTION_KEYS",
    "AnswerEval",
    "ChatSettings",
    "Prediction",
    "PromptSample",
    "answer_eval",
    "predict_samples",
    "prompt_inputs",
    "prompt_sample",
    "prompt_samples_for",
    "read_predictions",
    "read_prompt_samples",
]

#: The end of ``xcft predict``'s last line when it answered every sample it could and named the others (exit status 1).
NOT_PREDICTED = "sample(s) not predicted (named above)"
#: The keys of every prediction line (``xcft score`` reads ``id``, ``source``, ``reference`` and ``prediction``).
PREDICTION_KEYS = ("id", "source", "index", "question", "prompt", "reference", "prediction", "new_tokens", "seconds")


@dataclass
class PromptSample:
    """What to ask for one sample, and the answer it expects (None: the sample ends with the question)."""

    id: str
    source: str
    index: int
    query: str
    history: list[tuple[str, str]]
    images: list[Path]
    system: str | None = None  # the sample's own system turn
    reference: str | None = None

    @property
    def where(self) -> str:
        return f"{self.source}: sample {self.index} (id {self.id!r})"


@dataclass
class Prediction:
    """One line of a prediction file (``seconds``: the batch's time over its samples)."""

    id: str
    source: str
    index: int
    question: str  # the last user turn
    prompt: str  # the whole prompt text, <ImageHere> where the images go
    reference: str | None
    prediction: str
    new_tokens: int
    seconds: float


@dataclass(frozen=True)
class ChatSettings:
    """How to prompt and decode: ``model.chat``'s keywords (see :func:`xcft.commands.chat.generation_settings`)."""

    max_new_tokens: int = 256
    greedy: bool = True
    system: str | None = None  # None: the layout's; "" none
    layout: str | None = None
    hd_num: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # more generate() keywords


def prompt_sample(conv: Conversation) -> PromptSample | str:
    """The prompt and reference of a conversation, or why it has none."""
    messages = list(conv.messages)
    system = None
    if messages and messages[0].role == "system":
        system = messages.pop(0).text
    last_user = max((k for k, m in enumerate(messages) if m.role == "user"), default=None)
    if last_user is None:
        return "no user turn to answer"
    reference = messages[last_user + 1].text if last_user + 1 < len(messages) else None
    earlier = messages[:last_user]
    history = [(earlier[k].text, earlier[k + 1].text) for k in range(0, len(earlier), 2)]
    return PromptSample(conv.id, conv.file, conv.index, messages[last_user].text, history, list(conv.images), system, reference)


def _table_conversations(table: SampleTable) -> Iterator[tuple[Conversation | None, list[Problem]]]:
    """Each sample of a file's table as a conversation to ask, or the problems that rule it out.

    The table is training's reading of the file; a sample that training refused only for want of
    an answer is read again without that requirement (a question to answer is what predict needs).
    Training-only findings (nothing left to train after truncation) are not problems here.
    """
    by_index: dict[int, list[Problem]] = {}
    for problem in table.problems:
        if problem.index is not None:
            by_index.setdefault(problem.index, []).append(problem)
    cols = table.columns
    for k in range(len(table)):
        if cols["has_conversation"][k]:
            if not cols["encoded"][k]:  # an image that cannot be used
                yield None, [p for p in by_index.get(k, []) if p.level == "error"]
                continue
            yield table.conversation(k), []
            continue
        line = int(cols["line"][k])
        conv, probs = normalize_sample(
            table.raw_record(k),
            file=table.display,
            index=k,
            search_dirs=table.search_dirs,
            line=line if line >= 0 else None,
            require_answer=False,
        )
        yield conv, probs


def read_prompt_samples(
    data: str | os.PathLike[str], model: Any, tokenizer: Any, cache: CacheOptions | None = None
) -> tuple[list[PromptSample], list[Problem]]:
    """Every sample of a data.txt (each file's samples once, in order) or one JSON/JSONL file.

    Files are read through the preprocessing cache with the model's tokenizer and training sizes,
    so a set that check-data, training or eval has read is mapped, not read again. Samples with
    errors are left out and named in the problems; a data argument that cannot be read at all
    raises :class:`DataError`.
    """
    return prompt_samples_for(data, model_sizes(model.config), tokenizer, cache)


def prompt_samples_for(
    data: str | os.PathLike[str], model: ModelSizes, tokenizer: Any, cache: CacheOptions | None = None
) -> tuple[list[PromptSample], list[Problem]]:
    """:func:`read_prompt_samples` for a model known by its sizes (e.g. a folder's, read without loading it)."""
    sizes = resolve_sizes(model)
    spec, problems = resolve_data(data)
    if spec is None:
        raise DataError(str(problems[0]))
    errors = [p for p in problems if p.level == "error"]
    if errors and not spec.sources:
        raise DataError(str(errors[0]))
    samples: list[PromptSample] = []
    for source in spec.sources:
        table = source_table(spec, source, tokenizer, sizes.image_spec, sizes.max_length, cache=cache)
        problems += [p for p in table.problems if p.index is None]  # the file itself (its JSON)
        seen: dict[str, int] = {}
        for conv, file_problems in _table_conversations(table):
            problems += file_problems
            if conv is None:
                continue
            sample = prompt_sample(conv)
            if isinstance(sample, str):
                problems.append(Problem(conv.file, conv.index, conv.id, sample, "end the conversation with a user turn"))
            elif sample.id in seen:
                problems.append(
                    Problem(conv.file, conv.index, conv.id, f"id repeats sample {seen[sample.id]}", "give each sample its own id")
                )
            else:
                seen[sample.id] = sample.index
                samples.append(sample)
    return samples, problems


#: How every line xcft predict writes begins (``json.dumps`` of a :class:`Prediction`): a cut line is recognised by it.
LINE_START = b'{"id": '


def _prediction_row(path: Path, number: int, line: bytes) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise XcftError(f"{path} line {number}: not JSON ({exc.msg}); give a file xcft predict wrote") from None
    if not isinstance(row, dict) or not {"id", "source", "prediction"} <= row.keys():
        raise XcftError(f"{path} line {number}: not a prediction (needs id, source, prediction); give a file xcft predict wrote")
    return row


def read_predictions(path: str | os.PathLike[str], *, repair: bool = False) -> list[dict[str, Any]]:
    """The lines of a prediction file; ``repair`` drops a last line an interruption cut short (in the file too).

    Any other line that is not a prediction is an error, and then nothing is changed: the file is
    not one ``xcft predict`` wrote.
    """
    path = Path(path)
    if not path.exists():
        if repair:
            return []
        raise XcftError(f"{path}: no such prediction file")
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    tail = lines.pop()  # "" when the file ends with a newline
    out = [_prediction_row(path, number, line) for number, line in enumerate(lines, 1) if line.strip()]
    if not tail.strip():
        return out
    try:
        out.append(_prediction_row(path, len(lines) + 1, tail))
    except XcftError:
        if not (repair and tail.startswith(LINE_START)):
            raise
        logger.warning("%s: its last line was cut short (an interrupted run); that sample is predicted again", path)
        with open(path, "r+b") as f:
            f.truncate(len(raw) - len(tail))
        return out
    if repair:  # a whole last line without its newline: end it, so that the next line starts on its own
        with open(path, "ab") as f:
            f.write(b"\n")
    return out


def _batches(items: Sequence[PromptSample], size: int) -> Iterator[list[PromptSample]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def prompt_inputs(model: Any, tokenizer: Any, sample: PromptSample, settings: ChatSettings) -> Any:
    """The sample as ``model.chat`` inputs (its images decoded); DataError when they cannot be built."""
    from xcft.model.template_xcomposer2 import FAMILY_DEFAULT

    images = [open_checked_image(p) for p in sample.images]
    system: Any = sample.system if sample.system is not None else settings.system
    if system is None:
        system = FAMILY_DEFAULT
    try:
        return model.chat_inputs(
            tokenizer,
            sample.query,
            images,
            sample.history,
            meta_instruction=system or None,
            hd_num=settings.hd_num,
            prompt_layout=settings.layout,
        )
    except ValueError as exc:  # placeholders and images do not match
        raise DataError(str(exc)) from None


def predict_samples(
    model: Any,
    tokenizer: Any,
    samples: Sequence[PromptSample],
    output: str | os.PathLike[str],
    *,
    settings: ChatSettings,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[int, list[str]]:
    """Predict the samples ``output`` does not hold yet, appending one line each; returns (predicted, failures).

    A sample that cannot be prompted (an unreadable image, placeholders that do not match its
    images) is named in the failures and the rest go on. ``progress(done, total)`` after each batch.
    """
    output = Path(output)
    done = {(str(r["source"]), str(r["id"])) for r in read_predictions(output, repair=True)}
    todo = [s for s in samples if (s.source, s.id) not in done]
    if len(todo) < len(samples):
        logger.info(
            "%s holds %d of the %d samples; predicting the other %d", output, len(samples) - len(todo), len(samples), len(todo)
        )
    failures: list[str] = []
    written = 0
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "a", encoding="utf-8") as out:
        for batch in _batches(todo, max(1, batch_size)):
            ready, inputs = [], []
            for sample in batch:
                try:
                    inputs.append(prompt_inputs(model, tokenizer, sample, settings))
                    ready.append(sample)
                except DataError as exc:
                    failures.append(f"{sample.where}: {exc}")
                    logger.error("%s: %s (skipped)", sample.where, exc)
            if ready:
                start = time.perf_counter()
                answers = model.answer_batch(
                    tokenizer, inputs, max_new_tokens=settings.max_new_tokens, do_sample=not settings.greedy, **settings.extra
                )
                seconds = (time.perf_counter() - start) / len(ready)
                lines = [
                    json.dumps(
                        asdict(
                            Prediction(
                                s.id, s.source, s.index, s.query, p.text, s.reference, text, len(tokens), round(seconds, 4)
                            )
                        ),
                        ensure_ascii=False,
                    )
                    + "\n"
                    for s, p, (text, tokens) in zip(ready, inputs, answers)
                ]
                out.write("".join(lines))
                out.flush()
                os.fsync(out.fileno())
                written += len(ready)
            if progress is not None:
                progress(len(batch), len(todo))
    return written, failures


@dataclass
class AnswerEval:
    """Answer metrics of a model on a fixed list of samples, for evaluations during training.

    The samples are answered greedily as :func:`predict_samples` answers them (same prompts, same
    batching) and scored by :func:`xcft.train.answer_metrics.score_predictions`; the overall scores
    come back by metric name.
    """

    samples: list[PromptSample]
    tokenizer: Any
    metrics: tuple[str, ...]
    settings: ChatSettings
    batch_size: int = 8

    def run(self, model: Any) -> dict[str, float]:
        from xcft.train.answer_metrics import score_predictions

        model = model.get_base_model() if hasattr(model, "get_base_model") else model
        was_training = model.training
        model.eval()
        rows: list[dict[str, Any]] = []
        try:
            for batch in _batches(self.samples, self.batch_size):
                inputs = [prompt_inputs(model, self.tokenizer, s, self.settings) for s in batch]
                answers = model.answer_batch(
                    self.tokenizer, inputs, max_new_tokens=self.settings.max_new_tokens, do_sample=False, use_cache=True
                )
                rows += [
                    {"id": s.id, "source": s.source, "question": s.query, "reference": s.reference, "prediction": text}
                    for s, (text, _) in zip(batch, answers)
                ]
        finally:
            model.train(was_training)
        overall = score_predictions(rows, self.metrics).groups["overall"]
        return {m: float(overall[m]) for m in self.metrics if overall.get(m) is not None}

    @classmethod
    def from_conversations(
        cls, conversations: Sequence[Conversation], tokenizer: Any, metrics: tuple[str, ...], limit: int, max_new_tokens: int
    ) -> AnswerEval:
        """The first ``limit`` conversations that end with a reference answer."""
        samples = []
        for conv in conversations:
            s = prompt_sample(conv)
            if isinstance(s, PromptSample) and s.reference is not None:
                samples.append(s)
            if len(samples) >= limit:
                break
        return cls(samples, tokenizer, metrics, ChatSettings(max_new_tokens=max_new_tokens))


def answer_eval(cfg: Any, eval_dataset: Any, tokenizer: Any) -> AnswerEval | None:
    """The :class:`AnswerEval` a training run's ``--eval_metrics`` asks for (None without it)."""
    from xcft.train.answer_metrics import parse_metrics

    if not cfg.data.eval_metrics:
        return None
    metrics = parse_metrics(cfg.data.eval_metrics)
    if eval_dataset is None:
        raise XcftError("--eval_metrics needs an eval set: give --eval_data_path or --eval_split")
    if cfg.data.eval_generate_samples < 1:
        raise XcftError(f"--eval_generate_samples must be at least 1, got {cfg.data.eval_generate_samples}")
    conversations = [c for f in eval_dataset.files for c in f.conversations]
    evaluation = AnswerEval.from_conversations(
        conversations, tokenizer, metrics, cfg.data.eval_generate_samples, cfg.data.eval_max_new_tokens
    )
    logger.info("eval answers: %d sample(s), metrics %s", len(evaluation.samples), ", ".join(metrics))
    return evaluation
