"""The wizard's session in the store: its record (classes, revision, rounds, choice) and its label maps as zarr.

A session lives under ``wizard/<session id>/`` in the store: ``state.json`` (the record), and zarr
arrays read and written a slice window at a time: ``image.zarr`` (the display copy, uint8),
``painted.zarr`` and ``accepted.zarr`` (class ids, 0 = none: what the user painted and what was
accepted from a prediction, kept apart for provenance), ``pred-<name>.zarr`` and
``conf-<name>.zarr`` (a candidate's segmentation and confidence) and ``disagreement.zarr``.
Closing the page or restarting the server loses nothing: every stroke is written before it is
acknowledged.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from dlorch.core.chunkfiles import chunk_files
from dlorch.core.errors import BadInput
from dlorch.core.store import DataStore
from dlorch.core.volumes import storage_options

ADVISED_PIXELS = 50_000  # painted pixels the engine is happy with (ISBI: ~50,000 strokes)
CHUNK = 256  # label and image arrays are chunked (1, 256, 256): a stroke rewrites a few small chunks
LABEL_MAPS = ("painted", "accepted")
LAYER_NAME = re.compile(r"(image|painted|accepted|disagreement|(pred|conf)-[a-z0-9-]{1,40})")
PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#ffe119", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
           "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#800000", "#aaffc3", "#808000"]


class LabelClass(BaseModel):
    """A class of the palette: its id in the label maps (1..255), name and colour."""

    id: int
    name: str
    color: str


class Candidate(BaseModel):
    """One model of a round: its training job, the prediction of its model, and how it stands."""

    variant: str  # its name in the round (the zoo variant in round 1)
    train_job: str
    network: str | None = None  # the zoo variant its network is (None: ``variant``); later rounds keep it
    from_scratch: bool = False  # a later round's model trained from random weights, not from the chosen one's
    predict_job: str | None = None
    status: str = "training"  # training, predicting, ready, failed
    score: float | None = None  # held-out stroke IoU of its training
    epoch: int = 0
    epochs_total: int | None = None
    node: str | None = None
    model: str | None = None
    error: str | None = None
    layer: str | None = None  # pred-<name> once its prediction is in the session
    confidence: str | None = None  # conf-<name>, where the prediction came with one


class Round(BaseModel):
    """A round of training: round 1 trains the candidate zoo; a later round trains the chosen model's network
    on the new labels from its weights and, beside it, from scratch, and keeps the one that scores better."""

    n: int
    started_at: float
    labelled_at_start: int  # painted + accepted pixels when it was submitted
    labels: str  # store URIs of the label maps the round trained on
    accepted: str | None = None
    init_from: str | None = None
    candidates: dict[str, Candidate] = Field(default_factory=dict)
    choice: str | None = None


class Export(BaseModel):
    """Where the export stands: the whole volume's prediction job, and the files written."""

    dir: str
    status: str = "predicting"  # predicting, done, failed
    predict_job: str | None = None
    files: list[str] = Field(default_factory=list)
    error: str | None = None


class WizardState(BaseModel):
    """The record of a session (``state.json``)."""

    session: str
    source: str  # the image as the user named it
    image: str  # its store URI, the training jobs' input
    shape: list[int]  # (Z, Y, X); a 2D image has Z = 1
    ndim: int
    classes: list[LabelClass]
    revision: int = 0  # of the label maps: every acknowledged stroke adds one
    counts: dict[str, list[int]] = Field(default_factory=dict)  # per map: pixels per class id (index = id)
    rounds: list[Round] = Field(default_factory=list)
    export: Export | None = None
    created_at: float
    updated_at: float

    def labelled(self) -> int:
        """Pixels labelled in either map (a pixel both painted and accepted counts twice: rare, and harmless)."""
        return sum(sum(c[1:]) for c in self.counts.values())

    def public(self) -> dict[str, Any]:
        """What the page is sent."""
        d = self.model_dump(mode="json")
        d["advised_pixels"] = ADVISED_PIXELS
        d["labelled"] = self.labelled()
        d["labelled_this_round"] = self.labelled() - (self.rounds[-1].labelled_at_start if self.rounds else 0)
        return d


def session_id_for(data: np.ndarray) -> str:
    """A session id from the image's content: reopening the same image resumes its session."""
    h = hashlib.sha256(str((data.shape, data.dtype.str)).encode())
    h.update(np.ascontiguousarray(data).tobytes())
    return "w-" + h.hexdigest()[:12]


def display_copy(image: np.ndarray) -> np.ndarray:
    """The image as uint8 for the page, stretched between its 0.5th and 99.5th percentiles."""
    if image.dtype == np.uint8:
        return image
    sample = image[:: max(1, image.shape[0] // 8)].astype(np.float32)
    lo, hi = np.percentile(sample, (0.5, 99.5))
    scale = 255.0 / max(float(hi - lo), 1e-12)
    out = np.empty(image.shape, np.uint8)
    for z in range(image.shape[0]):  # slice by slice: no float copy of a whole volume
        out[z] = np.clip((image[z].astype(np.float32) - lo) * scale, 0, 255).astype(np.uint8)
    return out


class Session:
    """A wizard session in a store: its record and its arrays. Thread-safe: one lock guards the record."""

    def __init__(self, store: DataStore, state: WizardState) -> None:
        self.store, self.state = store, state
        self.lock = threading.RLock()
        self._arrays: dict[str, Any] = {}

    # --- creating and opening -------------------------------------------------------------------

    @staticmethod
    def key(session: str, name: str = "") -> str:
        return f"wizard/{session}/{name}"

    @classmethod
    def open(cls, store: DataStore, session: str) -> "Session":
        """An existing session; ``BadInput`` naming the fix if there is none."""
        if not re.fullmatch(r"w-[0-9a-f]{12}", session):
            raise BadInput(f"invalid session id {session[:40]!r}; a session id reads like w-0123456789ab")
        try:
            raw = store.read_bytes(store.uri(cls.key(session, "state.json")))
        except FileNotFoundError:
            raise BadInput(f"no wizard session {session} in {store.url}; start one with `dlorch wizard IMAGE`") from None
        return cls(store, WizardState.model_validate_json(raw))

    @classmethod
    def create(cls, store: DataStore, image: np.ndarray, source: str, image_uri: str,
               labels: np.ndarray | None = None) -> "Session":
        """Open the session of this image, or start one (its display copy and empty label maps written first).

        ``labels`` (painted in napari or ilastik: 0 = unlabelled) become the painted map of a new session.
        """
        stack = image if image.ndim == 3 else image[None]
        sid = session_id_for(image)
        if store.exists(cls.key(sid, "state.json")):
            session = cls.open(store, sid)
            if labels is not None:
                session.load_labels(labels)
            return session
        now = time.time()
        classes = [LabelClass(id=i, name=n, color=PALETTE[i - 1]) for i, n in ((1, "foreground"), (2, "background"))]
        state = WizardState(session=sid, source=source, image=image_uri, shape=list(stack.shape), ndim=image.ndim,
                            classes=classes, counts={m: [int(np.prod(stack.shape)), 0, 0] for m in LABEL_MAPS}, created_at=now,
                            updated_at=now)
        session = cls(store, state)
        session._create_array("image", stack.shape, display_copy(stack))
        for name in LABEL_MAPS:
            session._create_array(name, stack.shape)
        if labels is not None:
            session.load_labels(labels)
        session.save()
        return session

    def load_labels(self, labels: np.ndarray) -> None:
        """Labels from another tool as the painted map (0 = unlabelled), checked against the image's grid."""
        lab = np.asarray(labels)
        shape = tuple(self.state.shape)
        if lab.shape not in (shape, shape[1:] if shape[0] == 1 else None):
            image = shape[1:] if self.state.ndim == 2 else shape
            raise BadInput(f"labels shape {lab.shape} differs from the image's {image}; load labels painted on "
                           "this image")
        if not (np.issubdtype(lab.dtype, np.integer) or lab.dtype == bool) or lab.size and (lab.min() < 0 or lab.max() > 255):
            raise BadInput(f"labels must be integers 0..255 (0 = unlabelled), not {lab.dtype} "
                           f"{lab.min() if lab.size else ''}..{lab.max() if lab.size else ''}")
        lab = lab.astype(np.uint8).reshape(shape)
        with self.lock:
            self.array("painted")[...] = lab
            self.state.counts["painted"] = _counts(lab)
            for cid in range(1, len(self.state.counts["painted"])):
                self._ensure_class(cid)
            self.state.revision += 1
            self.save()

    # --- arrays ---------------------------------------------------------------------------------

    def _url(self, name: str) -> str:
        return self.store.uri(self.key(self.state.session, f"{name}.zarr"))

    def _create_array(self, name: str, shape, data: np.ndarray | None = None):
        import zarr

        url = self._url(name)
        arr = zarr.create_array(url, shape=tuple(shape), chunks=(1, min(CHUNK, shape[1]), min(CHUNK, shape[2])),
                                dtype="uint8", fill_value=0, overwrite=True, storage_options=storage_options(url))
        files = self._arrays[name] = chunk_files(arr)
        if data is not None:
            for z in range(shape[0]):  # a slice at a time: whole chunks, written as files where local
                files[z:z + 1] = data[z:z + 1]
        return arr

    def array(self, name: str):
        """The zarr array of a layer, opened once."""
        import zarr

        if name not in self._arrays:
            url = self._url(name)
            try:
                array = zarr.open_array(url, mode="r+", storage_options=storage_options(url))
            except FileNotFoundError:
                raise BadInput(f"layer {name} does not exist yet in session {self.state.session}") from None
            self._arrays[name] = chunk_files(array)  # a local store: chunk files read and written directly
        return self._arrays[name]

    def has(self, name: str) -> bool:
        return name in self._arrays or self.store.exists(self.key(self.state.session, f"{name}.zarr"))

    def write_layer(self, name: str, data: np.ndarray) -> str:
        """Write a whole layer (a prediction, a confidence map, the disagreement), slice by slice; returns its name."""
        stack = data.reshape(self.state.shape)
        self._create_array(name, stack.shape, stack.astype(np.uint8))
        return name

    def window(self, name: str, z: int, y: int = 0, x: int = 0, h: int | None = None, w: int | None = None) -> np.ndarray:
        """One slice of a layer, or a window of it: never more than a slice is read."""
        if not LAYER_NAME.fullmatch(name):
            raise BadInput(f"unknown layer {name[:40]!r}")
        Z, Y, X = self.state.shape
        h, w = Y - y if h is None else h, X - x if w is None else w
        if not (0 <= z < Z and 0 <= y and 0 <= x and 0 < h and 0 < w and y + h <= Y and x + w <= X):
            raise BadInput(f"window z={z} y={y} x={x} h={h} w={w} lies outside the image {Z}x{Y}x{X}")
        return np.asarray(self.array(name)[z:z + 1, y:y + h, x:x + w])[0]

    # --- strokes --------------------------------------------------------------------------------

    def apply_patch(self, layer: str, rev: int, z: int, y: int, x: int, patch: np.ndarray) -> dict[str, Any]:
        """Write a stroke's bounding box (its new class ids) into a label map, as revision ``rev``.

        Revisions are applied in order: ``rev`` one above the stored revision is written; one at or
        below it was already applied (a resent stroke) and is acknowledged again without writing;
        one further ahead means a stroke went missing, and the page reloads the slice.
        """
        if layer not in LABEL_MAPS:
            raise BadInput(f"strokes go to the painted or accepted map, not {layer[:40]!r}")
        with self.lock:
            if rev <= self.state.revision:
                return {"rev": self.state.revision, "duplicate": True, "counts": self.state.counts}
            if rev != self.state.revision + 1:
                raise StrokeGap(f"stroke revision {rev} follows {self.state.revision}; reload the slice")
            h, w = patch.shape
            old = self.window(layer, z, y, x, h, w)
            if any(c > len(self.state.classes) for c in np.unique(patch)):
                raise BadInput("a stroke names a class that is not in the palette; add the class first")
            self._write_window(layer, z, y, x, patch)
            self._add_counts(layer, old, -1)
            self._add_counts(layer, patch, +1)
            self.state.revision = rev
            self.save()
            return {"rev": rev, "counts": self.state.counts}

    def _write_window(self, layer: str, z: int, y: int, x: int, patch: np.ndarray) -> None:
        """Write a window as the whole chunks around it (read, changed, written back): a chunk file is
        replaced in one rename, and a whole-chunk write skips zarr's slower partial path."""
        _, height, width = self.state.shape
        h, w = patch.shape
        y0, x0 = y - y % CHUNK, x - x % CHUNK
        y1, x1 = min(height, -(-(y + h) // CHUNK) * CHUNK), min(width, -(-(x + w) // CHUNK) * CHUNK)
        arr = self.array(layer)
        region = np.array(arr[z:z + 1, y0:y1, x0:x1])
        region[0, y - y0:y - y0 + h, x - x0:x - x0 + w] = patch
        arr[z:z + 1, y0:y1, x0:x1] = region

    def _add_counts(self, layer: str, values: np.ndarray, sign: int) -> None:
        counts = self.state.counts.setdefault(layer, [0])
        found = np.bincount(values.reshape(-1), minlength=len(counts))
        counts.extend([0] * (len(found) - len(counts)))
        for cid, n in enumerate(found):
            counts[cid] += sign * int(n)

    def _ensure_class(self, cid: int) -> None:
        known = {c.id for c in self.state.classes}
        for i in range(1, cid + 1):
            if i not in known:
                self.state.classes.append(LabelClass(id=i, name=f"class {i}", color=PALETTE[(i - 1) % len(PALETTE)]))

    def set_classes(self, names: list[str]) -> None:
        """Rename the palette's classes and add new ones (ids 1..len(names)); a class in use is never removed."""
        used = max([i for c in self.state.counts.values() for i, n in enumerate(c) if n and i] or [0])
        if len(names) < used or len(names) > 255:
            raise BadInput(f"the palette needs {used} to 255 classes: class {used} is painted")
        clean = [" ".join(str(n).split())[:40] or f"class {i + 1}" for i, n in enumerate(names)]
        with self.lock:
            self.state.classes = [LabelClass(id=i + 1, name=n, color=PALETTE[i % len(PALETTE)])
                                  for i, n in enumerate(clean)]
            self.save()

    def accept_box(self, source: str, z: int, y: int, x: int, h: int, w: int, confidence: str | None,
                   threshold: float) -> int:
        """Copy a prediction's classes inside a box into the accepted map, where nothing is painted and the
        confidence (0..1) is at least ``threshold``; returns the pixels accepted. Counts as one revision."""
        with self.lock:
            pred = self.window(source, z, y, x, h, w)
            painted = self.window("painted", z, y, x, h, w)
            take = (painted == 0) & (pred > 0)
            if confidence is not None and threshold > 0:
                take &= self.window(confidence, z, y, x, h, w) >= round(threshold * 255)
            new = np.where(take, pred, self.window("accepted", z, y, x, h, w)).astype(np.uint8)
            taken = int(take.sum())
            self.apply_patch("accepted", self.state.revision + 1, z, y, x, new)
            return taken

    def snapshot(self, name: str) -> np.ndarray:
        """A whole label map (for a training job's input), shaped as the image (2D stays 2D)."""
        data = np.asarray(self.array(name)[...])
        return data[0] if self.state.ndim == 2 else data

    def save(self) -> None:
        """Write the record (atomically: readers see the old one or the new one)."""
        self.state.updated_at = time.time()
        self.store.write_bytes(self.key(self.state.session, "state.json"),
                               self.state.model_dump_json().encode())

    def put_array(self, name: str, data: np.ndarray) -> str:
        """A snapshot as a content-addressed ``.npy`` in the store (a job's input); returns its URI."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{name}.npy"
            np.save(path, data, allow_pickle=False)
            return self.store.put_blob(path)


class StrokeGap(BadInput):
    """A stroke arrived out of order: one before it is missing."""


def _counts(labels: np.ndarray) -> list[int]:
    return [int(n) for n in np.bincount(labels.reshape(-1), minlength=3)]
