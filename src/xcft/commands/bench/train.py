"""``xcft bench train``: time real training steps through the ``xcft train`` code path.

What runs is what ``xcft train`` runs: the options are parsed by :func:`xcft.train.args.parse_train_args`,
the model is loaded by :func:`xcft.train.setup.load_base_model` (or built from a preset on the
device, for shape-only checks such as the 7b GPU check), frozen by
:func:`xcft.train.setup.prepare_model_for_training`, the data is read and encoded by :mod:`xcft.data`
(packed by :class:`xcft.data.packing.PackedDataset` with ``--packing``), batched by the training
collator, and trained by the Hugging Face Trainer subclass :class:`xcft.train.trainer.XcftTrainer`
(its own ``training_step``: forward, loss, backward; then clipping and the AdamW step). The only
additions are a callback that times every optimizer step end to end (data fetch included) and
token counts that the collator attaches to each batch and the bench removes before the model sees
the batch.

So that every step sees ``--batch-size`` samples (or rows when packing), the per-epoch draw of
each data file is scaled up (same proportions) to cover ``warmup + steps`` steps in one epoch.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import resource
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

from xcft.commands.bench.calibrate import calibration_gflops
from xcft.commands.bench.flops import StepCounts, gpu_peak_flops, step_flops
from xcft.commands.bench.options import TrainBenchOptions
from xcft.data.dataset import XComposerDataset, read_data
from xcft.data.packing import PackedDataset, make_collator
from xcft.errors import XcftError
from xcft.model.loading import unwrap_model
from xcft.model.presets import build_model
from xcft.train.args import parse_train_args
from xcft.train.inputs import resolve_run_sizes
from xcft.train.qlora import quantize_for_training
from xcft.train.setup import apply_host_settings, load_base_model, prepare_model_for_training
from xcft.train.trainer import XcftTrainer

if TYPE_CHECKING:
    from xcft.model.modeling_xcomposer2 import XComposer2ForCausalLM

logger = logging.getLogger(__name__)

COUNTS_KEY = "xcft_bench_counts"


# --------------------------------------------------------------------------- data


class SyntheticDataset(torch.utils.data.Dataset):
    """Random token samples in the batch contract (for shape-only runs such as the GPU check).

    Each sample: BOS, ``images`` image blocks, then random text up to ``length`` tokens; the last
    40% of the text is supervised (an answer). ``grid`` (2.5 models): every image is a global view
    plus a ``rows x cols`` crop grid (``image_tokens`` must be that grid's slot count).
    """

    def __init__(
        self,
        count: int,
        length: int,
        images: int,
        image_tokens: int,
        img_size: int,
        vocab: int,
        pad: int,
        seed: int = 0,
        grid: tuple[int, int] | None = None,
    ):
        need = 2 + images * image_tokens
        if length < need + 8:
            raise XcftError(
                f"--synthetic {length}: too short for {images} image(s) of {image_tokens} slots; use at least {need + 8}"
            )
        self.count, self.length, self.images = int(count), int(length), int(images)
        self.image_tokens, self.img_size, self.vocab, self.pad, self.seed = image_tokens, img_size, vocab, pad, seed
        self.pad_token_id = pad
        self.grid = grid
        self.epoch = 0

    def __len__(self) -> int:
        return self.count

    @property
    def lengths(self) -> list[int]:
        return [self.length] * self.count

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        ids = torch.randint(3, max(4, self.vocab - 16), (self.length,), generator=gen)
        ids[0] = 1
        mask = torch.zeros(self.length, dtype=torch.bool)
        start = 1
        for _ in range(self.images):
            mask[start : start + self.image_tokens] = True
            start += self.image_tokens + 1
        ids[mask] = self.pad
        labels = torch.full_like(ids, -100)
        answer = int(self.length * 0.6)
        labels[answer:] = ids[answer:]
        labels[mask] = -100
        views = self.images * (1 + self.grid[0] * self.grid[1]) if self.grid else self.images
        item = {
            "input_ids": ids,
            "labels": labels,
            "image_mask": mask,
            "pixel_values": torch.randn(views, 3, self.img_size, self.img_size, generator=gen),
        }
        if self.grid:
            item["image_grids"] = torch.tensor([list(self.grid)] * self.images, dtype=torch.long)
        return item


def largest_grid(hd_num: int, view_size: int) -> tuple[int, int]:
    """The crop grid with the most crops (then slots) that a 2.5 image can get at ``hd_num`` (worst case for memory)."""
    from xcft.model.image_processing_xcomposer2 import hd_crop_grid

    grids = {
        hd_crop_grid(view_size * cols, view_size * rows, hd_num, view_size=view_size)
        for rows in range(1, hd_num + 1)
        for cols in range(1, hd_num // rows + 1)
    }
    return max(grids, key=lambda g: (g[0] * g[1], g[0] + 1))


def _segments(item: dict[str, Any]) -> list[int]:
    n = int(item["input_ids"].shape[0])
    pos = item.get("position_ids")
    if pos is None:
        return [n]
    starts = [*(pos == 0).nonzero().flatten().tolist(), n]
    return [b - a for a, b in itertools.pairwise(starts)]


@dataclass
class CountingCollator:
    """The training collator, plus the step's token counts under :data:`COUNTS_KEY` (removed before the model)."""

    inner: Any

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(features)
        segs = [s for f in features for s in _segments(f)]
        images = sum(int(f["pixel_values"].shape[0]) for f in features if f.get("pixel_values") is not None)
        counts = StepCounts(
            samples=len(segs),
            real_tokens=sum(segs),
            computed_positions=int(batch["input_ids"].numel()),
            image_slots=int(batch["image_mask"].sum()),
            images=images,
            targets=int((batch["labels"][:, 1:] != -100).sum()),
            sum_sq_segments=sum(s * s for s in segs),
        )
        batch[COUNTS_KEY] = torch.tensor([getattr(counts, k) for k in StepCounts.__dataclass_fields__], dtype=torch.long)
        return batch


def _scaled_files(files: list[Any], samples: int) -> list[Any]:
    """The files with their per-epoch draw scaled (same proportions) to at least ``samples`` in total."""
    total = sum(f.draw_count for f in files)
    if total <= 0:
        raise XcftError("the data draws no sample per epoch; check the data.txt numbers")
    factor = samples / total
    return [dataclasses.replace(f, draw_count=max(1, math.ceil(f.draw_count * factor)) if f.draw_count else 0) for f in files]


def build_bench_data(opts: TrainBenchOptions, cfg: Any, tokenizer: Any, base_config: Any) -> tuple[Any, Any]:
    """(train dataset, collator) with enough samples for ``warmup + steps`` steps in one epoch."""

    steps = opts.warmup + opts.steps
    rows_needed = steps * opts.batch_size
    img_size = int(base_config.img_size)
    max_length = int(opts.max_length or base_config.max_length or 4096)
    sizes = resolve_run_sizes(cfg, base_config)
    if opts.synthetic:
        pad = int(base_config.pad_token_id if base_config.pad_token_id is not None else 2)
        per_row = max(1, max_length // opts.synthetic) if opts.packing else 1
        grid = largest_grid(sizes.hd_num or 1, img_size) if base_config.hd else None
        ds: Any = SyntheticDataset(
            rows_needed * per_row,
            opts.synthetic,
            opts.synthetic_images,
            int(base_config.hd_image_tokens(*grid) if grid else base_config.image_tokens),
            img_size,
            int(base_config.vocab_size),
            pad,
            opts.seed,
            grid=grid,
        )
    else:
        img_size, max_length = sizes.img_size, sizes.max_length
        files = read_data(cfg.data.data_path, tokenizer, img_size, max_length, cfg.data.given_num, hd_num=sizes.hd_num)
        if opts.sources:
            files = [f for f in files if any(s in f.display for s in opts.sources)]
            if not files:
                raise XcftError(f"--source {' '.join(opts.sources)}: no data file of {opts.data} matches")
        samples = rows_needed
        while True:
            ds = XComposerDataset(
                _scaled_files(files, samples), tokenizer, img_size, max_length, seed=opts.seed, hd_num=sizes.hd_num
            )
            if not opts.packing:
                break
            ds = PackedDataset(ds, max_length)
            if len(ds) >= rows_needed:
                break
            samples = 2 * max(samples, ds.num_samples)
    if opts.packing and isinstance(ds, SyntheticDataset):
        ds = PackedDataset(ds, max_length)
    pad_id = getattr(ds, "pad_token_id", None)
    if pad_id is None:
        pad_id = base_config.pad_token_id if base_config.pad_token_id is not None else 2
    return ds, CountingCollator(make_collator(pad_id, packing=opts.packing))


# --------------------------------------------------------------------------- trainer pieces


def _bench_trainer_class():
    class BenchTrainer(XcftTrainer):
        """XcftTrainer that takes the bench's token counts off each batch before its training_step."""

        bench_counts: list[StepCounts]

        def training_step(self, model, inputs, num_items_in_batch=None):
            raw = inputs.pop(COUNTS_KEY, None)
            if raw is not None:
                self.bench_counts.append(StepCounts(*[int(v) for v in raw.tolist()]))
            return super().training_step(model, inputs, num_items_in_batch)

    return BenchTrainer


def _timer_callback(trainer_ref: list, cuda: bool):
    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step, end to end, and the counts of the batches it trained on."""

        def __init__(self) -> None:
            self.begin: list[float] = []
            self.end: list[float] = []
            self.cpu_begin: list[float] = []
            self.cpu_end: list[float] = []
            self.counts: list[StepCounts] = []

        def _now(self) -> float:
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.reset_peak_memory_stats()

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin.append(self._now())
            self.cpu_begin.append(time.process_time())

        def on_step_end(self, args, state, control, **kwargs):
            self.end.append(self._now())
            self.cpu_end.append(time.process_time())
            trainer = trainer_ref[0]
            step = StepCounts()
            for c in trainer.bench_counts:
                step.add(c)
            trainer.bench_counts.clear()
            self.counts.append(step)

    return StepTimer()


# --------------------------------------------------------------------------- run


def _train_argv(opts: TrainBenchOptions, output_dir: str) -> list[str]:
    argv = [
        "--model_name_or_path",
        opts.model or f"preset:{opts.preset}",
        "--data_path",
        opts.data or "synthetic",
        "--output_dir",
        output_dir,
        "--max_steps",
        str(opts.warmup + opts.steps),
        "--per_device_train_batch_size",
        str(opts.batch_size),
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--logging_steps",
        "1000000",
        "--disable_tqdm",
        "true",
        "--dataloader_num_workers",
        str(opts.workers),
        "--seed",
        str(opts.seed),
        "--use_lora",
        str(opts.use_lora).lower(),
        "--fix_vit",
        str(opts.fix_vit).lower(),
    ]
    if opts.bits != 16:
        argv += ["--bits", str(opts.bits)]
    if opts.hd_num is not None:
        argv += ["--hd_num", str(opts.hd_num)]
    if not torch.cuda.is_available():
        argv += ["--use_cpu", "true"]
    if opts.bf16:
        argv += ["--bf16", "true"]
    if opts.activation_checkpointing:  # the old name works on every transformers version (aliased when renamed)
        argv += ["--gradient_checkpointing", "true"]
    if opts.packing:
        argv += ["--packing", "true"]
    if opts.group_by_length:
        argv += ["--group_by_length", "true"]
    if opts.max_length:
        argv += ["--max_length", str(opts.max_length)]
    if not opts.cpu_reuse_memory:
        argv += ["--cpu_reuse_memory", "false"]
    return argv + list(opts.extra_args)


def _checkpointing_on(model: Any) -> bool:
    """Whether activation checkpointing is on (transformers 5 name first, then the old one)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def _resolve_attn(attn: str, cuda: bool) -> str | None:
    if attn != "auto":
        return attn
    if cuda:
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            return "sdpa"
    return None  # keep the model's own setting


def prepare_model(opts: TrainBenchOptions, cfg: Any) -> tuple[Any, Any]:
    """(model ready to train, tokenizer or None): loaded / built and frozen as ``xcft train`` does."""
    cuda = torch.cuda.is_available()
    attn = _resolve_attn(opts.attn, cuda)
    if opts.preset:
        dtype = torch.bfloat16 if opts.bf16 else torch.float32
        model = build_model(
            opts.preset, seed=opts.seed, dtype=dtype, device="cuda" if cuda else "cpu", attn_implementation=attn or "sdpa"
        )
        model = quantize_for_training(cfg, model)  # --bits 4/8: as xcft train does after loading
        if cuda:
            torch.cuda.empty_cache()  # the full-precision linears quantized away leave no reserved memory behind
        tokenizer = None
    else:
        model, tokenizer = load_base_model(cfg)
        if attn is not None:
            model.set_attn_implementation(attn)
    return prepare_model_for_training(cfg, model), tokenizer


def _check_options(opts: TrainBenchOptions) -> None:
    if bool(opts.model) == bool(opts.preset):
        raise XcftError("give exactly one of --model (a model folder) and --preset (random weights)")
    if not opts.data and not opts.synthetic:
        raise XcftError("give --data (data.txt or JSON) or --synthetic LENGTH")
    if opts.preset and not opts.synthetic:
        raise XcftError("--preset models have no tokenizer here: use --synthetic LENGTH for their data")
    if opts.steps < 1 or opts.warmup < 0 or opts.batch_size < 1:
        raise XcftError("--steps and --batch-size must be at least 1 and --warmup at least 0")
    if opts.packing and opts.group_by_length:
        raise XcftError("--group_by_length is for unpacked runs; packing already groups samples into full rows")


def run_train_bench(opts: TrainBenchOptions, prepared: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the figures (see :func:`format_train_result`).

    ``prepared`` = (model, tokenizer) from :func:`prepare_model` reuses one model for several runs
    (the GPU check); the model's trainable parameters then carry over from run to run.
    """
    _check_options(opts)
    cuda = torch.cuda.is_available()
    calib_before = calibration_gflops(opts.calibration_seconds)
    with tempfile.TemporaryDirectory(prefix="xcft-bench-") as out:
        cfg = parse_train_args(_train_argv(opts, out))
        reuse_memory = apply_host_settings(cfg)
        model, tokenizer = prepared if prepared is not None else prepare_model(opts, cfg)
        base = cast("XComposer2ForCausalLM", unwrap_model(model))
        if prepared is not None and not opts.activation_checkpointing and _checkpointing_on(base):
            (getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable)()
        base_config = base.config
        train_ds, collator = build_bench_data(opts, cfg, tokenizer, base_config)

        trainer_ref: list = []
        timer = _timer_callback(trainer_ref, cuda)
        trainer_cls = _bench_trainer_class()
        trainer = trainer_cls(
            model=model,
            args=cfg.training,
            train_dataset=train_ds,
            data_collator=collator,
            supervised_head=not opts.full_head,
            processing_class=tokenizer,
            callbacks=[timer],
        )
        trainer.remove_callback(PrinterCallback)  # stdout carries only the report (JSON stays parseable)
        trainer.bench_counts = []
        trainer_ref.append(trainer)
        t0 = time.perf_counter()
        try:
            trainer.train()
        finally:
            trainer_ref.clear()
        wall = time.perf_counter() - t0
        checkpointing_active = _checkpointing_on(base)
        del trainer
    calib_after = calibration_gflops(opts.calibration_seconds)

    times = [timer.end[0] - timer.begin[0]] + [b - a for a, b in zip(timer.end[:-1], timer.end[1:])]
    timed = list(range(min(opts.warmup, len(times) - 1), len(times)))
    if not timed:
        raise XcftError("no step was timed; increase --steps")
    step_times = [times[k] for k in timed]
    cpu = [timer.cpu_end[0] - timer.cpu_begin[0]] + [b - a for a, b in zip(timer.cpu_end[:-1], timer.cpu_end[1:])]
    cpu_times = [cpu[k] for k in timed]
    counts = [timer.counts[k] for k in timed]
    total = StepCounts()
    for c in counts:
        total.add(c)
    sec = statistics.median(step_times)
    samples_rate = statistics.median(c.samples / t for c, t in zip(counts, step_times))
    tokens_rate = statistics.median(c.real_tokens / t for c, t in zip(counts, step_times))
    vit_trained = not cfg.model.fix_vit
    flops = [step_flops(base_config, c, vit_trained=vit_trained, projector_trained=not cfg.model.fix_sampler) for c in counts]
    achieved = statistics.median(f / t for f, t in zip(flops, step_times))
    result: dict[str, Any] = {
        "seconds_per_step": sec,
        "samples_per_s": samples_rate,
        "tokens_per_s": tokens_rate,
        "padding_fraction": 1.0 - total.real_tokens / max(1, total.computed_positions),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "calibration_gflops": calib_before,
        "calibration_gflops_after": calib_after,
        # CPU seconds this process used per step (all its threads): less sensitive than wall time to
        # other jobs on a shared machine; on a quiet machine wall ~ cpu / threads when the threads stay busy.
        "cpu_seconds_per_step": statistics.median(cpu_times),
        "samples_per_step": total.samples / len(counts),
        "tokens_per_step": total.real_tokens / len(counts),
        "targets_per_step": total.targets / len(counts),
        "steps_timed": len(counts),
        "step_seconds": step_times,
        "warmup": opts.warmup,
        "batch_size": opts.batch_size,
        "packing": opts.packing,
        "group_by_length": opts.group_by_length,
        "supervised_head": not opts.full_head,
        "use_lora": bool(cfg.model.use_lora),
        "bits": int(cfg.model.bits),
        "hd_num": resolve_run_sizes(cfg, base_config).hd_num,
        "image_grid": list(train_ds.grid) if getattr(train_ds, "grid", None) else None,
        "bf16": opts.bf16,
        "cpu_reuse_memory": reuse_memory,
        "activation_checkpointing": opts.activation_checkpointing,
        "activation_checkpointing_active": checkpointing_active,
        "attn_implementation": getattr(base_config, "_attn_implementation", None),
        "model_flops_per_step": statistics.median(flops),
        "achieved_tflops": achieved / 1e12,
        "flops_convention": "model FLOPs: 6 x decoder weights per real token (trained or not), causal attention "
        "per sample, head at supervised targets only, frozen ViT forward only; recomputation not counted",
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "loop": "transformers Trainer (XcftTrainer.training_step + AdamW step), each optimizer step timed end to end",
        "wall_seconds": wall,
        "torch": torch.__version__,
    }
    if cuda:
        result["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
        result["peak_gpu_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
        peak = gpu_peak_flops(result["device"], half=opts.bf16)
        result["mfu"] = achieved / peak if peak else None
    else:
        result["fraction_of_calibration"] = achieved / (calib_before * 1e9)
    return result


def format_train_result(r: dict[str, Any]) -> str:
    """Human-readable lines for ``--format text``."""
    gib = 1024**3
    lines = [
        f"seconds/step      {r['seconds_per_step']:.3f} (median of {r['steps_timed']} steps after {r['warmup']} warm-up)",
        f"samples/s         {r['samples_per_s']:.3f} ({r['samples_per_step']:.1f} samples/step)",
        f"tokens/s          {r['tokens_per_s']:.1f} (real tokens incl. image slots; {r['tokens_per_step']:.0f}/step)",
        f"padding fraction  {r['padding_fraction']:.4f}",
        f"CPU seconds/step  {r['cpu_seconds_per_step']:.3f} (this process, all threads)",
        f"peak RSS          {r['peak_rss_bytes'] / 1e9:.2f} GB",
        f"calibration       {r['calibration_gflops']:.1f} GFLOP/s before, {r['calibration_gflops_after']:.1f} after "
        f"(float32 1024x1024 matmul, {r['threads']} threads)",
        f"model FLOP/s      {r['achieved_tflops'] * 1e3:.1f} GFLOP/s ({r['flops_convention']})",
    ]
    if "fraction_of_calibration" in r:
        lines.append(f"of calibration    {r['fraction_of_calibration']:.2f}")
    if "peak_gpu_bytes" in r:
        lines.append(f"peak GPU memory   {r['peak_gpu_bytes'] / gib:.2f} GiB")
        mfu = r.get("mfu")
        lines.append(f"MFU               {mfu:.3f}" if mfu is not None else "MFU               n/a (unknown GPU peak)")
    lines.append(
        f"setup             batch {r['batch_size']}, packing {r['packing']}, group_by_length {r['group_by_length']}, "
        f"supervised head {r['supervised_head']}, lora {r['use_lora']}, bf16 {r['bf16']}, "
        f"activation checkpointing {r['activation_checkpointing']}, attention {r['attn_implementation']}, device {r['device']}"
        + (f", CPU memory reuse {r['cpu_reuse_memory']}" if r["device"] == "cpu" else "")
    )
    lines.append(f"loop              {r['loop']}")
    return "\n".join(lines)


__all__ = ["CountingCollator", "SyntheticDataset", "TrainBenchOptions", "format_train_result", "prepare_model", "run_train_bench"]
