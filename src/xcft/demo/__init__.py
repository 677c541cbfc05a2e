"""``xcft demo``: an end-to-end run on synthetic coloured-shape data that finishes in minutes on a CPU."""

from __future__ import annotations

from typing import Any

__all__ = ["demo_command", "run_demo"]


def demo_command(*, output: str, steps: int | None, quick: bool, output_format: str = "text") -> int:
    """Run the demo and print its table (``output_format="text"``) or one JSON object (``"json"``)."""
    from xcft.demo.run import demo_command as _demo_command

    return _demo_command(output=output, steps=steps, quick=quick, output_format=output_format)


def run_demo(output: str, **kwargs: Any):
    """Library form of the demo; returns a :class:`xcft.demo.run.DemoResult`."""
    from xcft.demo.run import run_demo as _run_demo

    return _run_demo(output, **kwargs)
