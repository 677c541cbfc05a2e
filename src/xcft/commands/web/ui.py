"""What every tab of ``xcft web`` shows the same way: status lines, error messages, the page's CSS.

Plain strings (and table values) only, no Gradio, so the tabs' views and their tests share one rendering. Errors are
the CLI's one-line messages with the CLI's flag names replaced by the names of the page's fields.
"""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from xcft.errors import XcftError

logger = logging.getLogger(__name__)

CSS = """
.xcft-status { padding: 6px 10px; border-radius: 6px; background: var(--background-fill-secondary); }
.xcft-error { background: #fde8e8; color: #9b1c1c; font-weight: 600; }
.xcft-ok { background: #e7f6ec; color: #14532d; }
.xcft-sample { font-size: 14px; }
.xcft-where { font-weight: 600; margin-bottom: 4px; }
.xcft-counts { display: flex; flex-wrap: wrap; gap: 14px; margin: 6px 0; }
.xcft-truncated { color: #b45309; }
.xcft-thumbs { display: flex; flex-wrap: wrap; gap: 10px; margin: 8px 0; }
.xcft-thumb { margin: 0; border: 1px solid #ccc; border-radius: 6px; padding: 4px; text-align: center; }
.xcft-thumb img { max-width: 160px; max-height: 160px; display: block; margin: auto; }
.xcft-thumb figcaption { font-size: 12px; max-width: 160px; overflow-wrap: anywhere; }
.xcft-dropped { opacity: 0.45; }
.xcft-broken { width: 160px; color: #9b1c1c; font-size: 12px; }
.xcft-seq { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 13px; line-height: 1.7;
            border: 1px solid #ddd; border-radius: 6px; padding: 8px; max-height: 480px; overflow: auto; }
.xcft-trained { background: #bbf7d0; color: #14532d; border-radius: 3px; }
.xcft-context { color: inherit; }
.xcft-special { color: #6b7280; font-size: 11px; }
.xcft-slot { display: inline-block; background: #dbeafe; color: #1e3a8a; border: 1px solid #93c5fd;
             border-radius: 4px; padding: 0 6px; margin: 0 2px; font-size: 12px; }
.xcft-cut { display: inline-block; background: #fef3c7; color: #92400e; border-radius: 4px; padding: 0 6px; }
.xcft-legend { font-size: 12px; margin: 4px 0; }
.xcft-problems { margin: 4px 0; padding-left: 18px; }
.xcft-problem.xcft-error { background: none; }
.xcft-run progress { width: 100%; height: 14px; }
.xcft-probe { font-size: 16px; }
.xcft-empty-answer { color: #6b7280; font-style: italic; }
/* newest line at the bottom and in view: a reversed flex column starts scrolled to its end */
.xcft-log { display: flex; flex-direction: column-reverse; overflow: auto; max-height: 300px;
            border: 1px solid var(--border-color-primary); border-radius: 6px; }
.xcft-log pre { margin: 0; padding: 6px 8px; font-family: ui-monospace, monospace; font-size: 12px;
                white-space: pre-wrap; overflow-wrap: anywhere; }
.xcft-eval-sample { display: flex; gap: 12px; align-items: flex-start; border: 1px solid var(--border-color-primary);
                    border-radius: 6px; padding: 8px; margin: 8px 0; }
.xcft-eval-sample .xcft-thumbs { margin: 0; flex: 0 0 auto; max-width: 45%; }
.xcft-eval-sample .xcft-thumb img { max-width: 96px; max-height: 96px; }
.xcft-eval-sample .xcft-thumb figcaption { max-width: 96px; }
.xcft-eval-sample .xcft-noimage { width: 96px; font-size: 12px; color: #6b7280; }
.xcft-eval-text { flex: 1; min-width: 0; }
.xcft-answer { margin: 3px 0; padding: 2px 6px; border-radius: 4px; white-space: pre-wrap; }
.xcft-right { background: #e7f6ec; }
.xcft-wrong { background: #fde8e8; }
.xcft-change { border-radius: 4px; padding: 0 6px; font-size: 12px; }
.xcft-change.xcft-fixed { background: #bbf7d0; color: #14532d; }
.xcft-change.xcft-broken { background: #fecaca; color: #9b1c1c; }
.xcft-question, .xcft-reference { white-space: pre-wrap; margin: 3px 0; }
#export-log textarea { font-family: ui-monospace, monospace; font-size: 12px; }
"""

#: Flags of the CLI that the Data tab's fields stand for.
DATA_FIELDS = {
    "--model": "the model folder",
    "--max-length": "max_length",
    "--img-size": "img_size",
    "--hd-num": "hd_num",
    "--given-num": "given_num",
}
#: Flags of ``xcft merge`` that the Export tab's fields stand for.
EXPORT_FIELDS = {
    "--adapter": "the adapter folder",
    "--output": "the output folder",
    "--base": "the base model field",
}
#: Flags of ``xcft predict`` that the Eval tab's fields stand for.
EVAL_FIELDS = {
    "--model": "the model folder",
    "--batch-size": "batch size",
    "--max-new-tokens": "max new tokens",
    "--limit": "limit",
    "--metrics": "metrics",
}
#: Flags of ``xcft chat`` that the Chat tab's fields stand for.
CHAT_FIELDS = {"--model": "the model folder", "--image": "an image", "--hd-num": "hd_num", "--base": "a base model"}


def in_page_terms(text: str, fields: Mapping[str, str]) -> str:
    """``text`` with each CLI flag in ``fields`` replaced by the name of the page's field for it."""
    for flag, name in fields.items():
        text = re.sub(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", name, text)
    return text


def message(exc: BaseException, fields: Mapping[str, str] | None = None) -> str:
    """The one-line message of an error: a user error as the CLI words it, anything else named."""
    if isinstance(exc, XcftError):
        return in_page_terms(str(exc), fields or {})
    logger.exception("unexpected error in a web handler")
    return f"{type(exc).__name__}: {exc}"


def status(text: str, kind: str = "", **data: object) -> str:
    """A status line; ``kind`` "error" or "ok" colours it, ``data`` become ``data-*`` attributes."""
    cls = {"error": " xcft-error", "ok": " xcft-ok"}.get(kind, "")
    prefix = "error: " if kind == "error" else ""
    attrs = "".join(f' data-{k.replace("_", "-")}="{html.escape(str(v))}"' for k, v in data.items())
    return f'<div class="xcft-status{cls}"{attrs}>{html.escape(prefix + text)}</div>'


def error(exc: BaseException, fields: Mapping[str, str] | None = None) -> str:
    """The status line of an error."""
    return status(message(exc, fields), "error")


def table_frame(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> Any:
    """Rows under their headers as a table component's value (a pandas DataFrame)."""
    import pandas as pd  # lazy: tables only, slow to import

    return pd.DataFrame(list(rows), columns=list(headers))


def log_html(text: str) -> str:
    """A log in a box that keeps its last line in view."""
    return f'<div class="xcft-log"><pre>{html.escape(text)}</pre></div>'
