"""Reward models as the official InternLM-XComposer-2.5-Reward defines them.

A conversation is encoded as for training, followed by the reward token ``[UNUSED_TOKEN_130]``
after its ``</s>``; a linear score head (hidden size -> 1, no bias) reads the final hidden state
at that token (the last non-padding position). Loss per pair: ``-log sigmoid(r_chosen - r_rejected)``,
averaged over pairs. Chosen and rejected run in one batch, each image encoded once per pair.

The output folder holds the model (or LoRA adapter) as ``--stage sft`` writes it, plus
``reward_head.safetensors`` (one tensor, ``v_head.weight`` [1, hidden]) and ``reward_head.json``
(the reward token and where the score is read), so plain transformers + safetensors load it.
A model that was not trained as a reward model gets a freshly initialised head.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from xcft.errors import XcftError
from xcft.model.loading import read_state_dict, write_model_code
from xcft.train.dpo import PAIR_KEYS, PairTrainer

logger = logging.getLogger(__name__)

REWARD_TOKEN = "[UNUSED_TOKEN_130]"
REWARD_HEAD_NAME = "reward_head.safetensors"
REWARD_HEAD_CONFIG_NAME = "reward_head.json"
HEAD_WEIGHT_KEY = "v_head.weight"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"  # what peft's save_pretrained writes
#: Names in :class:`RewardModel`'s state dict: the language model's prefix and the head's weight
#: (the head file keeps the module's name).
LM_PREFIX = "lm."
HEAD_PARAMETER = HEAD_WEIGHT_KEY


def reward_token_id(tokenizer: Any) -> int:
    """Id of the reward token; an error naming the fix when the tokenizer has no such single piece."""
    ids = tokenizer.encode_text(REWARD_TOKEN)
    if len(ids) != 1:
        raise XcftError(
            f"the tokenizer has no single piece {REWARD_TOKEN} (it splits it into {len(ids)} tokens); a reward model "
            "reads its score at that token. Use a model folder with the InternLM2 tokenizer.model"
        )
    return int(ids[0])


class RewardModel(nn.Module):
    """A causal LM (or its peft wrapper) with a score head on the last non-padding position."""

    def __init__(self, lm: nn.Module, hidden_size: int, head: nn.Linear | None = None, *, seed: int = 0) -> None:
        super().__init__()
        self.lm: Any = lm  # XComposer2ForCausalLM or its peft wrapper
        if head is None:  # a new head from its own generator: the same on every rank and in every run of a seed
            head = nn.Linear(hidden_size, 1, bias=False)
            gen = torch.Generator().manual_seed(int(seed))
            with torch.no_grad():
                head.weight.copy_(torch.randn(head.weight.shape, generator=gen) / math.sqrt(hidden_size + 1))
        self.v_head: nn.Linear = head

    @property
    def config(self) -> Any:
        """The language model's config: what the Trainer and DeepSpeed read (ZeRO-3 sizes its buckets from hidden_size)."""
        return self.lm.config

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        """The Trainer's switch, passed to the language model."""
        self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        image_counts: torch.Tensor | None = None,
        image_grids: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
        score_positions: torch.Tensor | None = None,
        **_: Any,
    ) -> torch.Tensor:
        """The reward of each row [B] (float32), read at ``score_positions`` (default: the last unmasked position).

        Pass ``score_positions`` when a row may carry attended positions after its reward token (the
        blank image that ZeRO-3 / FSDP batches append to a row without images).
        """
        hidden = self.lm.last_hidden_states(
            input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            image_mask=image_mask,
            image_counts=image_counts,
            image_grids=image_grids,
            image_index=image_index,
        )
        last = score_positions if score_positions is not None else attention_mask.long().sum(dim=1) - 1
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        picked = hidden[rows, last.to(hidden.device)]
        return self.v_head(picked.to(self.v_head.weight.dtype)).squeeze(-1).float()


def pair_reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """The official trainer's accuracy and the mean rewards of one batch."""
    return {
        "accuracy": (chosen > rejected).float().mean(),
        "rewards/chosen": chosen.detach().mean(),
        "rewards/rejected": rejected.detach().mean(),
        "rewards/margins": (chosen - rejected).detach().mean(),
    }


def save_reward_head(head: nn.Linear | torch.Tensor, folder: str | os.PathLike, token_id: int) -> None:
    """``reward_head.safetensors`` + ``reward_head.json`` in ``folder`` (from the head or its weight [1, hidden])."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    weight = (head.weight if isinstance(head, nn.Linear) else head).detach().float().cpu().contiguous()
    save_file({HEAD_WEIGHT_KEY: weight}, str(out / REWARD_HEAD_NAME))
    meta = {
        "weight_key": HEAD_WEIGHT_KEY,
        "hidden_size": int(weight.shape[1]),
        "reward_token": REWARD_TOKEN,
        "reward_token_id": token_id,
        "read_at": "the hidden state after the final norm at the last non-padding token (the reward token)",
    }
    (out / REWARD_HEAD_CONFIG_NAME).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")


def load_reward_head(folder: str | os.PathLike, hidden_size: int) -> nn.Linear | None:
    """The saved head of ``folder``, or None when the folder has none."""
    path = Path(folder) / REWARD_HEAD_NAME
    if not path.is_file():
        return None
    weight = load_file(str(path)).get(HEAD_WEIGHT_KEY)
    if weight is None or tuple(weight.shape) != (1, hidden_size):
        raise XcftError(f"{path}: expected a tensor {HEAD_WEIGHT_KEY} of shape [1, {hidden_size}]")
    head = nn.Linear(hidden_size, 1, bias=False)
    with torch.no_grad():
        head.weight.copy_(weight)
    return head


class RewardTrainer(PairTrainer):
    """Trains :class:`RewardModel` on pair batches; saves the LM as ``--stage sft`` does, plus the head."""

    def __init__(self, *args: Any, token_id: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.token_id = token_id

    def pair_loss(self, model: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pairs = inputs["input_ids"].shape[0] // 2
        rewards = model(
            **{k: v for k, v in inputs.items() if k not in (*PAIR_KEYS, "labels")}, score_positions=inputs["score_positions"]
        )
        chosen, rejected = rewards[:pairs], rewards[pairs:]
        loss = -F.logsigmoid(chosen - rejected).mean()
        return loss, pair_reward_metrics(chosen, rejected)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """Resume: the LM (adapter or full weights) and the head from a checkpoint this trainer wrote."""
        reward_model = self.accelerator.unwrap_model(model if model is not None else self.model)
        folder = Path(resume_from_checkpoint)
        lm = reward_model.lm
        if hasattr(lm, "peft_config"):
            set_peft_model_state_dict(lm, load_file(str(folder / ADAPTER_WEIGHTS_NAME)))
        else:
            result = lm.load_state_dict(read_state_dict(folder), strict=False)
            if result.missing_keys:
                raise XcftError(
                    f"{folder}: the checkpoint lacks {len(result.missing_keys)} weights ({result.missing_keys[0]}, ...)"
                )
        head = load_reward_head(folder, reward_model.v_head.in_features)
        if head is None:
            raise XcftError(f"{folder} has no {REWARD_HEAD_NAME}: not a checkpoint of an --stage rm run")
        with torch.no_grad():
            reward_model.v_head.weight.copy_(head.weight)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The LM and the head from ``state_dict`` when the Trainer gives one (under ZeRO-3 it is the only
        place the sharded weights are whole: the Trainer gathers them on every rank, then calls this on
        the saving one), else from the model itself."""
        target = Path(output_dir or str(self.args.output_dir))
        target.mkdir(parents=True, exist_ok=True)
        reward_model = self.accelerator.unwrap_model(self.model)
        if state_dict is None:
            state_dict = reward_model.state_dict()
        head = state_dict.get(HEAD_PARAMETER)
        if head is None:
            raise XcftError(
                "the Trainer gave no gathered weights to save (DeepSpeed ZeRO-3 without "
                '"stage3_gather_16bit_weights_on_model_save": true); set it in the DeepSpeed config, as configs/ds_zero3.json does'
            )
        lm = reward_model.lm
        lm_state = {k[len(LM_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(LM_PREFIX)}
        lm.save_pretrained(str(target), state_dict=lm_state, safe_serialization=True)
        if not hasattr(lm, "peft_config"):
            write_model_code(target)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(str(target))
        save_reward_head(head, target, self.token_id)


__all__ = [
    "HEAD_WEIGHT_KEY",
    "REWARD_HEAD_CONFIG_NAME",
    "REWARD_HEAD_NAME",
    "REWARD_TOKEN",
    "RewardModel",
    "RewardTrainer",
    "load_reward_head",
    "pair_reward_metrics",
    "reward_token_id",
    "save_reward_head",
]
