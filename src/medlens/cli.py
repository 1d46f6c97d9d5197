"""The ``medlens`` command line. Every expected failure is one line on stderr, exit 2."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from medlens.commandline import err, friendly, progress_bar
from medlens.config import get_settings
from medlens.errors import ConfigError, MedLensError

app = typer.Typer(
    name="medlens",
    help="MedLens: zero-shot triage, explanations and reports for medical images. "
    "Research software for decision support, never a diagnosis.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
train_app = typer.Typer(help="Train models (projection heads, LoRA).", no_args_is_help=True)
app.add_typer(train_app, name="train")

console = Console()

_DEFAULT_ALIGN_DATA = ("dermamnist", "pad_ufes_20", "dermnet", "covid_chestxray", "pneumoniamnist")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".dcm", ".dicom"}


def print_analysis(result: dict[str, Any], top_k: int) -> None:
    tri = result["triage"]
    colour = {"urgent": "red", "soon": "yellow", "routine": "green"}[tri["level"]]
    console.print(
        f"[bold]Domain:[/bold] {result['domain']} ({result['domain_detection']['source']})   "
        f"[bold]Model:[/bold] {result['model']['name']} ({result['model']['fingerprint']})"
    )
    table = Table(title="Differential", show_lines=False)
    table.add_column("#", justify="right")
    table.add_column("Finding")
    table.add_column("Probability", justify="right")
    table.add_column("ICD-10-CM")
    table.add_column("Risk")
    for i, f in enumerate(result["findings"][:top_k], 1):
        table.add_row(
            str(i), f["name"], f"{f['probability']:.1%}", ", ".join(f["icd10"]), f["risk"]
        )
    console.print(table)
    console.print(
        f"[bold {colour}]Triage: {tri['level'].upper()}[/bold {colour}] — {tri['reason']}"
    )
    if tri["next_step"]:
        console.print(f"Next step: {tri['next_step']}")
    for d in result["descriptions"][:2]:
        s = d["sections"]
        console.print(f"\n[bold]{d['name']}[/bold] [dim]({d['source']})[/dim]")
        console.print(f"  Presentation: {s['presentation']}")
        console.print(f"  Image features: {s['image_features']}")
        console.print(f"  Differentials: {s['differentials']}")
    console.print(f"\n[dim]{result['disclaimer']}[/dim]")


@app.command()
@friendly
def analyze(
    path: Path = typer.Argument(..., help="Image/DICOM file, or a folder of them."),
    domain: str = typer.Option("auto", help="dermatology | chest_xray | auto"),
    symptoms: str | None = typer.Option(None, help="Free-text symptom description."),
    top_k: int = typer.Option(5, "--top-k", min=1, help="How many findings to show."),
    model: str | None = typer.Option(None, help="Encoder name (default: lite or MEDLENS_MODEL)."),
    as_json: bool = typer.Option(False, "--json", help="Print the analysis as one JSON object."),
    out: Path | None = typer.Option(None, help="Folder mode: output file (.jsonl or .csv)."),
) -> None:
    """Analyze one image (ranked differential, triage, descriptions) or a whole folder."""
    from medlens.pipeline import MedLens

    if not path.exists():
        raise ConfigError(f"{path} does not exist")
    lens = MedLens(model=model)
    if path.is_dir():
        _analyze_folder(lens, path, domain=domain, symptoms=symptoms, top_k=top_k, out=out)
        return
    result = lens.analyze(path, domain=domain, symptoms=symptoms, top_k=top_k).to_dict()
    if as_json:
        sys.stdout.write(json.dumps(result, ensure_ascii=False) + "\n")
    else:
        print_analysis(result, top_k)


def _analyze_folder(
    lens: Any, folder: Path, *, domain: str, symptoms: str | None, top_k: int, out: Path | None
) -> None:
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise ConfigError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    out = out or Path(f"medlens-{folder.name}.jsonl")
    rows: list[dict[str, Any]] = []
    failures = 0
    with progress_bar() as progress:
        task = progress.add_task("analyzing", total=len(files))
        for f in files:
            try:
                r = lens.analyze(f, domain=domain, symptoms=symptoms, top_k=top_k).to_dict()
                rows.append({"file": str(f.relative_to(folder)), **r})
            except MedLensError as exc:
                failures += 1
                rows.append(
                    {"file": str(f.relative_to(folder)), "error": f"{type(exc).__name__}: {exc}"}
                )
            progress.advance(task)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".csv":
        with open(out, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["file", "domain", "top_finding", "probability", "triage", "error"])
            for r in rows:
                top = r.get("findings", [{}])[0] if "findings" in r else {}
                w.writerow(
                    [
                        r["file"],
                        r.get("domain", ""),
                        top.get("id", ""),
                        top.get("probability", ""),
                        r.get("triage", {}).get("level", ""),
                        r.get("error", ""),
                    ]
                )
    else:
        with open(out, "w") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    err.print(f"wrote {len(rows)} results ({failures} failed) to {out}")


DEMO_FILES = [
    ("isic2018-task3-test/images/ISIC_0034524.jpg", "isic2018"),
    ("isic2018-task3-test/images/ISIC_0034529.jpg", "isic2018"),
    ("isic2018-task3-test/images/ISIC_0034545.jpg", "isic2018"),
    ("cxr-samples/00000001_000.png", "NIH: Cardiomegaly"),
    ("cxr-samples/00027426_000.png", "NIH: No Finding"),
    ("cxr-samples/tb0005.png", "TBX11K: tuberculosis"),
    ("cxr-samples/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm", "DICOM"),
]


@app.command()
@friendly
def samples(
    model: str | None = typer.Option(None, help="Encoder name (default: lite)."),
) -> None:
    """Analyze a handful of sample images from MEDLENS_DATA and print a table."""
    from medlens.pipeline import MedLens

    data = get_settings().require_data()
    truth = _isic_truth(data)
    lens = MedLens(model=model)
    table = Table(title=f"MedLens demo — model {lens.model_name}")
    for col in ("image", "truth", "domain", "top findings", "triage"):
        table.add_column(col)
    with progress_bar() as progress:
        task = progress.add_task("analyzing samples", total=len(DEMO_FILES))
        for rel, label in DEMO_FILES:
            path = data / rel
            if not path.is_file():
                progress.advance(task)
                continue
            r = lens.analyze(path).to_dict()
            top = ", ".join(f"{f['name']} {f['probability']:.0%}" for f in r["findings"][:3])
            t = truth.get(path.stem, label)
            table.add_row(path.name[-28:], t, r["domain"], top, r["triage"]["level"])
            progress.advance(task)
    console.print(table)
    console.print("[dim]Research software for decision support only; not a diagnosis.[/dim]")


def _isic_truth(data: Path) -> dict[str, str]:
    labels = data / "isic2018-task3-test" / "labels.csv"
    if not labels.is_file():
        return {}
    with open(labels) as fh:
        return {r["image_id"]: f"ISIC: {r['dx']}" for r in csv.DictReader(fh)}


@train_app.command("align")
@friendly
def train_align_cmd(
    model: str = typer.Option(
        "lite", help="lite (tail blocks + heads, or heads only) | open_clip:… | hf:… (LoRA)."
    ),
    data: str = typer.Option(",".join(_DEFAULT_ALIGN_DATA), help="Comma-separated dataset names."),
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
) -> None:
    """Align image and text towers on the sample datasets' train splits."""
    import dataclasses
    import shutil

    datasets = tuple(d.strip() for d in data.split(",") if d.strip())
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
    from medlens.training.align import DEFAULT_RECIPE, AlignConfig, train_align

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
        metrics = train_align(cfg, out, get_settings().cache_dir / "features", progress)
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
    console.print(
        f"saved the adapter to {out / 'adapter.safetensors'} (fingerprint {enc.fingerprint})"
    )


def _register_subsystems() -> None:
    """Commands that live with their subsystem (service, retrieval, evaluation)."""
    from medlens.api.commands import demo_command
    from medlens.api.commands import register as register_service
    from medlens.evaluation.commands import register as register_eval
    from medlens.retrieval.commands import register as register_retrieval
    from medlens.training.commands import register as register_calibrate

    register_service(app)
    register_retrieval(app)
    register_calibrate(app)
    register_eval(app)
    app.command("demo")(demo_command)


_register_subsystems()


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
