"""``xcft web``: a browser UI over the library — Data (check-data and the sample view), Train (the
``xcft train`` form, runs as subprocesses), Eval (``xcft predict`` of one or two models as a
subprocess, ``xcft score``'s table and the answers side by side), Chat and Export (``xcft merge``).

Needs the optional ``web`` extra (Gradio): ``pip install 'xcft[web]'``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from xcft.errors import XcftError


def web_command(*, host: str = "127.0.0.1", port: int = 7860, workdir: str = "xcft-web", device: str | None = None) -> int:
    """Serve the UI until interrupted; training and eval runs started from it keep running after it stops."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio polls itself at start; not news to the user
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise XcftError("xcft web needs Gradio: pip install 'xcft[web]' (or make setup)") from None
    from xcft.commands.web.app import build_app, launch

    folder = Path(workdir).expanduser()
    demo = build_app(folder, device=device)
    launch(
        demo,
        host,
        port,
        on_ready=lambda url: print(
            f"xcft web: open {url}  (work folder {folder.resolve()}; Ctrl-C stops the server, not the runs)", flush=True
        ),
    )
    return 0


__all__ = ["web_command"]
