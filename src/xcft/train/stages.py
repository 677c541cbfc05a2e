"""What differs between the training stages (``--stage sft|dpo|rm``): data, model wrapper, trainer class.

``xcft train`` runs the same steps for every stage; :func:`stage_setup` gives the parts that differ.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from xcft.model.loading import unwrap_model
from xcft.train.dpo import PreferenceTrainer, build_preference_datasets, prepare_reference
from xcft.train.inputs import build_datasets, source_names
from xcft.train.predict import answer_eval
from xcft.train.reward import RewardModel, RewardTrainer, load_reward_head, reward_token_id
from xcft.train.trainer import XcftTrainer

logger = logging.getLogger(__name__)


@dataclass
class StageParts:
    """The model to hand to the Trainer, the data, and the Trainer class with its extra arguments."""

    model: Any
    train_dataset: Any
    eval_dataset: Any
    collator: Any
    trainer_class: type[XcftTrainer] = XcftTrainer
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)


def stage_setup(cfg: Any, model: Any, tokenizer: Any, files: Any = None) -> StageParts:
    """The parts of ``cfg.preference.stage`` for a model already prepared for training.

    ``files``: supervised data already read for the memory plan (see :func:`~xcft.train.inputs.build_datasets`).
    """
    config: Any = unwrap_model(model).config
    stage = cfg.preference.stage
    if stage == "dpo":
        train_ds, eval_ds, collator = build_preference_datasets(cfg, tokenizer, config)
        reference = prepare_reference(cfg, model, [train_ds, eval_ds])
        return StageParts(
            model, train_ds, eval_ds, collator, PreferenceTrainer, {"preference": cfg.preference, "reference": reference}
        )
    if stage == "rm":
        token = reward_token_id(tokenizer)
        train_ds, eval_ds, collator = build_preference_datasets(cfg, tokenizer, config, end_token=token)
        head = load_reward_head(cfg.model.model_name_or_path, config.hidden_size)
        logger.info(
            "reward head: %s", "continued from the model folder" if head is not None else "new (hidden size -> 1, random init)"
        )
        reward_model = RewardModel(model, config.hidden_size, head, seed=cfg.training.seed)
        return StageParts(reward_model, train_ds, eval_ds, collator, RewardTrainer, {"token_id": token})
    train_ds, eval_ds, collator = build_datasets(cfg, tokenizer, config, files=files)
    sources = {"train": source_names(train_ds), "eval": source_names(eval_ds)}  # per-file losses of a mixture
    kwargs = {"answer_eval": answer_eval(cfg, eval_ds, tokenizer), "source_names": sources}
    return StageParts(model, train_ds, eval_ds, collator, trainer_kwargs=kwargs)


__all__ = ["StageParts", "stage_setup"]
