"""torchxrayvision-format DenseNet121 chest X-ray classifiers (``txv:<weights file>``).

This is a supervised multi-label classifier, not an image–text encoder: it has no text
tower and no embedding space shared with prompts, so it does not pretend to implement
``Encoder``. It implements ``Classifier``: ``predict(images)`` gives one sigmoid
probability per output, ``pathologies`` names the outputs and ``findings`` maps them to
the chest_xray pack's finding ids through the pack's ``txv`` label vocabulary.

Weights: the published torchxrayvision DenseNet121 state-dict layout (``features.*``
with a 1-channel ``conv0``, ``classifier`` with 18 outputs), loaded from a local file
only (never downloaded), with ``torch.load(weights_only=True)`` so a weight file cannot
run code. The published ``.pt`` files are pickled modules and their ``op_threshs`` live
in torchxrayvision's source, so convert once where torchxrayvision is installed::

    m = xrv.models.DenseNet(weights="densenet121-res224-all")
    torch.save({"state_dict": m.state_dict(), "op_threshs": m.op_threshs,
                "pathologies": m.pathologies}, "txv-all.pt")

``op_threshs`` are operating points (the score at which a finding is called, chosen by
torchxrayvision on validation data), not probabilities: they are exposed as
``operating_points`` / ``calibration`` (a model card's per-finding thresholds); the
probabilities themselves are plain sigmoids, never torchxrayvision's op-normalised output.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from medlens.errors import ModelUnavailable
from medlens.models._state import state_fingerprint
from medlens.models._util import batched, check_images, file_sha256
from medlens.models.card import Calibration

DOMAIN = "chest_xray"
VOCAB = "txv"
SIZE = 224
# torchxrayvision's default output order (``xrv.datasets.default_pathologies``), used
# when the weight file does not name its outputs; part of the published format.
DEFAULT_PATHOLOGIES = (
    "Atelectasis",
    "Consolidation",
    "Infiltration",
    "Pneumothorax",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Effusion",
    "Pneumonia",
    "Pleural_Thickening",
    "Cardiomegaly",
    "Nodule",
    "Mass",
    "Hernia",
    "Lung Lesion",
    "Fracture",
    "Lung Opacity",
    "Enlarged Cardiomediastinum",
)
# Old torchvision-era checkpoints name dense-layer modules "norm.1" instead of "norm1".
_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)
_CONVERT_HINT = (
    "expected a torchxrayvision DenseNet121 state dict, or a dict with 'state_dict' "
    "(+ optional 'op_threshs', 'pathologies'); convert a published .pt with "
    'torch.save({"state_dict": m.state_dict(), "op_threshs": m.op_threshs, '
    '"pathologies": m.pathologies}, path) where m = xrv.models.DenseNet(weights=...)'
)


@runtime_checkable
class Classifier(Protocol):
    """A supervised image classifier for one domain (the pipeline scores findings from
    its probabilities directly; no prompts, no embeddings)."""

    name: str
    domain: str
    fingerprint: str
    pathologies: tuple[str, ...]  # output names; "" = an output the weights never trained
    findings: Mapping[str, int]  # finding id -> the output column that scores it

    def predict(self, images: Sequence[np.ndarray], batch_size: int = 16) -> np.ndarray:
        """uint8 RGB (H, W, 3) images -> float32 (N, len(pathologies)) probabilities."""
        ...


def build_densenet121(n_outputs: int = len(DEFAULT_PATHOLOGIES)) -> torch.nn.Module:
    """torchxrayvision's DenseNet121: torchvision's network with a 1-channel stem (the
    module names, and so the state-dict keys, are the same)."""
    from torchvision.models import densenet121

    model = densenet121(weights=None, num_classes=n_outputs)
    model.features.conv0 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def preprocess(images: Sequence[np.ndarray]) -> torch.Tensor:
    """torchxrayvision's input: grey (channel mean), centre square crop, 224x224,
    scaled to [-1024, 1024] -> float32 (N, 1, 224, 224)."""
    out = []
    for img in check_images(images):
        grey = torch.from_numpy(img.astype(np.float32)).mean(dim=2)  # a copy: writable
        h, w = grey.shape
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        crop = grey[top : top + s, left : left + s][None, None]
        resized = torch.nn.functional.interpolate(
            crop, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True
        )
        out.append(resized[0] / 255.0 * 2048.0 - 1024.0)
    return torch.stack(out)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], list[float] | None, list[str] | None]:
    try:
        raw: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, or a pickled module (not weights-only)
        raise ModelUnavailable(
            f"txv: cannot read {path} as weights ({exc}); {_CONVERT_HINT}"
        ) from exc
    if not isinstance(raw, dict):
        raise ModelUnavailable(f"txv: {path} holds a {type(raw).__name__}; {_CONVERT_HINT}")
    state = raw.get("state_dict", raw.get("model_state_dict", raw))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelUnavailable(f"txv: {path} has no tensor state dict; {_CONVERT_HINT}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    op = raw.get("op_threshs", state.pop("op_threshs", None))
    ops = None if op is None else [float(x) for x in torch.as_tensor(op).flatten().tolist()]
    names = raw.get("pathologies")
    return (
        {_LEGACY_KEY.sub(r"\1\2", k): v for k, v in state.items()},
        ops,
        None if names is None else [str(n) for n in names],
    )


class TxvClassifier:
    """A torchxrayvision DenseNet121 on a local weight file (see the module docstring)."""

    domain = DOMAIN

    def __init__(self, path: Path | str, *, device: str = "cpu", name: str | None = None):
        path = Path(path).expanduser()
        if not path.is_file():
            raise ModelUnavailable(
                f"txv: no weight file at {path}; give the path of a local torchxrayvision "
                "DenseNet121 state dict (MedLens never downloads these weights)"
            )
        state, ops, names = _read(path)
        weight = state.get("classifier.weight")
        if weight is None or weight.ndim != 2:
            raise ModelUnavailable(f"txv: {path} has no classifier.weight; {_CONVERT_HINT}")
        n_out = int(weight.shape[0])
        names = names if names is not None else list(DEFAULT_PATHOLOGIES[:n_out])
        if len(names) != n_out or (ops is not None and len(ops) != n_out):
            raise ModelUnavailable(
                f"txv: {path} has {n_out} outputs but {len(names)} pathology names and "
                f"{'no' if ops is None else len(ops)} op_threshs"
            )
        model = build_densenet121(n_out)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelUnavailable(
                f"txv: {path} does not fit DenseNet121 ({str(exc).splitlines()[0]}); "
                f"{_CONVERT_HINT}"
            ) from exc
        self.model = model.eval().to(device)
        self.device = device
        self.path = path
        self.name = name or f"txv:{path}"
        self.pathologies = tuple(names)
        self.op_threshs = tuple(ops) if ops is not None else None
        self.findings = _finding_columns(self.pathologies, self.op_threshs)
        self.fingerprint = state_fingerprint(
            self.model,
            extra=f"txv|{file_sha256(path)}|{SIZE}|{names}|{ops}",
        )

    @property
    def operating_points(self) -> dict[str, float]:
        """finding id -> torchxrayvision's op_thresh of the output that scores it (none
        when the file carries no op_threshs)."""
        if self.op_threshs is None:
            return {}
        return {f: self.op_threshs[i] for f, i in self.findings.items()}

    @property
    def calibration(self) -> Calibration:
        """The operating points as a model card's per-finding thresholds (no temperature
        or offsets: the sigmoids are used as trained)."""
        if not self.operating_points:
            return Calibration()
        return Calibration(
            thresholds={DOMAIN: self.operating_points},
            extra={"thresholds_source": "torchxrayvision op_threshs"},
        )

    @torch.inference_mode()
    def predict(self, images: Sequence[np.ndarray], batch_size: int = 16) -> np.ndarray:
        outs = [
            torch.sigmoid(self.model(preprocess(chunk).to(self.device))).float().cpu().numpy()
            for chunk in batched(list(images), batch_size)
        ]
        if not outs:
            return np.zeros((0, len(self.pathologies)), np.float32)
        return np.concatenate(outs).astype(np.float32)

    def finding_probabilities(self, images: Sequence[np.ndarray]) -> list[dict[str, float]]:
        """Per image, finding id -> probability of the output that scores it."""
        probs = self.predict(images)
        return [{f: float(row[i]) for f, i in self.findings.items()} for row in probs]


def _finding_columns(
    pathologies: Sequence[str], op_threshs: Sequence[float] | None
) -> dict[str, int]:
    """finding id -> output column, through the chest pack's ``txv`` vocabulary. Outputs
    the weights never trained ("" or a NaN op_thresh) are skipped; where two outputs map
    to one finding, the one listed first in the pack scores it."""
    from medlens.knowledge import load_domain

    pack = load_domain(DOMAIN)
    trained = {
        p.casefold(): i
        for i, p in enumerate(pathologies)
        if p and (op_threshs is None or not math.isnan(op_threshs[i]))
    }
    out: dict[str, int] = {}
    for p in pathologies:
        if not p or p.casefold() not in trained or not pack.knows_label(VOCAB, p):
            continue
        fid = pack.map_label(VOCAB, p)
        if fid is None or fid in out:
            continue
        listed = pack.finding(fid).labels.get(VOCAB, ())
        out[fid] = next(trained[x.casefold()] for x in listed if x.casefold() in trained)
    return {f: out[f] for f in pack.finding_ids if f in out}
