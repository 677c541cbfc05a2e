"""``xcft eval`` on a tiny model folder with a small mixture in the official layout."""

from __future__ import annotations

import json
import math

import torch

torch.set_num_threads(1)


def test_eval_prints_per_sample_losses(tiny_base, tiny_data, capsys):
    from xcft.cli import main
    from xcft.data.dataset import DataCollator, build_dataset
    from xcft.model.loading import load_pretrained

    rc = main(["eval", str(tiny_data), "--model", str(tiny_base), "--device", "cpu", "--batch-size", "3", "--format", "json"])
    captured = capsys.readouterr()
    assert rc == 0
    assert "eval" in captured.err  # tqdm progress on stderr
    result = json.loads(captured.out)
    samples = result["samples"]
    assert [s["index"] for s in samples] == list(range(len(samples))) and len(samples) == 6
    assert all(set(s) >= {"index", "id", "loss", "tokens"} for s in samples)
    # a random model is close to uniform over the 1000-piece vocabulary
    assert all(abs(s["loss"] - math.log(1000)) < 1.0 and s["tokens"] > 0 for s in samples)
    total = sum(s["loss"] * s["tokens"] for s in samples) / sum(s["tokens"] for s in samples)
    assert abs(result["mean_loss"] - total) < 1e-6 * total

    # the first sample alone, through the training data path and the plain forward
    model, tok = load_pretrained(tiny_base, dtype="float32", device="cpu")
    ds = build_dataset(tiny_data.parent / "data" / "text.json", tok, model.config.img_size, model.config.max_length)
    item = (
        ds[0]
        if ds.conversation(0).index == samples[0]["file_index"]
        else next(ds[i] for i in range(len(ds)) if ds.conversation(i).index == samples[0]["file_index"])
    )
    with torch.no_grad():
        loss = model(**DataCollator(2)([item])).loss.item()
    assert abs(loss - samples[0]["loss"]) < 1e-5 * loss


def test_eval_text_output(tiny_base, tiny_data, capsys):
    from xcft.commands.eval import eval_command

    rc = eval_command(
        str(tiny_data.parent / "data" / "text.json"),
        model_dir=str(tiny_base),
        max_length=64,
        batch_size=2,
        output_format="text",
        dtype="float32",
        device="cpu",
    )
    out = capsys.readouterr().out
    assert rc == 0
    lines = out.strip().splitlines()
    assert lines[0].split()[:4] == ["index", "id", "tokens", "loss"]
    assert lines[-1].startswith("mean loss") and "supervised tokens" in lines[-1]
