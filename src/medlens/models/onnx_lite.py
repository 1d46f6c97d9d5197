"""ONNX Runtime engine for the lite image tower: the same network (frozen prefix, tuned
tail, image head) exported once per model into MEDLENS_HOME and run without torch.

Why: torch's import dominated a fresh process's first result (issue 17: ``import
medlens`` 2.18 s with torch, 0.47 s without, benchmarks/cold_start.py), and ONNX Runtime
runs this MobileNetV2 faster on a CPU (benchmarks/analyze_latency.py). Only single-image
analysis (``MedLens``: CLI, API, UI) uses it; text embeddings, batch embedding, training
and explanations stay on torch, which the engine loads on first use of anything it does
not serve itself (``__getattr__``).

An export is accepted only when ONNX Runtime reproduces the torch forward on the same
input (``TOLERANCE``), and it is stored with a stamp of the files it came from (heads and
backbone weights: path, size, mtime) and of this code (``ENGINE_VERSION`` and a hash of
the modules that build the network) and the graph's SHA-256. A stamp that no longer
matches, a graph that is not the one stamped, an unreadable file or a missing
onnxruntime means torch serves, exactly as before; ``MEDLENS_ONNX=0``
switches the engine off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medlens.config import write_private
from medlens.errors import ModelUnavailable
from medlens.models._util import (
    INFERENCE_THREADS,
    batched,
    center_crop_offsets,
    check_images,
    shorter_side_size,
)

log = logging.getLogger(__name__)

ENGINE_VERSION = 1  # bump when the exported graph or the preprocessing below changes
TOLERANCE = 1e-4  # max |ORT - torch| over features and embeddings at export
OPSET = 17
_LOCK = threading.Lock()


def _paths(cache_dir: Path, name: str) -> tuple[Path, Path]:
    """The graph and its stamp for a model spec (hashed: specs may hold file paths)."""
    stem = "lite-" + hashlib.sha256(name.encode()).hexdigest()[:16]
    folder = cache_dir / "onnx"
    return folder / f"{stem}.onnx", folder / f"{stem}.json"


def _file_stamp(path: Path) -> list:
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def _version() -> str:
    """The engine version and a hash of the code that builds and feeds the graph, so an
    export from other code (an upgrade, a checkout of another commit) is never reused."""
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in ("lite.py", "mobilenet.py", "onnx_lite.py"):
        h.update((here / f).read_bytes())
    return f"{ENGINE_VERSION}/{h.hexdigest()[:16]}"


def _sources_current(stamp: dict[str, Any]) -> bool:
    if stamp.get("engine") != _version():
        return False
    try:
        return all(_file_stamp(Path(p)) == [p, size, mtime] for p, size, mtime in stamp["sources"])
    except (OSError, KeyError, TypeError, ValueError):
        return False


_LEVELS = np.arange(256, dtype=np.float32)
_LEVELS_POW6 = np.arange(256, dtype=np.float64) ** 6


def preprocess(
    images: Sequence[np.ndarray],
    size: int,
    mean: np.ndarray,
    std: np.ndarray,
    colour_constancy: bool,
) -> np.ndarray:
    """uint8 (H, W, 3) images → float32 (N, 3, size, size): the lite encoder's
    preprocessing in numpy. Resizing is PIL's antialiased bilinear, which torchvision's
    uint8 kernel reproduces to within one grey level; the rest is ``lite.shades_of_gray``
    and ImageNet normalisation (``mean``/``std`` in 0-255 units). Because the crop is
    uint8, both are per-channel functions of 256 levels: the illuminant comes from each
    channel's histogram and the output from one 256-entry table per channel, the same
    float32 operations as the torch path applied to each level once, not to each pixel."""
    from PIL import Image

    out = np.empty((len(images), 3, size, size), np.float32)
    for i, img in enumerate(images):
        h, w = img.shape[:2]
        nh, nw = shorter_side_size(h, w, size)
        if (nh, nw) != (h, w):
            img = np.asarray(Image.fromarray(img).resize((nw, nh), Image.Resampling.BILINEAR))
        top, left = center_crop_offsets(nh, nw, size)
        crop = img[top : top + size, left : left + size]
        channels = [np.ascontiguousarray(crop[..., c]) for c in range(3)]
        gain = np.ones(3, np.float32)
        if colour_constancy:
            counts = np.stack([np.bincount(ch.ravel(), minlength=256) for ch in channels])
            illum = (counts @ _LEVELS_POW6 / (size * size)) ** (1.0 / 6)
            gain = (illum.mean() / np.maximum(illum, 1e-6)).astype(np.float32)
        table = np.clip(_LEVELS[None, :] * gain[:, None], 0, 255)
        table = (table - mean[:, None]) / std[:, None]
        for c, ch in enumerate(channels):
            np.take(table[c], ch, out=out[i, c])
    return out


class OnnxLite:
    """A lite encoder whose image side runs in ONNX Runtime. The torch encoder it was
    exported from is loaded only when something else is asked of it."""

    def __init__(self, name: str, device: str, graph: bytes, stamp: dict[str, Any]) -> None:
        import onnxruntime as ort

        self.name = name
        self.device = device
        self.fingerprint: str = stamp["fingerprint"]
        self.dim: int = stamp["dim"]
        self.image_dim: int = stamp["image_dim"]
        self.logit_scale: float = stamp["logit_scale"]
        # What caches, cards and prompt keys read besides the fingerprint (never torch).
        self.backbone: str = stamp["backbone"]
        self.image_size: int = stamp["preprocess"]["image_size"]
        self.preprocess_version: str = stamp["preprocess_version"]
        self.meta: dict[str, Any] = stamp["meta"]  # the heads' provenance (model card)
        self.calibration: dict[str, Any] = dict(self.meta.get("calibration") or {})
        self._pre = stamp["preprocess"]
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if INFERENCE_THREADS[0]:
            opts.intra_op_num_threads = INFERENCE_THREADS[0]
        self._session = ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])
        self._torch: Any = None

    # -- what the engine serves ------------------------------------------------------------
    def preprocess_np(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return _preprocess_as(self._pre, check_images(images))

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Preprocessed (N, 3, S, S) → (features (N, image_dim), embeddings (N, dim))."""
        feats, emb = self._session.run(None, {"pixels": x})
        return feats, emb

    def embed_images_and_features(
        self, images: Sequence[np.ndarray], batch_size: int = 16
    ) -> tuple[np.ndarray, np.ndarray]:
        imgs = check_images(images)
        if not imgs:
            return (
                np.zeros((0, self.dim), np.float32),
                np.zeros((0, self.image_dim), np.float32),
            )
        parts = [self.forward(self.preprocess_np(b)) for b in batched(imgs, batch_size)]
        return np.concatenate([p[1] for p in parts]), np.concatenate([p[0] for p in parts])

    def embed_images(self, images: Sequence[np.ndarray], batch_size: int = 16) -> np.ndarray:
        return self.embed_images_and_features(images, batch_size)[0]

    # -- everything else: the torch encoder ------------------------------------------------
    @property
    def torch_encoder(self) -> Any:
        with _LOCK:
            if self._torch is None:
                from medlens.models.registry import load_encoder

                self._torch = load_encoder(self.name, device=self.device)
            return self._torch

    def embed_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        return self.torch_encoder.embed_texts(texts, batch_size=batch_size)

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):
            raise AttributeError(attr)
        log.debug("ONNX engine %s: %r comes from the torch encoder", self.name, attr)
        return getattr(self.torch_encoder, attr)

    def __repr__(self) -> str:
        return f"OnnxLite(name={self.name!r}, fingerprint={self.fingerprint!r})"


def open_engine(name: str, device: str, cache_dir: Path) -> OnnxLite | None:
    """The ONNX engine for ``name`` if a current export is cached, else None (torch)."""
    if device != "cpu":
        return None
    graph, stamp_file = _paths(cache_dir, name)
    try:
        stamp = json.loads(stamp_file.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stamp, dict) or not _sources_current(stamp):
        return None
    try:
        model = graph.read_bytes()
    except OSError:
        return None
    if hashlib.sha256(model).hexdigest() != stamp.get("graph_sha256"):
        # Damaged or replaced since it was checked against torch: never run it.
        log.warning("cached ONNX graph for %s does not match its stamp; using torch", name)
        return None
    try:
        return OnnxLite(name, device, model, stamp)
    except ImportError:
        return None
    except Exception as exc:  # onnxruntime raises its own types for a damaged graph
        log.warning("cached ONNX graph for %s is unusable (%s); using torch", name, exc)
        return None


def export(enc: Any, name: str, cache_dir: Path) -> OnnxLite | None:
    """Export ``enc`` (a torch ``LiteEncoder``), check ONNX Runtime against torch on the
    same input, store graph and stamp atomically and return the engine; None (with a log
    line) when onnx/onnxruntime are missing or the check fails."""
    import torch

    try:
        import onnx  # noqa: F401  (the exporter needs it)
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    graph, stamp_file = _paths(cache_dir, name)
    graph.parent.mkdir(parents=True, exist_ok=True)
    pre = {
        "image_size": enc.image_size,
        "colour_constancy": bool(enc.colour_constancy),
        "mean": [float(v) for v in enc._norm[0].flatten()],
        "std": [float(v) for v in enc._norm[1].flatten()],
    }
    sources = [enc.heads_path, *enc.backbone_files()] if enc.heads_path else None
    if sources is None:
        return None
    y, x = np.mgrid[0:300, 0:260]
    probe = [
        np.stack([x % 256, y % 256, (x * y) % 256], axis=-1).astype(np.uint8),
        np.full((224, 224, 3), 128, np.uint8),
    ]
    from torch.nn import functional as F

    class Graph(torch.nn.Module):
        """Normalised pixels → (tower features, L2-normalised embedding): exactly
        ``LiteEncoder.image_features`` followed by ``embed_from_features``."""

        def __init__(self) -> None:
            super().__init__()
            self.enc = enc

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            feats = self.enc.tower_forward(x)
            return feats, F.normalize(self.enc.image_head(feats), dim=-1)

    net = Graph().eval()
    fd, tmp = tempfile.mkstemp(prefix=".lite.", suffix=".onnx", dir=graph.parent)
    os.close(fd)
    try:
        inp = _preprocess_as(pre, probe)
        with torch.inference_mode():
            want = [t.numpy() for t in net(torch.from_numpy(inp))]
        with warnings.catch_warnings():  # the TorchScript exporter's deprecation notices
            warnings.simplefilter("ignore")
            torch.onnx.export(
                net,
                (torch.from_numpy(inp),),
                tmp,
                dynamo=False,  # the torch.export path needs onnxscript; this one does not
                input_names=["pixels"],
                output_names=["features", "embedding"],
                dynamic_axes={k: {0: "n"} for k in ("pixels", "features", "embedding")},
                opset_version=OPSET,
            )
        stamp = {
            "fingerprint": enc.fingerprint,
            "dim": int(enc.dim),
            "image_dim": int(enc.image_dim),
            "logit_scale": float(enc.logit_scale),
            "backbone": enc.backbone,
            "preprocess_version": enc.preprocess_version,
            "meta": enc.meta,
            "preprocess": pre,
            "engine": _version(),
            "sources": [_file_stamp(Path(p)) for p in sources],
        }
        model = Path(tmp).read_bytes()
        stamp["graph_sha256"] = hashlib.sha256(model).hexdigest()
        engine = OnnxLite(name, enc.device_name, model, stamp)
        got = engine.forward(inp)
        err = max(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True))
        if not err <= TOLERANCE:
            log.warning("ONNX export of %s differs from torch by %.2g; using torch", name, err)
            return None
        stamp["max_abs_diff"] = err
        os.replace(tmp, graph)
        write_private(stamp_file, json.dumps(stamp, indent=1).encode())
    except (ModelUnavailable, OSError, RuntimeError, ValueError) as exc:
        log.warning("ONNX export of %s failed (%s); using torch", name, exc)
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    engine._torch = enc
    return engine


def _preprocess_as(pre: dict[str, Any], images: Sequence[np.ndarray]) -> np.ndarray:
    """``preprocess`` with a stamp's recorded parameters."""
    mean, std = (np.asarray(pre[k], np.float32) for k in ("mean", "std"))
    return preprocess(images, pre["image_size"], mean, std, pre["colour_constancy"])
