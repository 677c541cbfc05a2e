"""Parity of the native model with the official InternLM-XComposer2 code (fixture ixc2_vl_tiny_public).

Inputs are the recorded ids/labels/image slots of cases.json (independent of our data path);
pixels come from the official example images with the official preprocessing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from xcft.model.image_processing_xcomposer2 import load_hd_views

torch.set_num_threads(1)

LOSS_RTOL = 1e-5
LOGIT_ATOL = 1e-4
STAT_RTOL = 1e-4


def _cases(folder: Path) -> dict:
    """The official recorded cases of a fixture checkpoint."""
    return json.loads((folder / "cases.json").read_text())


def _model(folder: Path):
    from xcft.model.loading import load_pretrained

    model, _ = load_pretrained(folder, dtype="float32", device="cpu")
    return model


@pytest.fixture(scope="module")
def cases(fixture_dir: Path) -> dict:
    return _cases(fixture_dir)


@pytest.fixture(scope="module")
def model(fixture_dir: Path):
    return _model(fixture_dir)


@pytest.fixture(scope="module")
def pixels(shared_dir: Path):
    """name -> [3, 490, 490] official pixels (cached per module)."""
    from xcft.model.image_processing_xcomposer2 import load_image

    images = shared_dir / "assets" / "official-examples" / "data" / "images"
    cache: dict[str, torch.Tensor] = {}

    def get(name: str) -> torch.Tensor:
        if name not in cache:
            cache[name] = torch.from_numpy(load_image(images / name, 490))
        return cache[name]

    return get


def case_by_name(cases: dict, prefix: str) -> dict:
    return next(c for c in cases["cases"] if c["name"].startswith(prefix))


def case_inputs(case: dict, pixels) -> dict:
    ids = torch.tensor([case["input_ids_image_as_-1"]])
    mask = ids == -1
    ids = ids.masked_fill(mask, 2)
    pv = torch.stack([pixels(f) for f in case["image_files"]]) if case["image_files"] else None
    return {
        "input_ids": ids,
        "labels": torch.tensor([case["labels"]]),
        "image_mask": mask if pv is not None else None,
        "pixel_values": pv,
    }


def forward_case(model, case: dict, pixels):
    """The official forward of a case; an image cut by truncation (p10) goes through inputs_embeds."""
    inputs = case_inputs(case, pixels)
    mask, pv = inputs["image_mask"], inputs["pixel_values"]
    if pv is not None and int(mask.sum()) != pv.shape[0] * model.image_tokens:
        emb = model.get_input_embeddings()(inputs["input_ids"])
        feats = model.get_image_features(pv).reshape(-1, emb.shape[-1])[: int(mask.sum())]
        emb = emb.masked_scatter(mask[..., None].expand_as(emb), feats)
        return model(inputs_embeds=emb, image_mask=mask, labels=inputs["labels"])
    return model(**inputs)


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


CASE_NAMES = [
    "p01",
    "p02",
    "p03",
    "p04",
    "p05",
    "p06",
    "p07",
    "p08",
    "p09",
    "p10",
    "p11",
]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_case_loss_and_logits(model, cases, pixels, name):
    case = case_by_name(cases, name)
    with torch.no_grad():
        out = forward_case(model, case, pixels)
    assert rel(out.loss.item(), case["loss"]) < LOSS_RTOL, (out.loss.item(), case["loss"])
    logits = out.logits[0]
    assert list(out.logits.shape) == case["logits"]["shape"]
    for pos, rec in case["logits"]["at_positions"].items():
        got = logits[int(pos), :8].tolist()
        assert max(abs(a - b) for a, b in zip(got, rec["first8"])) < LOGIT_ATOL, (pos, got, rec["first8"])
        # a sum of 92544 logits cancels to O(1): compare against the row's size, not the sum itself
        row = logits[int(pos)].double()
        assert abs(row.sum().item() - rec["sum"]) < 1e-6 * row.abs().sum().item() + 1e-4
        am = int(logits[int(pos)].argmax())
        if am != rec["argmax"]:
            assert abs(logits[int(pos), am] - logits[int(pos), rec["argmax"]]) < LOGIT_ATOL
    assert rel(logits.abs().sum().item(), case["logits"]["abs_sum"]) < 1e-5
    # per-token NLL of the recorded targets
    recs = case["token_nll"]
    pos = torch.tensor([r["pos"] for r in recs])
    nll = F.cross_entropy(logits[pos].double(), torch.tensor([r["target"] for r in recs]), reduction="none")
    for got, r in zip(nll.tolist(), recs):
        assert abs(got - r["nll"]) < 1e-4, (r, got)


@pytest.mark.parametrize("name", ["p03", "p05"])
def test_vision_and_projector_stats(model, cases, pixels, name):
    case = case_by_name(cases, name)
    pv = torch.stack([pixels(f) for f in case["image_files"]])
    for k, rec in enumerate(case["pixel_values"]["per_image"]):
        assert max(abs(a - b) for a, b in zip(pv[k].flatten()[:8].tolist(), rec["first8"])) < 1e-6
        assert rel(pv[k].double().sum().item(), rec["sum"]) < 1e-5
    with torch.no_grad():
        feats = model.vit(pv)
        proj = model.vision_proj(feats)
    for got, rec in ((feats, case["vit_out_patch_features"]), (proj, case["vision_proj_out"])):
        assert list(got.shape) == rec["shape"]
        assert rel(got.double().abs().sum().item(), rec["abs_sum"]) < STAT_RTOL
        assert rel(got.double().sum().item(), rec["sum"]) < 1e-3  # signed sum: cancellation
        assert max(abs(a - b) for a, b in zip(got.flatten()[:8].tolist(), rec["first8"])) < 1e-4


def test_plain_forwards(model, cases):
    single, batch, with_labels = cases["plain_forward"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([single["input_ids"]])).logits[0]
    for rec in single["per_position"]:
        assert max(abs(a - b) for a, b in zip(logits[rec["pos"], :8].tolist(), rec["first8"])) < LOGIT_ATOL
    assert rel(logits.double().sum().item(), single["logits_sum"]) < 1e-4

    ids = torch.tensor(batch["input_ids"])
    mask = torch.tensor(batch["attention_mask"])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    for row, recs in enumerate(batch["per_position"]):
        for rec in recs:
            if mask[row, rec["pos"]]:
                got = logits[row, rec["pos"], :8].tolist()
                assert max(abs(a - b) for a, b in zip(got, rec["first8"])) < LOGIT_ATOL, (row, rec["pos"])

    ids = torch.tensor([with_labels["input_ids"]])
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    assert rel(out.loss.item(), with_labels["loss"]) < LOSS_RTOL
    assert rel(out.logits.double().sum().item(), with_labels["logits_sum"]) < 1e-5


def test_padded_mixed_batch_equals_alone(model, cases, pixels):
    """Text and image samples right-padded into one batch: each keeps the loss it gets alone
    (the official single-sample loss); the batch loss is the token-weighted mean, and with
    num_items_in_batch it is the summed CE divided by that number."""
    from xcft.data.dataset import DataCollator
    from xcft.model.modeling_xcomposer2 import causal_lm_loss

    picked = [case_by_name(cases, n) for n in ("p07", "p11", "p01")]
    items = []
    for case in picked:
        inp = case_inputs(case, pixels)
        ids = inp["input_ids"][0]
        items.append(
            {
                "input_ids": ids,
                "labels": inp["labels"][0],
                "image_mask": torch.zeros_like(ids, dtype=torch.bool) if inp["image_mask"] is None else inp["image_mask"][0],
                "pixel_values": inp["pixel_values"] if inp["pixel_values"] is not None else torch.zeros(0, 3, 490, 490),
            }
        )
    batch = DataCollator(pad_token_id=2)(items)
    assert batch["image_counts"].tolist() == [0, 1, 0]
    with torch.no_grad():
        sums, counts = model.sample_losses(**batch)
    for row, case in enumerate(picked):
        assert rel(sums[row].item() / counts[row].item(), case["loss"]) < 1e-5, case["name"]
        assert counts[row].item() == case["num_target_tokens"]
    n = torch.tensor([c["num_target_tokens"] for c in picked], dtype=torch.float64)
    weighted = (torch.tensor([c["loss"] for c in picked], dtype=torch.float64) * n).sum() / n.sum()

    # The training forward (train mode, dropout 0 so it is deterministic; logits only where
    # labels are set) on the padded batch: token-weighted mean, or sum / num_items_in_batch.
    model.train()
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    saved_p = [m.p for m in dropouts]
    try:
        for m in dropouts:
            m.p = 0.0
        with torch.no_grad():
            loss = model(**batch, supervised_logits_only=True).loss.item()
            scaled = model(**batch, num_items_in_batch=torch.tensor(4 * int(n.sum())), supervised_logits_only=True).loss.item()
    finally:
        model.eval()
        for m, p in zip(dropouts, saved_p):
            m.p = p
    assert rel(loss, weighted.item()) < 1e-5
    assert rel(scaled, weighted.item() / 4) < 1e-5

    # causal_lm_loss (the eval-mode path) agrees with the recorded loss row by row
    text = case_inputs(picked[0], pixels)
    with torch.no_grad():
        logits = model(input_ids=text["input_ids"]).logits
    assert rel(causal_lm_loss(logits, text["labels"]).item(), picked[0]["loss"]) < 1e-5
    count = picked[0]["num_target_tokens"]
    assert rel(causal_lm_loss(logits, text["labels"], num_items_in_batch=2 * count).item(), picked[0]["loss"] / 2) < 1e-5


def test_train_steps_p03(fixture_dir, cases, pixels):
    """3 AdamW steps on p03 with frozen ViT reproduce the official losses, grad norms and parameter sums."""
    from xcft.model.loading import load_pretrained

    ref = json.loads((fixture_dir / "train_steps.json").read_text())["runs"][0]
    model, _ = load_pretrained(fixture_dir, dtype="float32", device="cpu")
    # The official run was in eval() (PLoRA dropout off). Train mode with the dropout at 0 gives
    # the same numbers and exercises the training paths (logits only at supervised positions).
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith("vit."))
    trainable = [p for p in model.parameters() if p.requires_grad]
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == set(ref["trainable_param_names"])
    assert sum(p.numel() for p in trainable) == ref["num_trainable_params"]
    opt = torch.optim.AdamW(trainable, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, foreach=False)
    inputs = case_inputs(case_by_name(cases, "p03"), pixels)
    params = dict(model.named_parameters())
    for step in ref["steps"]:
        opt.zero_grad()
        out = model(**inputs, supervised_logits_only=True)
        assert out.logits is None
        loss = out.loss
        assert rel(loss.item(), step["loss_before_update"]) < 1e-4, (step["step"], loss.item())
        if "grad_total_l2_norm" not in step:
            break
        loss.backward()
        total = math.sqrt(sum(p.grad.double().pow(2).sum().item() for p in trainable))
        assert rel(total, step["grad_total_l2_norm"]) < 1e-4
        for name, value in step["grad_l2_norm_tracked"].items():
            got = params[name].grad.double().norm().item()
            assert abs(got - value) <= 1e-4 * max(value, 1e-3), (name, got, value)
        opt.step()
        for name, value in step["param_sum_after_update"].items():
            assert abs(params[name].double().sum().item() - value) <= 1e-4 * max(abs(value), 1.0), name


# --------------------------------------------------------------------------- InternLM-XComposer-2.5 (fixture ixc2d5_tiny_public)


@pytest.fixture(scope="module")
def cases_hd(fixture_2d5_dir: Path) -> dict:
    return _cases(fixture_2d5_dir)


@pytest.fixture(scope="module")
def model_hd(fixture_2d5_dir: Path):
    return _model(fixture_2d5_dir)


@pytest.fixture(scope="module")
def views(fixture_2d5_dir: Path):
    """(file, hd_num) -> ([1 + h*w, 3, 560, 560] views, (h, w)), cached per module."""
    cache: dict[tuple[str, int], tuple[torch.Tensor, tuple[int, int]]] = {}

    def get(name: str, hd_num: int):
        if (name, hd_num) not in cache:
            cache[(name, hd_num)] = load_hd_views(fixture_2d5_dir / "images" / name, hd_num)
        return cache[(name, hd_num)]

    return get


def case_batch(case: dict, views, rows: list[int] | None = None) -> dict:
    """The batch-contract inputs of a recorded case (optionally a subset of its rows, unpadded)."""
    rows = list(range(len(case["rows"]))) if rows is None else rows
    recs = [case["rows"][r] for r in rows]
    width = max(r["valid_len"] for r in recs) if len(rows) < len(case["rows"]) else case["seq_len"]
    ids = torch.tensor([r["input_ids_image_as_-1"][:width] for r in recs])
    mask = ids == -1
    batch = {
        "input_ids": ids.masked_fill(mask, 2),
        "labels": torch.tensor([r["labels"][:width] for r in recs]),
        "attention_mask": torch.tensor([r["attention_mask"][:width] for r in recs]),
        "image_mask": mask,
    }
    pixels, grids, counts = [], [], []
    for r in recs:
        images = r.get("images", [])
        counts.append(len(images))
        for im in images:
            v, g = views(im["file"], im["hd_num"])
            pixels.append(v)
            grids.append(g)
    if pixels:
        batch.update(pixel_values=torch.cat(pixels), image_grids=torch.tensor(grids), image_counts=torch.tensor(counts))
    return batch


def image_is_cut(model_hd, batch: dict) -> bool:
    if "pixel_values" not in batch:
        return False
    need = sum(model_hd.config.hd_image_tokens(h, w) for h, w in batch["image_grids"].tolist())
    return int(batch["image_mask"].sum()) != need


def embeds_with_cut_image(model_hd, batch: dict) -> dict:
    """An image cut by truncation (official behaviour in p11; our data path never cuts one) goes
    through inputs_embeds with the features' first slots."""
    b = dict(batch)
    mask = b.pop("image_mask")
    emb = model_hd.get_input_embeddings()(b.pop("input_ids"))
    feats = model_hd.get_hd_image_features(b.pop("pixel_values"), b.pop("image_grids"))[: int(mask.sum())]
    b.pop("image_counts")
    emb = emb.masked_scatter(mask[..., None].expand_as(emb), feats.reshape(-1))
    return {**b, "inputs_embeds": emb, "image_mask": mask}


def recorded_positions(case: dict) -> list[int]:
    return sorted({int(p) for r in case["rows"] for p in r["logits_valid"]["at_positions"]})


def test_load_no_missing_or_unexpected_keys(model_hd, fixture_2d5_dir: Path):
    names = {line.split("\t")[0] for line in (fixture_2d5_dir / "keys.txt").read_text().splitlines() if line}
    assert set(model_hd.state_dict()) == names
    cfg = model_hd.config
    assert (cfg.family, cfg.hd, cfg.img_size, cfg.vision_grid, cfg.merged_grid) == ("2.5", True, 560, 40, 20)
    assert cfg.plora_r == 256 and cfg.plora_alpha == 256.0 and cfg.max_length == 16384
    assert cfg.rope_parameters["rope_type"] == "dynamic" and cfg.max_position_embeddings == 24576
    assert tuple(model_hd.plora_glb_GN.shape) == (1, 1, 192) and tuple(model_hd.plora_sub_GN.shape) == (1, 1, 1, 192)
    with pytest.raises(ValueError, match="hd_image_tokens"):
        _ = cfg.image_tokens


def test_2_0_fixture_is_detected_as_2_0(fixture_dir: Path):
    from xcft.model.loading import detect_family, read_state_dict

    assert detect_family(read_state_dict(fixture_dir)) == ("2.0", None)


CASE_NAMES_HD = [f"p{i:02d}" for i in range(1, 14)]


@pytest.mark.parametrize("name", CASE_NAMES_HD)
def test_hd_case_loss_and_logits(model_hd, cases_hd, views, name):
    case = case_by_name(cases_hd, name)
    batch = case_batch(case, views)
    if image_is_cut(model_hd, batch):
        batch = embeds_with_cut_image(model_hd, batch)
    # logits only where recorded or supervised (the full [B, L, vocab] tensor is up to 1.5 GB here)
    labels = batch.pop("labels")
    shift = labels[:, 1:] != -100
    positions = sorted(set(recorded_positions(case)) | set(shift.nonzero()[:, 1].tolist()))
    with torch.no_grad():
        out = model_hd(**batch, logits_to_keep=torch.tensor(positions))
    rows, cols = shift.nonzero(as_tuple=True)
    kept = out.logits[rows, torch.tensor([positions.index(c) for c in cols.tolist()])]
    nll = F.cross_entropy(kept.double(), labels[rows, cols + 1], reduction="none")
    assert shift.sum(dim=1).tolist() == [r["num_target_tokens"] for r in case["rows"]]
    assert rel(nll.mean().item(), case["loss"]) < LOSS_RTOL, (nll.mean().item(), case["loss"])
    for b, row in enumerate(case["rows"]):
        for pos, rec in row["logits_valid"]["at_positions"].items():
            got = out.logits[b, positions.index(int(pos))]
            assert (got[:8] - torch.tensor(rec["first8"])).abs().max().item() < LOGIT_ATOL, (b, pos)
            assert abs(got.double().sum().item() - rec["sum"]) < 1e-6 * got.abs().sum().item() + 1e-4
            am = int(got.argmax())
            if am != rec["argmax"]:
                assert abs(got[am] - got[rec["argmax"]]) < LOGIT_ATOL


def test_full_logits_and_training_loss_p06(model_hd, cases_hd, views):
    """The plain forward with labels (every logit, causal_lm_loss) on one image case."""
    case = case_by_name(cases_hd, "p06")
    with torch.no_grad():
        out = model_hd(**case_batch(case, views))
    row = case["rows"][0]
    assert rel(out.loss.item(), case["loss"]) < LOSS_RTOL
    assert list(out.logits.shape) == case["logits_shape"]
    valid = out.logits[0, : row["valid_len"]].double()
    assert rel(valid.abs().sum().item(), row["logits_valid"]["abs_sum"]) < 1e-5
    nll = F.cross_entropy(
        valid[[r["pos"] for r in row["token_nll"]]], torch.tensor([r["target"] for r in row["token_nll"]]), reduction="none"
    )
    assert max(abs(a - r["nll"]) for a, r in zip(nll.tolist(), row["token_nll"])) < 1e-4


@pytest.mark.parametrize("name", ["p04", "p07"])
def test_tower_merge_and_projector(model_hd, cases_hd, views, name):
    case = case_by_name(cases_hd, name)
    batch = case_batch(case, views)
    with torch.no_grad():
        feats = model_hd.vit(batch["pixel_values"])
        merged = model_hd.merge_hd_tokens(batch["pixel_values"], batch["image_grids"])
        proj = model_hd.vision_proj(merged)
    rec = case["vit_patch_features"]
    assert list(feats.shape) == rec["shape"]
    for got, want in zip(feats.double().sum(dim=(1, 2)).tolist(), rec["per_view_sum"]):
        assert abs(got - want) < STAT_RTOL * feats[0].abs().sum().item()
    rec = case["vit_out_before_proj"]
    assert [1, *merged.shape] == rec["shape"]
    start = 0
    for image in rec["per_image"]:
        assert image["start_in_concat"] == start
        for tok, first8 in image["token_first8"].items():
            got = merged[start + int(tok), :8]
            assert (got - torch.tensor(first8)).abs().max().item() < 1e-4, (image["tokens"], tok)
        part = merged[start : start + image["tokens"]].double()
        assert rel(part.abs().sum().item(), image["stats"]["abs_sum"]) < STAT_RTOL
        start += image["tokens"]
    assert start == merged.shape[0]
    rec = case["vision_proj_out"]
    assert [1, *proj.shape] == rec["shape"]
    assert rel(proj.double().abs().sum().item(), rec["abs_sum"]) < STAT_RTOL


def test_hd_plain_forwards(model_hd, cases_hd):
    single, batch, with_labels = cases_hd["plain_forward"]
    with torch.no_grad():
        logits = model_hd(input_ids=torch.tensor([single["input_ids"]])).logits[0]
    for rec in single["per_position"]:
        assert (logits[rec["pos"], :8] - torch.tensor(rec["first8"])).abs().max().item() < LOGIT_ATOL
    ids, mask = torch.tensor(batch["input_ids"]), torch.tensor(batch["attention_mask"])
    with torch.no_grad():
        logits = model_hd(input_ids=ids, attention_mask=mask).logits
    for row, recs in enumerate(batch["per_position"]):
        for rec in recs:
            if mask[row, rec["pos"]]:
                assert (logits[row, rec["pos"], :8] - torch.tensor(rec["first8"])).abs().max().item() < LOGIT_ATOL
    ids = torch.tensor([with_labels["input_ids"]])
    with torch.no_grad():
        out = model_hd(input_ids=ids, labels=ids)
    assert rel(out.loss.item(), with_labels["loss"]) < LOSS_RTOL


def test_padded_inner_batch_equals_rows_alone(model_hd, cases_hd, views):
    """p10: two rows with different crop grids, right-padded; each row alone gives the same logits/loss."""
    case = case_by_name(cases_hd, "p10")
    batch = case_batch(case, views)
    assert batch["image_grids"].tolist() == [[1, 1], [1, 4]] and batch["pixel_values"].shape[0] == 2 + 5
    positions = recorded_positions(case)
    with torch.no_grad():
        together = model_hd(**{k: v for k, v in batch.items() if k != "labels"}, logits_to_keep=torch.tensor(positions))
        sums, counts = model_hd.sample_losses(**batch)
    for r, row in enumerate(case["rows"]):
        alone = case_batch(case, views, rows=[r])
        keep = [p for p in positions if p < row["valid_len"]]
        with torch.no_grad():
            out = model_hd(**{k: v for k, v in alone.items() if k != "labels"}, logits_to_keep=torch.tensor(keep))
            s, c = model_hd.sample_losses(**alone)
        got = together.logits[r, [positions.index(p) for p in keep]]
        assert (got - out.logits[0]).abs().max().item() < 1e-4
        assert rel(s.item(), sums[r].item()) < 1e-6 and c.item() == counts[r].item() == row["num_target_tokens"]


def official_trainable(model_hd, fix_vit: bool) -> list[str]:
    """The official finetune setup: LLM, output, projector and separators train; the tower only
    without fix_vit, and then never its post_layernorm (the official code replaces it by an identity)."""
    model_hd.requires_grad_(True)
    if fix_vit:
        model_hd.vit.requires_grad_(False)
    for name, p in model_hd.vit.named_parameters():
        if "post_layernorm" in name:
            p.requires_grad_(False)
    return [n for n, p in model_hd.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("run_index", [0, 1], ids=["fix_vit", "train_vit"])
def test_train_steps_p06(fixture_2d5_dir: Path, cases_hd, views, run_index):
    from xcft import load_pretrained

    ref = json.loads((fixture_2d5_dir / "train_steps.json").read_text())["runs"][run_index]
    model_hd, _ = load_pretrained(fixture_2d5_dir, dtype="float32", device="cpu")
    # The official run was in eval() (PLoRA dropout off). Train mode with the dropout at 0 gives the
    # same numbers and exercises the training paths (the tower's training branch, logits only at
    # supervised positions).
    model_hd.train()
    for module in model_hd.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    names = official_trainable(model_hd, ref["fix_vit"])
    assert set(names) == set(ref["trainable_param_names"]) and len(names) == ref["num_trainable_tensors"]
    trainable = [p for p in model_hd.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == ref["num_trainable_params"]
    opt = torch.optim.AdamW(trainable, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, foreach=False)
    batch = case_batch(case_by_name(cases_hd, "p06"), views)
    params = dict(model_hd.named_parameters())
    for step in ref["steps"]:
        opt.zero_grad()
        out = model_hd(**batch, supervised_logits_only=True)
        assert out.logits is None
        loss = out.loss
        if "grad_total_l2_norm" not in step:
            assert rel(loss.item(), step["loss_after_3_updates"]) < 1e-4
            break
        assert rel(loss.item(), step["loss_before_update"]) < 1e-4, (step["step"], loss.item())
        loss.backward()
        total = math.sqrt(sum(p.grad.double().pow(2).sum().item() for p in trainable))
        assert rel(total, step["grad_total_l2_norm"]) < 1e-4
        for name, value in step["grad_l2_norm_tracked"].items():
            got = params[name].grad.double().norm().item()
            assert abs(got - value) <= 1e-4 * max(value, 1e-3), (name, got, value)
        opt.step()
        for name, value in step["param_sum_after_update"].items():
            assert abs(params[name].double().sum().item() - value) <= 1e-4 * max(abs(value), 1.0), name
