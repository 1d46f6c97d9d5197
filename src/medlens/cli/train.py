"""``medlens train align``, ``medlens train fusion`` and ``medlens calibrate``.

Training code (torch, numpy, the datasets) is imported inside the commands. The two
default dataset lists are spelled out here so that ``--help`` does not import it;
tests/test_cli.py checks that they equal the training modules' own defaults.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from medlens.cli.common import err, friendly, progress_bar
from medlens.config import Settings


def _console() -> Any:
    from rich.console import Console

    return Console()


def _dataset_names(data: str | None) -> tuple[str, ...]:
    """``--data`` as names; unset: every knowledge pack's ``training_datasets``."""
    if data is None:
        from medlens.knowledge import training_datasets

        return training_datasets()
    return tuple(d.strip() for d in data.split(",") if d.strip())


# -- train align -------------------------------------------------------------------------
def train_align(
    model: str = typer.Option(
        "lite", help="lite (tail blocks + heads, or heads only) | open_clip:… | hf:… (LoRA)."
    ),
    data: str | None = typer.Option(
        None,
        help="Comma-separated dataset names (default: every knowledge pack's training_datasets).",
    ),
    epochs: int | None = typer.Option(
        None, min=1, help="Default: the recipe's (lite 10; heads-only 20)."
    ),
    lr: float | None = typer.Option(None, help="Default 1e-3 (LoRA runs: try 1e-4)."),
    batch_size: int | None = typer.Option(
        None, min=2, help="Default 128 (heads-only 512; LoRA runs: try 32)."
    ),
    seed: int = typer.Option(0),
    balance: bool = typer.Option(
        True,
        help="Class balancing: majority undersampling + minority oversampling per epoch "
        "(heads-only lite: loss weights).",
    ),
    augment: bool | None = typer.Option(
        None, help="torchvision v2 augmentation on training images (default: on for lite)."
    ),
    tune_from: int | None = typer.Option(
        None,
        min=0,
        max=18,
        help="lite: fine-tune MobileNetV2 blocks from this index on (default 7).",
    ),
    heads_only: bool = typer.Option(
        False, help="lite: train only the heads on cached frozen features (fastest)."
    ),
    image_size: int | None = typer.Option(None, min=32, help="lite input size (default 224)."),
    colour_constancy: bool | None = typer.Option(
        None,
        help="lite: shades-of-gray colour constancy before the image tower "
        "(default: on; off with --heads-only, the earlier recipe).",
    ),
    views: int | None = typer.Option(
        None, min=0, help="lite: cached augmented views per training image (default 2)."
    ),
    precision: str = typer.Option(
        "auto",
        help="lite tuned recipe: auto | bf16 | fp32 for the cached prefix and the training "
        "steps (auto = bf16 where the CPU/GPU runs it natively; inference stays fp32).",
    ),
    ema: float | None = typer.Option(
        None,
        min=0.0,
        max=0.9999,
        help="lite tuned recipe: decay of the weight moving average that is validated and "
        "saved (default 0.99; 0 = off).",
    ),
    lora_r: int = typer.Option(32, "--lora-r"),
    lora_alpha: int = typer.Option(64, "--lora-alpha"),
    lora_targets: str | None = typer.Option(
        None, "--lora-targets", help="Comma-separated module names."
    ),
    limit: int | None = typer.Option(None, help="Records per split (smoke runs)."),
    out: Path = typer.Option(Path("runs/lite"), help="Run directory."),
    install: bool = typer.Option(
        False, help="lite: copy the trained weights into the package as the default model."
    ),
    *,
    settings: Settings,
) -> None:
    """Align image and text towers on the sample datasets' train splits."""
    import dataclasses
    import shutil

    datasets = _dataset_names(data)
    if model != "lite":
        _train_lora(
            model,
            datasets,
            epochs=epochs or 20,
            lr=lr or 1e-4,
            batch_size=batch_size or 32,
            seed=seed,
            balance=balance,
            augment=bool(augment),
            r=lora_r,
            alpha=lora_alpha,
            targets=lora_targets,
            limit=limit,
            out=out,
        )
        return
    from medlens.training.align import DEFAULT_RECIPE, AlignConfig
    from medlens.training.align import train_align as run_align

    base = AlignConfig() if heads_only else DEFAULT_RECIPE
    cfg = dataclasses.replace(
        base,
        data=datasets,
        epochs=epochs or base.epochs,
        lr=lr or base.lr,
        batch_size=batch_size or base.batch_size,
        seed=seed,
        balance=balance,
        limit=limit,
        tune_from=None if heads_only else (base.tune_from if tune_from is None else tune_from),
        image_size=image_size or base.image_size,
        colour_constancy=base.colour_constancy if colour_constancy is None else colour_constancy,
        augment=base.augment if augment is None else augment,
        views=base.views if views is None else views,
        precision=precision,
        ema=base.ema if ema is None else (ema or None),
    )
    with progress_bar() as progress:
        metrics = run_align(cfg, out, settings.cache_dir / "features", progress)
    console = _console()
    console.print_json(json.dumps(metrics))
    if install:
        from medlens.models.lite import DEFAULT_HEADS_PATH

        shutil.copyfile(out / "lite_heads.safetensors", DEFAULT_HEADS_PATH)
        DEFAULT_HEADS_PATH.chmod(0o644)
        console.print(
            f"installed weights to {DEFAULT_HEADS_PATH}; run `medlens calibrate --write` next"
        )


def _train_lora(
    model: str,
    datasets: tuple[str, ...],
    *,
    out: Path,
    limit: int | None,
    balance: bool,
    augment: bool,
    targets: str | None,
    **kw: Any,
) -> None:
    """LoRA on an open_clip / HF CLIP encoder; saves the adapter and projection tensors."""
    from safetensors.torch import save_file

    from medlens.models import load_encoder
    from medlens.training.lora import (
        BalanceRecipe,
        adapter_state,
        make_augment,
        pairs_from_datasets,
        train_lora,
    )

    enc = load_encoder(model)
    pairs, recipe = pairs_from_datasets(
        [d for d in datasets if d != "pneumoniamnist"] or datasets,
        "train",
        limit=limit,
        balance=BalanceRecipe() if balance else None,
        seed=kw["seed"],
    )
    with progress_bar() as progress:
        task = progress.add_task(f"LoRA on {len(pairs)} pairs", total=None)
        result = train_lora(
            enc,
            pairs,
            targets=targets.split(",") if targets else None,
            augment=make_augment() if augment else None,
            progress=lambda step, loss: progress.update(
                task, description=f"LoRA step {step} loss {loss:.3f}"
            ),
            **kw,
        )
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in adapter_state(enc).items()}, str(out / "adapter.safetensors")
    )
    (out / "recipe.json").write_text(
        json.dumps({"model": model, "pairs": recipe, "lora": result}, indent=2, default=str)
    )
    _console().print(
        f"saved the adapter to {out / 'adapter.safetensors'} (fingerprint {enc.fingerprint})"
    )


# -- calibrate ---------------------------------------------------------------------------
def _fmt(x: Any) -> str:
    return "—" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def calibration_tables(result: dict[str, Any]) -> list[Any]:
    """Rich tables: temperature and ECE per domain/dataset; thresholds with the
    sensitivity/specificity they reach on validation (pooled and per dataset)."""
    from rich.table import Table

    temps = Table(title=f"Temperature and ECE ({result['split']} split, {15}-bin ECE)")
    for col in ("domain", "T", "dataset", "n", "ECE before", "ECE after"):
        temps.add_column(col, justify="left" if col in ("domain", "dataset") else "right")
    for domain, rep in result["report"].items():
        temps.add_row(
            domain,
            _fmt(rep["temperature"]),
            "all (pooled)",
            str(rep["n"]),
            _fmt(rep["ece_before"]),
            _fmt(rep["ece_after"]),
        )
        for name, ds in rep["datasets"].items():
            temps.add_row("", "", name, str(ds["n"]), _fmt(ds["ece_before"]), _fmt(ds["ece_after"]))
    target = result["target_sensitivity"]
    th = Table(
        title=f"Urgent-finding thresholds for sensitivity ≥ {target:.2f} ({result['split']})"
    )
    for col in ("domain", "finding", "threshold", "where", "pos", "neg", "sens", "spec"):
        th.add_column(col, justify="left" if col in ("domain", "finding", "where") else "right")
    for domain, rep in result["report"].items():
        for fid, row in rep["thresholds"].items():
            if row["threshold"] is None:
                th.add_row(domain, fid, "—", row["note"], str(row["positives"]), "", "", "")
                continue
            th.add_row(
                domain,
                fid,
                f"{row['threshold']:.4f}",
                f"all (pooled; set by {row.get('set_by', 'all (pooled)')})",
                str(row["positives"]),
                str(row["negatives"]),
                _fmt(row["sensitivity"]),
                _fmt(row["specificity"]),
            )
            for name, ds in row["per_dataset"].items():
                th.add_row(
                    "",
                    "",
                    "",
                    name,
                    str(ds["positives"]),
                    str(ds["negatives"]),
                    _fmt(ds["sensitivity"]),
                    _fmt(ds["specificity"]),
                )
    return [temps, th]


def calibrate(
    model: str = typer.Option("lite", help="Encoder to calibrate."),
    data: str | None = typer.Option(
        None,
        help="Comma-separated datasets, their val splits are used (default: every knowledge "
        "pack's training_datasets).",
    ),
    target_sensitivity: float = typer.Option(
        0.90, min=0.01, max=1.0, help="Sensitivity each urgent-finding threshold must reach."
    ),
    limit: int | None = typer.Option(
        None, min=1, help="At most N val records per dataset (smoke runs)."
    ),
    write: bool = typer.Option(
        False,
        "--write/--no-write",
        help="Store the calibration: lite, in its heads file (the packaged one by default); "
        "other models, in their model card under MEDLENS_HOME/cards.",
    ),
    heads: Path | None = typer.Option(
        None, help="Heads file to write (default: the one the lite model was loaded from)."
    ),
    out: Path | None = typer.Option(None, help="Also write the full result as JSON here."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    *,
    settings: Settings,
) -> None:
    """Fit per-domain temperatures and urgent-finding thresholds on validation splits."""
    names = _dataset_names(data)
    from medlens.models import load_encoder
    from medlens.training.calibrate import calibrate as fit_calibration
    from medlens.training.calibrate import write_calibration, write_card_calibration

    if model == "lite" and heads is not None:
        from medlens.models.lite import LiteEncoder

        enc = LiteEncoder.load(heads)
    else:
        enc = load_encoder(model)
    with progress_bar() as progress:

        def factory(label: str, total: int) -> Callable[[int], None]:
            task = progress.add_task(f"embedding {label}", total=total)
            return lambda n: progress.advance(task, n)

        result = fit_calibration(
            model,
            names,
            target_sensitivity,
            encoder=enc,
            limit=limit,
            advance_factory=factory,
            cache_dir=settings.cache_dir,
        )
    console = _console()
    if as_json:
        console.print_json(json.dumps(result))
    else:
        for table in calibration_tables(result):
            console.print(table)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    if write:
        if model == "lite":
            target = heads or enc.heads_path
            write_calibration(target, result)
        else:  # open_clip / hf: the model card, keyed by the weights' fingerprint
            target = write_card_calibration(enc, result, settings.cards_dir)
        err.print(f"wrote calibration into {target}")


# -- train fusion ------------------------------------------------------------------------
def train_fusion(
    model: str = typer.Option("lite", help="Encoder whose calibrated logits the head fuses."),
    domain: str = typer.Option("dermatology", help="Knowledge pack with a context vocabulary."),
    data: str | None = typer.Option(
        None, help="Comma-separated datasets (default: the pack's training_datasets it codes)."
    ),
    fields: str = typer.Option(
        "age,sex,site,diameter_mm,history",
        help="Context fields the head encodes (age, sex, site, fitzpatrick, diameter_mm, "
        "history). Fitzpatrick is left out by default: docs/fusion.md shows why.",
    ),
    write: bool = typer.Option(
        False,
        "--write/--no-write",
        help="Store the head under MEDLENS_HOME/cards (or --out), where analyze finds it.",
    ),
    out: Path | None = typer.Option(None, help="Folder to write the head to (with --write)."),
    as_json: bool = typer.Option(False, "--json", help="Print the fit summary as JSON."),
    *,
    settings: Settings,
) -> None:
    """Fit the learned fusion of image and clinical context on validation splits."""
    from medlens.analysis import fusion as F
    from medlens.knowledge import load_domain
    from medlens.models import load_encoder
    from medlens.models.card import card_for
    from medlens.training import fusion as T

    chosen = tuple(f.strip() for f in fields.split(",") if f.strip())
    unknown = sorted(set(chosen) - set(F.FIELDS))
    if unknown or not chosen:
        raise typer.BadParameter(f"unknown fields {unknown}; choose from {', '.join(F.FIELDS)}")
    enc = load_encoder(model)
    card = card_for(enc, settings.cards_dir)
    pack = load_domain(domain)
    names = None if data is None else [d.strip() for d in data.split(",") if d.strip()]
    with progress_bar() as progress:

        def factory(label: str, total: int) -> Callable[[int], None]:
            task = progress.add_task(f"embedding {label}", total=total)
            return lambda n: progress.advance(task, n)

        fdata = T.collect(
            enc, card.calibration, pack, "val", names, factory, prompt_cache=settings.cache_dir
        )
    head = T.fit_head(fdata, enc.fingerprint, chosen)
    summary = {
        "fingerprint": head.fingerprint,
        "domain": head.domain,
        "fields": list(chosen),
        "findings": list(head.findings),
        **head.info,
    }
    if as_json:
        _console().print_json(json.dumps(summary))
    else:
        err.print(
            f"fusion head for {domain}: {len(head.findings)} findings × {len(head.features)} "
            f"features, l2 {head.info['l2']:g}; validation NLL image only "
            f"{head.info['image_only_nll']:.4f}, cross-validated with context "
            f"{head.info['cv_nll'][str(head.info['l2'])]:.4f}"
        )
    if write:
        target = F.write_head(head, out or settings.cards_dir)
        err.print(f"wrote {target}")


def register(app: typer.Typer) -> None:
    """Add the ``train`` group (``train align``) and ``calibrate`` to the ``medlens`` app."""
    train_app = typer.Typer(help="Train models (projection heads, LoRA).", no_args_is_help=True)
    train_app.command("align")(friendly(train_align))
    train_app.command("fusion")(friendly(train_fusion))
    app.add_typer(train_app, name="train")
    app.command("calibrate")(friendly(calibrate))
