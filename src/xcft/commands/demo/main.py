"""Entry point of ``xcft demo``: the SFT demo (:mod:`.run`) or the DPO demo (:mod:`.dpo`)."""

from __future__ import annotations

from xcft.commands.demo.dpo import format_dpo_table, run_dpo_demo
from xcft.commands.demo.report import to_json
from xcft.commands.demo.run import _redirect, demo_command
from xcft.errors import XcftError

__all__ = ["demo_main"]


def demo_main(
    *, output: str, steps: int | None, quick: bool, output_format: str = "text", family: str = "2.0", stage: str = "sft"
) -> int:
    """``xcft demo [--stage sft|dpo]``: run the demo, print its table (or one JSON object)."""
    if stage != "dpo":
        return demo_command(output=output, steps=steps, quick=quick, output_format=output_format, family=family)
    if family != "2.0":
        raise XcftError("xcft demo --stage dpo runs on the 2.0 tiny model; drop --family")
    quiet = output_format == "json"
    with _redirect(quiet):
        result = run_dpo_demo(output, quick=quick, steps=steps, quiet=quiet).to_dict()
    print(to_json(result) if quiet else "\n" + format_dpo_table(result))
    return 0
