"""Batch embedding throughput (images/s): MedLens's pipeline against the bare forward.

Three measurements at each batch size, on the same real images (ISIC 2018 test JPEGs,
224 px, from MEDLENS_DATA):

- ``pipeline (files)``: decode each file through ``medlens.io`` + ``encoder.embed_images``,
  one after the other.
- ``pipeline (files, decoded ahead)``: the same through ``embeddings.fill`` with
  ``prepare=decode`` (no cache): what ``medlens eval``, calibration and training pay per
  image; the next batch is decoded in a background thread while this one runs forward.
- ``pipeline (pixels)``: ``encoder.embed_images`` on already-decoded pixels (resize, crop,
  normalise, forward, heads, L2).
- ``bare forward``: the network alone on a ready, normalised ``channels_last`` tensor
  (lite: image tower + projection head) under ``torch.inference_mode``: the ceiling.

The headline is pipeline ÷ bare at the same batch size: how much of the model's own
speed the pipeline keeps. The modes take turns in short rounds and the ratio is the
median of per-round ratios, so other load on a shared machine affects both sides alike.
Usage::

    python benchmarks/throughput.py [--model lite] [--n 256] [--batch-sizes 8,32]
        [--rounds 5] [--min-seconds 2] [--out benchmarks/results/throughput.json]
    python benchmarks/throughput.py --smoke      # 16 images, batch 8: checks it runs

Speed goals live here, never as timed assertions in tests.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

ISIC_DIR = "isic2018-task3-test/images"


def _images(data: Path, n: int) -> list[Path]:
    files = sorted((data / ISIC_DIR).glob("*.jpg"))
    if not files:
        sys.exit(f"no ISIC 2018 test images under {data / ISIC_DIR}: set MEDLENS_DATA")
    return [files[i % len(files)] for i in range(n)]


def _interleaved(
    fns: dict[str, Callable[[], int]], rounds: int, min_seconds: float
) -> dict[str, list[float]]:
    """Images/s of each ``fn`` (one batch per call, returns its size) per round. Modes
    take turns within every round, so load from other processes on a shared machine
    hits them alike and the per-round ratios stay meaningful."""
    for fn in fns.values():
        fn()  # warm-up
    rates: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            done, t0 = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - t0) < min_seconds or not done:
                done += fn()
            rates[k].append(done / elapsed)
    return rates


def bare_forward(enc) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The network alone for encoders whose parts we know (lite); None otherwise."""
    if not hasattr(enc, "image_head") or not hasattr(enc, "image_tower"):
        return None
    tower = enc.image_tower()

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return torch.nn.functional.normalize(enc.image_head(tower(x)), dim=-1)

    return forward


def run(model: str, n: int, batch_sizes: list[int], rounds: int, min_seconds: float) -> dict:
    from medlens import embeddings
    from medlens.evaluation.protocols import machine_info
    from medlens.io import load_image
    from medlens.models import load_encoder

    data = Path(os.environ.get("MEDLENS_DATA", "../shared/data"))
    files = _images(data, n)
    enc = load_encoder(model)
    space = embeddings.image_space(enc)
    pixels = [load_image(f).pixels for f in files]
    bare = bare_forward(enc)
    rows = []
    for bs in batch_sizes:
        starts = itertools.cycle(range(0, n, bs))

        def from_files(bs: int = bs, starts: Iterator[int] = starts) -> int:
            i = next(starts)
            batch = [load_image(f).pixels for f in files[i : i + bs]]
            enc.embed_images(batch, batch_size=bs)
            return len(batch)

        def from_files_ahead(bs: int = bs, starts: Iterator[int] = starts) -> int:
            i = next(starts)
            # Four forward batches per call, so there is a next batch to decode ahead.
            chunk = [files[(i + j) % n] for j in range(4 * bs)]
            embeddings.fill(
                chunk,
                [str(f) for f in chunk],
                space,
                lambda ims, bs=bs: enc.embed_images(ims, batch_size=bs),
                store=None,
                batch_size=bs,
                prepare=lambda part: [load_image(f).pixels for f in part],
            )
            return len(chunk)

        def from_pixels(bs: int = bs, starts: Iterator[int] = starts) -> int:
            i = next(starts)
            enc.embed_images(pixels[i : i + bs], batch_size=bs)
            return len(pixels[i : i + bs])

        fns: dict[str, Callable[[], int]] = {
            "files": from_files,
            "files_ahead": from_files_ahead,
            "pixels": from_pixels,
        }
        if bare is not None:
            x = enc.preprocess(pixels[:bs]).contiguous(memory_format=torch.channels_last)
            fns["bare"] = lambda x=x: len(bare(x))
        rates = _interleaved(fns, rounds, min_seconds)
        row = {
            "batch_size": bs,
            "pipeline_files_img_s": round(statistics.median(rates["files"]), 1),
            "pipeline_files_ahead_img_s": round(statistics.median(rates["files_ahead"]), 1),
            "pipeline_pixels_img_s": round(statistics.median(rates["pixels"]), 1),
            "bare_forward_img_s": None,
        }
        if "bare" in rates:
            row["bare_forward_img_s"] = round(statistics.median(rates["bare"]), 1)
            for mode in ("files", "files_ahead", "pixels"):
                ratios = [p / b for p, b in zip(rates[mode], rates["bare"], strict=True)]
                row[f"ratio_{mode}_to_bare"] = round(statistics.median(ratios), 3)
        row["rounds"] = {k: [round(v, 1) for v in r] for k, r in rates.items()}
        rows.append(row)
    return {
        "benchmark": "throughput",
        "model": {"name": model, "fingerprint": enc.fingerprint},
        "images": {"source": ISIC_DIR, "n": n, "size": list(pixels[0].shape)},
        "method": f"{rounds} rounds, modes interleaved, >= {min_seconds} s per mode per round; "
        "medians of rates and of per-round ratios",
        "rows": rows,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/throughput.py " + " ".join(sys.argv[1:]),
    }


def print_table(result: dict) -> None:
    print(
        f"model {result['model']['name']} ({result['model']['fingerprint']}), "
        f"{result['images']['n']} images, peak RSS {result['peak_rss_mb']} MB"
    )
    print(
        "| batch | from files img/s | from files, decoded ahead img/s | from pixels img/s "
        "| bare forward img/s | files ÷ bare | decoded ahead ÷ bare | pixels ÷ bare |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(
            f"| {r['batch_size']} | {r['pipeline_files_img_s']} | "
            f"{r['pipeline_files_ahead_img_s']} | {r['pipeline_pixels_img_s']} | "
            f"{r['bare_forward_img_s']} | {r.get('ratio_files_to_bare', '–')} | "
            f"{r.get('ratio_files_ahead_to_bare', '–')} | {r.get('ratio_pixels_to_bare', '–')} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="lite")
    ap.add_argument("--n", type=int, default=256, help="images per pass")
    ap.add_argument("--batch-sizes", default="8,32")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per batch size")
    ap.add_argument("--min-seconds", type=float, default=2.0, help="per mode per round")
    ap.add_argument(
        "--smoke", action="store_true", help="tiny run: 8 images, batch 8, 2 short rounds"
    )
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/throughput.json"))
    args = ap.parse_args()
    if args.smoke:
        args.n, args.batch_sizes, args.rounds, args.min_seconds = 8, "8", 2, 0.1
    sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    result = run(args.model, args.n, sizes, args.rounds, args.min_seconds)
    result["smoke"] = args.smoke
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
