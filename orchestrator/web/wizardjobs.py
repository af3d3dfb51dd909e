"""The wizard's jobs: candidates trained on the painted map, their predictions brought in, retraining, export.

Every function here takes the client and the session and submits or reads jobs through the same
queue and ledger as the CLI; ``advance`` is one step of following them (the server calls it about
once a second), so a restarted wizard picks up where the ledger stands.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from dlorch.core.errors import BadInput, DlorchError, one_line
from dlorch.core.spec import JobStatus
from dlorch.orchestrator.web.wizardstate import Candidate, Export, Round, Session

CANDIDATES = 4
# A candidate's prediction goes ahead of the candidates still queued for training: its result is on screen
# as soon as a node is free, not after the whole zoo has trained.
PREDICT_PRIORITY = 10


def _labels_checked(session: Session, maps: list[np.ndarray]) -> None:
    """The engine's label checks on what a round trains on, as one line for the page."""
    from dlorch.core.engine.inputs import check_labels

    union = maps[0].copy()
    for m in maps[1:]:
        union = np.where(union == 0, m, union)
    try:
        check_labels(np.zeros(union.shape, np.uint8), union)
    except ValueError as e:
        raise BadInput(str(e)) from None


def train_candidates(client, session: Session, n: int = CANDIDATES, time_budget: float | None = None,
                     epochs: int | None = None) -> Round:
    """Round 1: one training job per model variant on the painted map, submitted side by side."""
    from dlorch.orchestrator.submit import candidate_specs

    with session.lock:
        if session.state.rounds:
            raise BadInput("candidates were trained already; pick one, correct it and retrain")
        painted = session.snapshot("painted")
        _labels_checked(session, [painted])
        labels = session.put_array("painted", painted)
        spec = {"kind": "train", "image": session.state.image, "labels": labels, "epochs": epochs,
                "time_budget": time_budget}
        specs = candidate_specs(spec, n)
        rnd = Round(n=1, started_at=time.time(), labelled_at_start=session.state.labelled(), labels=labels)
        for variant, s in specs.items():
            rnd.candidates[variant] = Candidate(variant=variant, train_job=client.submit(s))
        session.state.rounds.append(rnd)
        session.save()
        return rnd


def pick(session: Session, variant: str) -> None:
    """The user's choice among the candidates of the latest round."""
    with session.lock:
        rnd = _latest(session)
        cand = rnd.candidates.get(variant)
        if cand is None:
            raise BadInput(f"no candidate {variant[:40]!r} in round {rnd.n}; pick one of {', '.join(rnd.candidates)}")
        if cand.status != "ready":
            raise BadInput(f"candidate {variant} is {cand.status}; pick one whose prediction is shown")
        rnd.choice = variant
        session.save()


def chosen(session: Session) -> tuple[Round, Candidate]:
    """The model corrections are made on: the choice of the latest round that has one."""
    for rnd in reversed(session.state.rounds):
        if rnd.choice:
            return rnd, rnd.candidates[rnd.choice]
    raise BadInput("no model is chosen yet; train the candidates and pick one")


def retrain(client, session: Session, time_budget: float | None = None, epochs: int | None = None,
            accepted_weight: float = 0.5, from_scratch: bool = True) -> Round:
    """A new round on the painted map, plus the accepted one at its weight: the chosen model trained further
    and, with ``from_scratch``, its network trained anew beside it (a whole corrected slice can outweigh
    what the strokes taught; the round keeps whichever scores better on the held-out painted pixels)."""
    with session.lock:
        last = _latest(session)
        if any(c.status in ("training", "predicting") for c in last.candidates.values()):
            raise BadInput(f"round {last.n} is still running; wait for its prediction")
        _, model = chosen(session)
        network = model.network or model.variant
        painted, accepted = session.snapshot("painted"), session.snapshot("accepted")
        _labels_checked(session, [painted, accepted])
        labels = session.put_array("painted", painted)
        options: dict[str, Any] = {"variant": network}
        accepted_uri = None
        if accepted.any():
            accepted_uri = session.put_array("accepted", accepted)
            options |= {"accepted": accepted_uri, "accepted_weight": accepted_weight}
        spec = {"kind": "train", "image": session.state.image, "labels": labels, "epochs": epochs,
                "time_budget": time_budget, "name": f"wizard round {last.n + 1}"}
        rnd = Round(n=last.n + 1, started_at=time.time(), labelled_at_start=session.state.labelled(), labels=labels,
                    accepted=accepted_uri, init_from=model.model)
        warm = {**spec, "options": {**options, "init_from": model.model}}
        rnd.candidates[network] = Candidate(variant=network, network=network, train_job=client.submit(warm))
        if from_scratch:
            name = f"{network}-from-scratch"
            scratch = {**spec, "options": options, "name": f"wizard round {last.n + 1} from scratch"}
            rnd.candidates[name] = Candidate(variant=name, network=network, from_scratch=True,
                                             train_job=client.submit(scratch))
        session.state.rounds.append(rnd)
        session.save()
        return rnd


def kept_model(rnd: Round) -> Candidate | None:
    """The model a later round keeps once all of its trainings ended: the best held-out score, the one trained
    from the chosen weights on a tie (pure); None while one still runs or none succeeded."""
    if any(c.status in ("training", "predicting") for c in rnd.candidates.values()):
        return None
    ready = [c for c in rnd.candidates.values() if c.status == "ready"]
    if not ready:
        return None
    return max(ready, key=lambda c: (c.score if c.score is not None else -1.0, not c.from_scratch))


def export(client, session: Session, out_dir: Path) -> Export:
    """Write the chosen model and the label maps to ``out_dir``, and submit the whole volume's segmentation.

    ``advance`` copies the segmentation there when its job ends.
    """
    from dlorch.core.imageio import write_image

    with session.lock:
        _, model = chosen(session)
        out_dir.mkdir(parents=True, exist_ok=True)
        files = [str(client.fetch(model.model, out_dir / "model.ckpt"))]
        for name in ("painted", "accepted"):
            data = session.snapshot(name)
            for fmt in ("tif", "zarr"):
                files.append(str(write_image(data, out_dir / f"labels-{name}.{fmt}", fmt)))
        spec = {"kind": "predict", "image": session.state.image, "model": model.model, "output_format": "tif",
                "name": "wizard export"}
        session.state.export = Export(dir=str(out_dir), files=files, predict_job=client.submit(spec))
        session.save()
        return session.state.export


def advance(client, session: Session) -> bool:
    """One step of following the session's jobs; returns whether the record changed.

    Jobs are read and predictions brought in without the session's lock (a large prediction takes a
    while to copy, and strokes must not wait for it); only the record's save takes it. This thread
    alone changes candidates' progress; the page's requests change other fields.
    """
    changed = False
    for rnd in list(session.state.rounds):
        for name, cand in list(rnd.candidates.items()):
            if cand.status in ("training", "predicting"):
                before = cand.model_dump_json()
                _follow(client, session, rnd, name, cand)
                changed |= cand.model_dump_json() != before
        ready = [c for c in rnd.candidates.values() if c.status == "ready"]
        keep = kept_model(rnd) if rnd.n > 1 and not rnd.choice else None
        if keep is not None:
            with session.lock:
                rnd.choice = keep.variant  # a later round's choice is the wizard's, by held-out score
            changed = True
        if rnd.n == 1 and len(ready) >= 2 and not session.has("disagreement") and \
                all(c.status in ("ready", "failed") for c in rnd.candidates.values()):
            _disagreement(session, ready)
            changed = True
    export = session.state.export
    if export and export.status == "predicting":
        before = export.model_dump_json()
        _follow_export(client, session)
        changed |= export.model_dump_json() != before
    if changed:
        with session.lock:
            session.save()
    return changed


def _follow(client, session: Session, rnd: Round, name: str, cand: Candidate) -> None:
    job = client.ledger.get(cand.predict_job or cand.train_job)
    if cand.status == "training":
        cand.epoch, cand.epochs_total, cand.node = job.epochs_done, job.epochs_total, job.node
        score = job.metrics.get("best_val_iou", job.metrics.get("val_iou"))
        cand.score = round(float(score), 4) if score is not None else cand.score
    if not job.status.is_terminal():
        return
    if job.status is not JobStatus.SUCCEEDED:
        cand.status, cand.error = "failed", job.error or f"job {job.id} {job.status.value}"
        return
    if cand.status == "training":
        cand.model = job.model
        spec = {"kind": "predict", "image": session.state.image, "model": job.model, "output_format": "npy",
                "options": {"confidence": True}, "name": f"wizard round {rnd.n} {name}",
                "priority": PREDICT_PRIORITY}
        try:
            cand.predict_job, cand.status = client.submit(spec), "predicting"
        except DlorchError as e:
            cand.status, cand.error = "failed", one_line(e)
        return
    layer = f"pred-r{rnd.n}-{name}"
    session.write_layer(layer, _fetch_array(client, job.output))
    cand.layer = layer
    if job.confidence:  # uint8 per pixel, max softmax x 255
        cand.confidence = session.write_layer(f"conf-r{rnd.n}-{name}", _fetch_array(client, job.confidence))
    cand.status = "ready"


def _fetch_array(client, uri: str) -> np.ndarray:
    from dlorch.core.imageio import read_image

    with tempfile.TemporaryDirectory() as tmp:
        local = client.fetch(uri, Path(tmp) / Path(uri).name)
        return read_image(local)


def _disagreement(session: Session, ready: list[Candidate]) -> None:
    from dlorch.core.engine.suggest import disagreement

    segs = [session.snapshot(c.layer) for c in ready]
    session.write_layer("disagreement", np.round(disagreement(segs) * 255).astype(np.uint8))


def _follow_export(client, session: Session) -> None:
    exp = session.state.export
    job = client.ledger.get(exp.predict_job)
    if not job.status.is_terminal():
        return
    if job.status is not JobStatus.SUCCEEDED:
        exp.status, exp.error = "failed", job.error or f"job {job.id} {job.status.value}"
        return
    out = Path(exp.dir) / "segmentation.tif"
    exp.files.append(str(client.fetch(job.output, out)))
    exp.status = "done"


def suggestions(session: Session, k: int = 8) -> list[dict[str, Any]]:
    """Where to correct next: the tiles ``rank_tiles`` puts first, on the chosen model's confidence and the
    candidates' disagreement, skipping what is labelled already."""
    from dlorch.core.engine.suggest import rank_tiles

    _, model = chosen(session)
    dis = session.snapshot("disagreement").astype(np.float32) / 255 if session.has("disagreement") else None
    conf = session.snapshot(model.confidence) if model.confidence else None  # uint8, max softmax x 255
    if dis is None and conf is None:
        raise BadInput("no disagreement or confidence map yet to rank tiles by")
    if dis is None:
        dis = np.zeros(conf.shape, np.float32)
    labelled = (session.snapshot("painted") > 0) | (session.snapshot("accepted") > 0)
    _, height, width = session.state.shape
    tile = min(128, max(16, min(height, width) // 4))  # a small image still gets a handful of tiles
    return [{key: float(v) if key == "score" else int(v) for key, v in t.items()}
            for t in rank_tiles(dis, confidence=conf, tile=tile, labelled=labelled, k=k)]


def _latest(session: Session) -> Round:
    if not session.state.rounds:
        raise BadInput("no round yet; paint strokes of two classes and train the candidates")
    return session.state.rounds[-1]
