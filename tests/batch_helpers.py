"""Random items in the batch contract (docs/ARCHITECTURE.md), shared by the model and packing tests."""

from __future__ import annotations

import torch


def random_item(model, gen: torch.Generator, n_text: int = 12, images: int = 1, prompt_divisor: int = 2) -> dict[str, torch.Tensor]:
    """BOS and text, then per image a block of slots followed by text; the first 1/prompt_divisor is prompt."""
    T = model.image_tokens
    ids = [1] + torch.randint(3, 290, (n_text,), generator=gen).tolist()
    mask = [False] * len(ids)
    for _ in range(images):
        ids += [2] * T
        mask += [True] * T
        more = torch.randint(3, 290, (n_text,), generator=gen).tolist()
        ids += more
        mask += [False] * len(more)
    ids_t = torch.tensor(ids)
    labels = ids_t.clone()
    labels[: len(ids) // prompt_divisor] = -100
    labels[torch.tensor(mask)] = -100
    size = model.config.img_size
    return {
        "input_ids": ids_t,
        "labels": labels,
        "image_mask": torch.tensor(mask),
        "pixel_values": torch.randn(images, 3, size, size, generator=gen),
    }
