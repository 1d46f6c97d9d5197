"""``medlens index --ray``: the case-library ingest with decoding and the model on Ray.

``retrieval.library.ingest`` keeps every decision it makes in one process (content
hashes, what is already indexed, point ids, payloads, the store, the registry); only its
``embed_misses`` step runs here: Ray Data reads the files, an actor pool (the encoder
loaded once per worker) decodes them, makes thumbnails and embeds the images whose
vector the embedding cache does not have. Results stream back to this process, which
writes the cache, the thumbnails and the points (the same store the single-process path
writes: embedded shards, or the Qdrant server when MEDLENS_QDRANT_URL is set).

What leaves a worker: the content hash, the vector, the thumbnail's JPEG bytes and the
payload-safe StudyContext fields (``library.safe_context``): never identifiers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from medlens.config import Settings
from medlens.distributed.runtime import RayOptions, actor_batches, preflight, ray_runtime
from medlens.errors import ClusterError, ConfigError, MedLensError
from medlens.retrieval.library import (
    DEFAULT_LIBRARY,
    Emit,
    IngestReport,
    Item,
    ingest,
    safe_context,
    store_thumbnail,
    thumbnail_jpeg,
    thumbnail_path,
)

FORWARD_BATCH = 16  # images per encoder call, as in the single-process ingest


class EmbedWorker:
    """A Ray actor: the encoder, loaded once; decodes file bytes, makes the thumbnail and
    embeds the images whose vector is not in ``known`` (content hashes)."""

    def __init__(self, model: str, device: str, settings: Settings, known: frozenset[str]):
        from medlens.models import load_encoder

        self.encoder = load_encoder(model, device=device)
        self.settings, self.known = settings, known

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from medlens.io import load_image

        s = self.settings
        n = len(batch["path"])
        hashes, errors, thumbs, contexts = [""] * n, [""] * n, [b""] * n, ["{}"] * n
        todo: list[tuple[int, np.ndarray]] = []
        for i, (path, data) in enumerate(zip(batch["path"], batch["bytes"], strict=True)):
            try:
                img = load_image(
                    bytes(data),
                    filename=Path(str(path)).name,
                    max_bytes=s.max_bytes,
                    max_pixels=s.max_pixels,
                    max_decode_bytes=s.max_decode_bytes,
                )
            except MedLensError as exc:
                errors[i] = f"{type(exc).__name__}: {exc}"
                continue
            hashes[i], thumbs[i] = img.content_hash, thumbnail_jpeg(img.pixels)
            contexts[i] = json.dumps(safe_context(img.context))
            if img.content_hash not in self.known:
                todo.append((i, img.pixels))
        vectors = np.zeros((n, self.encoder.dim), np.float32)
        has_vector = np.zeros(n, bool)
        if todo:
            emb = self.encoder.embed_images([p for _, p in todo], batch_size=FORWARD_BATCH)
            for (i, _), v in zip(todo, np.asarray(emb, np.float32), strict=True):
                vectors[i], has_vector[i] = v, True
        return {
            "path": np.asarray(batch["path"], dtype=object),
            "content_hash": np.asarray(hashes, dtype=object),
            "error": np.asarray(errors, dtype=object),
            "thumbnail": np.asarray(thumbs, dtype=object),
            "context": np.asarray(contexts, dtype=object),
            "vector": vectors,
            "has_vector": has_vector,
            "fingerprint": np.asarray([self.encoder.fingerprint] * n, dtype=object),
        }


class RayEmbedder:
    """``ingest``'s ``embed_misses`` step on Ray (``library.EmbedMisses``). Ray starts
    only when some record needs decoding: a re-run with everything indexed never waits
    for it."""

    def __init__(self, model: str, settings: Settings, options: RayOptions):
        self.model, self.settings, self.options = model, settings, options

    def __call__(
        self,
        manifest: Any,
        encoder: Any,
        cache: Any,
        items: list[Item],
        cached: dict[str, np.ndarray],
        emit: Emit,
        rep: IngestReport,
        batch_size: int,
        workers: int,
    ) -> None:
        from medlens import embeddings
        from medlens.io import load_image

        if any(r.path is None for r, _, _ in items):
            raise ConfigError(
                f"{manifest.name}: --ray indexes image files; array-backed datasets "
                "(MedMNIST .npz) are one file on this machine: index them without --ray"
            )
        by_path: dict[str, list[Item]] = {}
        for it in items:
            by_path.setdefault(str(Path(it[0].path).resolve()), []).append(it)
        send = []
        for path, its in by_path.items():
            if Path(path).stat().st_size <= self.settings.max_bytes:
                send.append(path)
                continue
            try:  # too large to ship: refused here, by its size, with the usual message
                load_image(path, max_bytes=self.settings.max_bytes)
            except MedLensError as exc:
                rep.failed += [f"{r.id}: {type(exc).__name__}: {exc}" for r, _, _ in its]
            else:  # it shrank meanwhile
                send.append(path)
        if not send:
            return
        space = embeddings.image_space(encoder)
        known = frozenset(h for _, h, _ in items if h in cached)
        opts = self.options
        with ray_runtime(opts) as ray:
            kwargs = {
                "model": self.model,
                "device": opts.device or self.settings.device,
                "settings": self.settings,
                "known": known,
            }
            for out in actor_batches(ray, send, EmbedWorker, kwargs, opts):
                self._collect(out, by_path, encoder, cache, space, cached, emit, rep)

    def _collect(self, out, by_path, encoder, cache, space, cached, emit, rep) -> None:
        """One batch of worker results: cache and thumbnails written, points emitted."""
        batch: list[Item] = []
        contexts: dict[str, dict] = {}
        new: list[tuple[str, np.ndarray]] = []
        for j, path in enumerate(out["path"]):
            its = by_path[str(path)]
            if out["error"][j]:
                rep.failed += [f"{r.id}: {out['error'][j]}" for r, _, _ in its]
                continue
            if out["fingerprint"][j] != encoder.fingerprint:
                raise ClusterError(
                    f"a Ray worker runs model {self.model} as {out['fingerprint'][j]}, this "
                    f"process as {encoder.fingerprint}: install the same MedLens and weights "
                    "on every node"
                )
            h = str(out["content_hash"][j])
            if h != its[0][1]:
                rep.failed += [f"{r.id}: the file changed while indexing" for r, _, _ in its]
                continue
            store_thumbnail(bytes(out["thumbnail"][j]), thumbnail_path(h))
            if out["has_vector"][j]:
                new.append((h, out["vector"][j]))
                cached[h] = np.asarray(out["vector"][j], np.float32)
                rep.image_forward += 1
            else:
                rep.image_cache_hits += 1
            contexts[h] = json.loads(out["context"][j])
            batch += its
        if new:
            cache.put_many(new, space)
        emit(batch, cached, contexts)


def ray_ingest(
    manifest: Any,
    model: str,
    library: str = DEFAULT_LIBRARY,
    *,
    settings: Settings,
    options: RayOptions,
    **kwargs: Any,
) -> IngestReport:
    """``library.ingest`` of ``manifest`` with decoding and embedding on Ray workers that
    load ``model`` themselves (``kwargs``: ``source``, ``refresh``, ``advance``,
    ``named_ids``, ``store``, ``cache``). Same point ids, payloads and resume."""
    from medlens.models import load_encoder

    preflight(options)
    encoder = load_encoder(model, device=settings.device)  # fingerprint, texts, the check
    return ingest(
        manifest,
        encoder,
        library,
        batch_size=options.batch_size,
        embed_misses=RayEmbedder(model, settings, options),
        **kwargs,
    )
