"""Checkpoint folders of a run: resume, rotation, staging.

Names and completeness are the run-file contract (:mod:`xcft.run_files`); this module acts on
them: which checkpoint ``--resume_from_checkpoint`` means, which old checkpoints
``save_total_limit`` deletes (only xcft's own), and the staging folder that makes a save atomic.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

from xcft.errors import XcftError
from xcft.output_dir import own_checkpoints
from xcft.run_files import (
    RESUME_LATEST_WORDS,
    STAGING_DIR_NAME,
    TRAINER_STATE_NAME,
    find_last_checkpoint,
    is_complete_checkpoint,
    resume_requested,
)

logger = logging.getLogger(__name__)

__all__ = ["clear_staging", "remaining_checkpoint", "remove_staged", "resolve_resume", "rotate_own_checkpoints"]


def remaining_checkpoint(output_dir: str | os.PathLike) -> str:
    """What a failed save leaves intact, for its error line."""
    last = find_last_checkpoint(output_dir)
    if last is None:
        return "no complete checkpoint was written before"
    return f"the last complete checkpoint, {last}, is intact (continue with --resume_from_checkpoint true)"


def rotate_own_checkpoints(output_dir: str | os.PathLike, limit: int, best: str | None = None) -> list[Path]:
    """Delete the oldest checkpoints xcft wrote beyond ``limit`` (the best one is kept); returns the deleted ones.

    Only folders that carry xcft's marker count: a ``checkpoint-N`` someone else put there is never deleted.
    """
    found = own_checkpoints(output_dir)
    if best is not None:
        best_path = Path(best).resolve()
        keep_best = [c for c in found if c.resolve() == best_path]
        if keep_best:
            if limit == 1 and found[-1] != keep_best[0]:
                limit = 2  # keep the best and the latest (so that training can resume)
            found = [c for c in found if c not in keep_best] + keep_best
    doomed = found[: max(0, len(found) - limit)]
    for path in doomed:
        logger.info("deleting older checkpoint %s (save_total_limit %d)", path, limit)
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def resolve_resume(value: str | None, output_dir: str | os.PathLike) -> str | None:
    """Turn ``--resume_from_checkpoint`` (a path, ``true`` or ``false``) into a checkpoint path or None."""
    if not resume_requested(value):
        return None
    text = str(value).strip()
    if text.lower() in RESUME_LATEST_WORDS:
        last = find_last_checkpoint(output_dir)
        if last is None:
            logger.info("--resume_from_checkpoint true: no complete checkpoint in %s yet, starting from scratch", output_dir)
        else:
            logger.info("resuming from %s", last)
        return last
    if not Path(text).is_dir():
        raise XcftError(f"--resume_from_checkpoint {text}: no such folder; pass a checkpoint-N folder or 'true' for the latest")
    if not is_complete_checkpoint(text):
        raise XcftError(
            f"--resume_from_checkpoint {text} is not a complete checkpoint (a checkpoint-N folder with {TRAINER_STATE_NAME}); "
            "pass 'true' to pick the latest complete one"
        )
    return text


def clear_staging(output_dir: str | os.PathLike) -> None:
    """Remove half-written checkpoints left by a process killed during a save."""
    staging = Path(output_dir) / STAGING_DIR_NAME
    if staging.exists():
        if any(staging.iterdir()):
            logger.info("removing the unfinished save(s) in %s (a run was stopped while saving)", staging)
        shutil.rmtree(staging, ignore_errors=True)


def remove_staged(staging: str | os.PathLike, name: str) -> None:
    """Remove a half-written save (freeing its space) and the staging folder when nothing else is in it."""
    shutil.rmtree(os.path.join(staging, name), ignore_errors=True)
    with contextlib.suppress(OSError):
        os.rmdir(staging)
