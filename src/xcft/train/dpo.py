"""Direct preference optimisation (DPO) on preference pairs: losses, reference log-probs, the trainer.

Per pair, with the summed log-probabilities of the answer tokens under the policy (``lp``) and the
frozen reference (``lp_ref``), ``z = beta * ((lp_c - lp_ref_c) - (lp_r - lp_ref_r))``:

* ``sigmoid`` (the DPO paper): ``-(1 - eps) log sigmoid(z) - eps log sigmoid(-z)`` (``eps`` = label_smoothing);
* ``ipo``: ``((lp_c/n_c - lp_ref_c/n_c) - (lp_r/n_r - lp_ref_r/n_r) - 1/(2 beta))^2`` (length-averaged, as TRL);
* ``hinge``: ``max(0, 1 - z)``.

``rpo_alpha`` adds alpha times the chosen answers' token-mean negative log-likelihood. Metrics carry
TRL's names: ``rewards/chosen`` = ``beta (lp_c - lp_ref_c)`` (mean over pairs), ``rewards/rejected``,
``rewards/accuracies`` (share of pairs with chosen reward > rejected), ``rewards/margins``,
``logps/chosen``, ``logps/rejected`` (and ``nll_loss`` with rpo_alpha).

The reference: the policy with its LoRA adapter disabled (LoRA runs, no second copy), a frozen
copy of the starting model (full finetune), another folder (``--ref_model_name_or_path``), or
log-probs computed once before training (``--precompute_ref_log_probs``). A batch of P pairs is one
forward of 2P padded rows (chosen rows, then rejected rows), or with ``--packing`` of P rows holding
a pair's two sequences each; each pair's images are encoded once.
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from xcft.data.encode import IGNORE_INDEX
from xcft.data.preference import PairCollator, PreferenceDataset, read_pair_data
from xcft.errors import XcftError
from xcft.model.loading import load_pretrained, resolve_dtype, unwrap_model
from xcft.train.inputs import _redo_counts, resolve_run_sizes, split_holdout
from xcft.train.trainer import XcftTrainer

logger = logging.getLogger(__name__)

LOSS_TYPES = ("sigmoid", "ipo", "hinge")
#: Batch keys that describe pairs, not model inputs.
PAIR_KEYS = ("pair_key", "ref_logps", "sequence_ids", "score_positions")


# --------------------------------------------------------------------------- log-probs and losses


def answer_logps(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: (summed log-prob of the scored tokens [S] float32, their count [S]).

    Scored tokens are those with a label (``labels[t+1]`` predicted at position t). A sequence is a
    row, or with ``sequence_ids`` (packed pairs) the positions that name it. The output head runs
    only at the positions that some row scores, so no [R, L, vocab] tensor is made for the prompts.
    """
    inputs = {k: v for k, v in batch.items() if k not in PAIR_KEYS and k != "labels"}
    labels = batch["labels"]
    shift = labels[:, 1:]
    keep = shift != IGNORE_INDEX
    positions = keep.any(dim=0).nonzero()[:, 0]
    out = model(**inputs, logits_to_keep=positions, use_cache=False)
    logits = out.logits.float()
    targets = shift[:, positions]
    mask = keep[:, positions]
    token_logps = logits.log_softmax(dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    seq = batch.get("sequence_ids")
    if seq is None:
        return (token_logps * mask).sum(dim=-1), mask.sum(dim=-1)
    owner = seq[:, 1:][:, positions].to(token_logps.device)  # the target's sequence (labels[t+1] at position t)
    n_seq = int(seq.max()) + 1
    flat, picked = owner[mask], token_logps[mask]
    sums = torch.zeros(n_seq, dtype=token_logps.dtype, device=token_logps.device).index_add(0, flat, picked)
    counts = torch.zeros(n_seq, dtype=torch.long, device=token_logps.device).index_add(0, flat, torch.ones_like(flat))
    return sums, counts


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_counts: torch.Tensor | None = None,
    rejected_counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair, chosen rewards, rejected rewards) from summed answer log-probs (see the module docstring)."""
    if loss_type == "ipo":
        if chosen_counts is None or rejected_counts is None:
            raise ValueError("the ipo loss averages over answer tokens: pass chosen_counts and rejected_counts")
        logits = (policy_chosen - ref_chosen) / chosen_counts - (policy_rejected - ref_rejected) / rejected_counts
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        z = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
        if loss_type == "sigmoid":
            losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
        elif loss_type == "hinge":
            losses = torch.relu(1 - z)
        else:
            raise ValueError(f"unknown loss_type {loss_type!r}; one of {', '.join(LOSS_TYPES)}")
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def preference_metrics(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor
) -> dict[str, torch.Tensor]:
    """TRL's metrics of one batch (means over its pairs)."""
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": policy_chosen.detach().mean(),
        "logps/rejected": policy_rejected.detach().mean(),
    }


# --------------------------------------------------------------------------- the reference


def without_wrappers(model: Any) -> Any:
    """The model inside DDP / DeepSpeed wrappers; a peft model stays a peft model."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


class Reference:
    """Where the reference log-probs come from.

    ``base``: the policy with its LoRA adapter disabled (a full-finetune policy itself, used only
    before the first step to precompute); ``model``: a separate frozen model; ``precomputed``: the
    ``ref_logps`` the batch carries.
    """

    def __init__(self, kind: str, model: Any | None = None) -> None:
        if kind not in ("base", "model", "precomputed"):
            raise ValueError(f"unknown reference kind {kind!r}")
        self.kind = kind
        self.model = model
        if model is not None:
            model.requires_grad_(False)
            model.eval()

    @contextmanager
    def _as_reference(self, policy: Any) -> Iterator[Any]:
        """The module to score with, in eval mode (no dropout), restored afterwards."""
        if self.kind == "model":
            yield self.model
            return
        base = without_wrappers(policy)
        peft = base if hasattr(base, "disable_adapter") else None
        was_training = base.training
        base.eval()
        try:
            with peft.disable_adapter() if peft is not None else nullcontext():
                yield base
        finally:
            base.train(was_training)

    @torch.no_grad()
    def logps(self, policy: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) reference log-probs [P] for a pair batch."""
        pairs = batch["pair_key"].shape[0]
        if self.kind == "precomputed":
            ref = batch.get("ref_logps")
            if ref is None:
                raise RuntimeError("precomputed reference log-probs are missing from the batch")
            return ref[:, 0].float(), ref[:, 1].float()
        with self._as_reference(policy) as module:
            if self.kind == "model":
                device = batch["input_ids"].device
                if next(module.parameters()).device != device:
                    module.to(device)
            lp, _ = answer_logps(module, batch)
        return lp[:pairs], lp[pairs:]


def load_reference_model(path: str, policy: Any, dtype: str) -> Any:
    """A frozen model of the policy's family from ``path`` (same tokenizer vocabulary)."""
    ref, _ = load_pretrained(path, dtype=resolve_dtype(dtype), device="cpu")
    mine: Any = unwrap_model(policy).config
    if getattr(ref.config, "family", None) != getattr(mine, "family", None) or ref.config.vocab_size != mine.vocab_size:
        raise XcftError(
            f"--ref_model_name_or_path {path}: an InternLM-XComposer {ref.config.family} model with a vocabulary of "
            f"{ref.config.vocab_size}; the policy is {mine.family} with {mine.vocab_size}. Pass a model of the same family"
        )
    return ref


def disable_dropout(model: torch.nn.Module) -> int:
    """Set every dropout of ``model`` to 0 (TRL's ``disable_dropout``); returns how many there were."""
    found = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            module.p = 0.0
            found += 1
    return found


def make_reference(cfg: Any, model: Any) -> Reference:
    """The reference of a run: see :class:`Reference` (a separate model only when one is needed)."""
    pref = cfg.preference
    if pref.ref_model_name_or_path:
        return Reference("model", load_reference_model(pref.ref_model_name_or_path, model, cfg.model.model_dtype))
    if cfg.model.use_lora:
        return Reference("base")
    if pref.precompute_ref_log_probs:
        return Reference("base")  # the starting policy itself, used once before any step
    ds = getattr(cfg.training, "hf_deepspeed_config", None)
    if ds is not None and ds.is_zero3():
        raise XcftError(
            "--stage dpo with a full finetune under ZeRO-3 would keep an unsharded reference copy on every rank; "
            "pass --precompute_ref_log_probs true (reference log-probs computed once before training) or --use_lora true"
        )
    logger.info("DPO reference: a frozen copy of the starting model (pass --precompute_ref_log_probs true to avoid the copy)")
    return Reference("model", copy.deepcopy(unwrap_model(model)))


@torch.no_grad()
def precompute_reference(reference: Reference, policy: Any, dataset: PreferenceDataset, batch_size: int, device: Any) -> None:
    """Score every pair of ``dataset`` once with the reference; items then carry ``ref_logps``."""
    collate = PairCollator(dataset.pad_token_id)
    keys = dataset.keys()
    table = [np.zeros((len(fd.conversations), 2), dtype=np.float32) for fd in dataset.files]
    step = max(1, batch_size)
    for start in range(0, len(keys), step):
        chunk = keys[start : start + step]
        batch = collate([dataset.item(f, j) for f, j in chunk])
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        chosen, rejected = reference.logps(policy, batch)
        for (f, j), c, r in zip(chunk, chosen.tolist(), rejected.tolist()):
            table[f][j] = (c, r)
    dataset.ref_logps = table
    logger.info("reference log-probs computed for %d pairs", len(keys))


def prepare_reference(cfg: Any, model: Any, datasets: list[PreferenceDataset | None]) -> Reference:
    """The run's reference; with --precompute_ref_log_probs the pairs are scored now and no reference model is kept."""
    if cfg.preference.disable_dropout and (n := disable_dropout(model)):
        logger.info("--disable_dropout: %d dropout layer(s) of the policy set to 0", n)
    reference = make_reference(cfg, model)
    if not cfg.preference.precompute_ref_log_probs:
        return reference
    device = cfg.training.device
    model.to(device)
    for ds in datasets:
        if ds is not None:
            precompute_reference(reference, model, ds, cfg.training.per_device_eval_batch_size, device)
    return Reference("precomputed")


# --------------------------------------------------------------------------- data


def build_preference_datasets(
    cfg: Any, tokenizer: Any, model_config: Any, *, end_token: int | None = None
) -> tuple[PreferenceDataset, PreferenceDataset | None, PairCollator]:
    """(train pairs, eval pairs or None, collator) of a preference run (same data options as SFT).

    ``end_token``: appended to every sequence (the reward token); the encoding leaves room for it.
    """
    if cfg.data.packing and end_token is not None:
        raise XcftError("--packing is not available with --stage rm (the score is read per row); drop it")
    sizes = resolve_run_sizes(cfg, model_config)
    img_size, max_length, hd_num = sizes.img_size, sizes.max_length, sizes.hd_num
    if end_token is not None:
        max_length -= 1
    seed = cfg.training.data_seed if cfg.training.data_seed is not None else cfg.training.seed
    files = read_pair_data(cfg.data.data_path, tokenizer, img_size, max_length, cfg.data.given_num, hd_num=hd_num, cache=cfg.data)
    eval_ds = None
    if cfg.data.eval_data_path:
        eval_files = read_pair_data(
            cfg.data.eval_data_path, tokenizer, img_size, max_length, cfg.data.given_num, hd_num=hd_num, cache=cfg.data
        )
        eval_ds = PreferenceDataset(eval_files, tokenizer, img_size, max_length, seed=seed, hd_num=hd_num, end_token=end_token)
    elif cfg.data.eval_split > 0:
        files, held = split_holdout(files, cfg.data.eval_split, seed)
        if not held:
            raise XcftError(f"--eval_split {cfg.data.eval_split} holds out no pair; pass --eval_data_path instead")
        files = _redo_counts(files, cfg.data.data_path, cfg.data.given_num)
        eval_ds = PreferenceDataset(held, tokenizer, img_size, max_length, seed=seed, hd_num=hd_num, end_token=end_token)
    train_ds = PreferenceDataset(files, tokenizer, img_size, max_length, seed=seed, hd_num=hd_num, end_token=end_token)
    logger.info(
        "preference data: %d pairs per epoch%s (max_length %d)",
        len(train_ds),
        f", {len(eval_ds)} eval pairs" if eval_ds is not None else "",
        max_length,
    )
    # --packing: a pair's two sequences share one row (positions restart), instead of two padded rows
    return train_ds, eval_ds, PairCollator(train_ds.pad_token_id, packed=bool(cfg.data.packing))


# --------------------------------------------------------------------------- trainer


class PairTrainer(XcftTrainer):
    """XcftTrainer over pair batches: the loss is a mean over pairs, and per-batch metrics are logged.

    Subclasses give :meth:`pair_loss`. The Trainer divides each micro-batch loss by the
    gradient-accumulation steps, so an accumulated step equals one batch of all its pairs.
    Metrics are averaged over ranks at each micro-batch and over micro-batches at each log, and
    logged with ``eval_`` in front after an evaluation (TRL's convention).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # the loss is a mean over pairs, not over tokens
        self._stored: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def pair_loss(self, model: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        loss, metrics = self.pair_loss(model, inputs)
        mode = "train" if model.training else "eval"
        for key, value in metrics.items():
            mean = self.accelerator.gather_for_metrics(value.detach().reshape(1)).float().mean()
            self._stored[mode][key].append(float(mean))
        return (loss, metrics) if return_outputs else loss

    def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: Any = None) -> Any:
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the mean of each stored metric since the last log (``eval_`` prefixed after an evaluation)."""
        mode = "train" if "loss" in logs else "eval"
        prefix = "eval_" if mode == "eval" else ""
        for key, values in self._stored[mode].items():
            if values:
                logs[prefix + key] = float(np.mean(values))
        self._stored[mode].clear()
        super().log(logs, start_time)


class PreferenceTrainer(PairTrainer):
    """DPO: :func:`preference_loss` of policy and reference answer log-probs; TRL's metric names."""

    def __init__(self, *args: Any, preference: Any, reference: Reference, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.preference = preference
        self.reference = reference

    def pair_loss(self, model: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, metrics) of one pair batch."""
        p = self.preference
        pairs = inputs["pair_key"].shape[0]
        ref_chosen, ref_rejected = self.reference.logps(model, inputs)
        logps, counts = answer_logps(model, inputs)
        policy_chosen, policy_rejected = logps[:pairs], logps[pairs:]
        losses, chosen_rewards, rejected_rewards = preference_loss(
            policy_chosen,
            policy_rejected,
            ref_chosen.to(logps.device),
            ref_rejected.to(logps.device),
            beta=p.beta,
            loss_type=p.loss_type,
            label_smoothing=p.label_smoothing,
            chosen_counts=counts[:pairs],
            rejected_counts=counts[pairs:],
        )
        loss = losses.mean()
        metrics = preference_metrics(chosen_rewards, rejected_rewards, policy_chosen, policy_rejected)
        if p.rpo_alpha:
            nll = -policy_chosen.sum() / counts[:pairs].sum().clamp(min=1)
            loss = loss + p.rpo_alpha * nll
            metrics["nll_loss"] = nll.detach()
        return loss, metrics


__all__ = [
    "LOSS_TYPES",
    "PairTrainer",
    "PreferenceTrainer",
    "Reference",
    "answer_logps",
    "build_preference_datasets",
    "disable_dropout",
    "load_reference_model",
    "make_reference",
    "precompute_reference",
    "preference_loss",
    "preference_metrics",
    "prepare_reference",
]
