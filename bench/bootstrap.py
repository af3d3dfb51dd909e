"""Bootstrapping benchmark: a simulated user corrects ISBI 2012 round by round, as the wizard lets one do.

Round 1 trains candidate models (the zoo's variants, side by side, as the wizard does) on the
~50,000 painted stroke pixels of slices 0-4; the user keeps the candidate with the best held-out
stroke score. Round 2 shows the user that model's prediction of slice 0: the pixels it got right
are accepted, the rest are painted from the dense labels (a whole slice corrected), and on the strokes,
the corrections and the accepted pixels two models train side by side, as the wizard's retraining does:
one from the chosen model's weights, one of its network from scratch; the better on held-back painted
pixels is kept (both are scored for the report). Round 3 does the same on slice 1 from round 2's model.
Every round is scored on slices 5-29, which no round labels: mean IoU against the dense labels, and the
seconds from submission to the kept model's prediction.

Everything goes through the client and a local orchestrator with agents, the way the wizard
submits its jobs (``orchestrator/submit.py``): nothing calls the engine directly.

    python bench/bootstrap.py [--candidates 4] [--round1-budget 300] [--budget 300] [--retrain both]
                              [--keep DIR | --round1 DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import platform
import sys
import tempfile
import time

import numpy as np

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "isbi2012-em"
EVAL = slice(5, 30)


def scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Mean IoU and per-class IoU on the scored slices."""
    from dlorch.core.metrics import segmentation_scores

    s = segmentation_scores(pred[EVAL], truth[EVAL], classes=[1, 2])
    return {"mean_iou": s["mean_iou"], "iou_membrane": s["iou_class_1"], "iou_cell": s["iou_class_2"]}


def wait_all(c, ids: list[str]) -> list:
    """The jobs once every one has ended; a failure is this benchmark's end."""
    finals = [c.wait(i, poll_s=2.0) for i in ids]
    for job in finals:
        if job.status.value != "succeeded":
            raise SystemExit(f"job {job.id} {job.status.value}: {job.error}")
    return finals


def predict(c, model: str, image: str, tmp: pathlib.Path, name: str, tta: bool | None) -> tuple[np.ndarray, float]:
    """The model's segmentation of the whole stack (a predict job) and the job's seconds."""
    from dlorch.orchestrator import submit

    t0 = time.perf_counter()
    spec = submit.prediction_spec(c, model, image, str(tmp / f"{name}.npy"), "npy", 0, tta=tta)
    job = wait_all(c, [c.submit(spec)])[0]
    out = c.fetch(job.output, tmp / f"{name}.npy")
    return np.load(out), time.perf_counter() - t0


def curve_line(job) -> str:
    """The held-out stroke IoU by epoch, as the job recorded it."""
    points = getattr(job, "curve", None) or []
    return " ".join(f"{int(p['epoch'])}:{p['val_iou']:.3f}" for p in points if "val_iou" in p)


def corrected(labels: dict[str, np.ndarray], seg: np.ndarray, truth: np.ndarray, z: int) -> dict[str, np.ndarray]:
    """A user's round on slice ``z``: the prediction accepted where right, the rest painted from the dense labels."""
    painted, accepted = labels["painted"].copy(), labels["accepted"].copy()
    right = seg[z] == truth[z]
    accepted[z] = np.where(right & (painted[z] == 0), seg[z], 0)
    painted[z] = np.where(right, painted[z], truth[z])  # strokes stay; every wrong pixel is painted right
    return {"painted": painted, "accepted": accepted}


def retrain_specs(c, model: str, variant: str, painted: str, accepted: str, args) -> dict[str, dict]:
    """A later round's trainings on the same labels: from the chosen model's weights, and from scratch."""
    from dlorch.orchestrator import submit

    specs = {}
    if args.retrain in ("both", "fine-tune"):
        specs["fine-tune"] = submit.segmentation_spec(c, "train", args.image, painted, None, args.budget, 0,
                                                      init_from=model, accepted=accepted,
                                                      accepted_weight=args.accepted_weight)
    if args.retrain in ("both", "scratch"):
        spec = submit.segmentation_spec(c, "train", args.image, painted, None, args.budget, 0, accepted=accepted,
                                        accepted_weight=args.accepted_weight)
        specs["from scratch"] = {**spec, "options": {**spec.get("options", {}), "variant": variant}}
    return specs


def round_one(c, args, strokes: np.ndarray, truth: np.ndarray, tmp: pathlib.Path) -> tuple[dict, np.ndarray, str]:
    """Candidates side by side, the best held-out stroke score kept: the round's record, its segmentation and model."""
    from dlorch.orchestrator import submit
    from dlorch.orchestrator.client import local_service

    t0 = time.perf_counter()
    np.save(tmp / "strokes.npy", strokes)
    with local_service(c, agents=args.candidates):
        base = submit.segmentation_spec(c, "train", args.image, str(tmp / "strokes.npy"), None, args.round1_budget, 0)
        specs = submit.candidate_specs(base, args.candidates)
        ids = {c.submit(s): v for v, s in specs.items()}
        finals = wait_all(c, list(ids))
        best = submit.best_candidate(finals)
        seg, _ = predict(c, best.id, args.image, tmp, "round1", args.tta)
    candidates = [{"variant": ids[j.id], "held_out_iou": j.metrics.get("best_val_iou"),
                   "epochs": j.epochs_done, "steps_per_epoch": (j.plan or {}).get("steps_per_epoch"),
                   "curve": curve_line(j)} for j in finals]
    record = {"round": 1, **scores(seg, truth), "seconds": time.perf_counter() - t0,
              "chosen": ids[best.id], "held_out_iou": best.metrics.get("best_val_iou"),
              "labelled_pixels": int((strokes > 0).sum()), "candidates": candidates, "curve": curve_line(best)}
    if args.keep:  # round 1 kept, so later rounds can be measured again without it (--round1)
        args.keep.mkdir(parents=True, exist_ok=True)
        c.fetch(best.model, args.keep / "model.ckpt")
        np.save(args.keep / "segmentation.npy", seg)
        (args.keep / "round1.json").write_text(json.dumps(record, indent=2))
    return record, seg, best.model


def run(args: argparse.Namespace) -> dict:
    from dlorch.core.settings import Settings
    from dlorch.orchestrator import submit
    from dlorch.orchestrator.client import Client, local_service

    train = np.load(args.data / "isbi2012_train.npz")
    truth = train["labels"]
    strokes = np.load(args.data / "isbi2012_sparse_strokes.npz")["labels"].astype(np.uint8)
    args.image = f"{args.data / 'isbi2012_train.npz'}:image"
    rounds: list[dict] = []
    load_at_start = os.getloadavg()[0]  # a shared machine's other work: the budgets are wall-clock seconds
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = pathlib.Path(tmpdir)
        os.environ["DLORCH_HOME"] = str(tmp / "home")  # a deployment of its own: no job of anyone else's
        for var in ("DLORCH_STORE", "DLORCH_QUEUE", "DLORCH_SECRET"):
            os.environ.pop(var, None)
        c = Client(Settings())
        c.check_queue()
        if args.round1:
            first = json.loads((args.round1 / "round1.json").read_text())
            seg, model = np.load(args.round1 / "segmentation.npy"), str(args.round1 / "model.ckpt")
            rounds.append({**first, "reused_from": str(args.round1)})
        else:
            first, seg, model = round_one(c, args, strokes, truth, tmp)
            rounds.append(first)
        report(rounds[-1])
        variant = first["chosen"]
        labels = {"painted": strokes, "accepted": np.zeros_like(strokes)}
        with local_service(c, agents=2 if args.retrain == "both" else 1):
            for n, z in ((2, 0), (3, 1))[:args.rounds - 1]:
                t0 = time.perf_counter()
                labels = corrected(labels, seg, truth, z)
                np.save(tmp / f"painted{n}.npy", labels["painted"])
                np.save(tmp / f"accepted{n}.npy", labels["accepted"])
                specs = retrain_specs(c, model, variant, str(tmp / f"painted{n}.npy"), str(tmp / f"accepted{n}.npy"),
                                      args)
                ids = {c.submit(s): how for how, s in specs.items()}
                finals = wait_all(c, list(ids))
                picked = submit.best_candidate(finals)  # by held-out painted pixels, never by slices 5-29
                trained = time.perf_counter() - t0
                alternatives, segs = [], {}
                for job in finals:  # every alternative scored, for the report only
                    segs[job.id], pred_s = predict(c, job.id, args.image, tmp, f"round{n}-{ids[job.id]}", args.tta)
                    alternatives.append({"start": ids[job.id], **scores(segs[job.id], truth),
                                         "held_out_iou": job.metrics.get("best_val_iou"), "epochs": job.epochs_done,
                                         "start_held_out_iou": job.metrics.get("start_val_iou"),
                                         "stopped_by": job.metrics.get("stopped_by"),
                                         "steps_per_epoch": (job.plan or {}).get("steps_per_epoch"),
                                         "curve": curve_line(job)})
                    if job.id == picked.id:
                        trained += pred_s  # the user waits for the chosen model's prediction, not the others'
                seg = segs[picked.id]
                rounds.append({"round": n, **scores(seg, truth), "seconds": trained, "picked": ids[picked.id],
                               "held_out_iou": picked.metrics.get("best_val_iou"), "epochs": picked.epochs_done,
                               "painted_pixels": int((labels["painted"] > 0).sum()),
                               "accepted_pixels": int((labels["accepted"] > 0).sum()),
                               "corrected_slice": z, "curve": curve_line(picked), "alternatives": alternatives})
                report(rounds[-1])
                model = picked.id
    return {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg()[0],
            "settings": {"candidates": args.candidates, "round1_budget_s": args.round1_budget,
                         "budget_s": args.budget, "accepted_weight": args.accepted_weight, "tta": args.tta,
                         "retrain": args.retrain},
            "rounds": rounds}


def report(r: dict) -> None:
    print(f"round {r['round']}: mean IoU {r['mean_iou']:.4f} (membrane {r['iou_membrane']:.3f}, cell "
          f"{r['iou_cell']:.3f}), {r['seconds']:.0f} s; held-out strokes {r.get('held_out_iou') or 0:.3f}", flush=True)
    if r.get("curve"):
        print(f"  held-out IoU by epoch: {r['curve']}", flush=True)
    for a in r.get("alternatives", []):
        start = f" (its start {a['start_held_out_iou']:.3f})" if a.get("start_held_out_iou") is not None else ""
        print(f"  {a['start']:<12} mean IoU {a['mean_iou']:.4f}, held-out {a['held_out_iou'] or 0:.3f}{start}, "
              f"{a['epochs']} epochs of {a['steps_per_epoch']} steps; held-out IoU by epoch: {a['curve']}", flush=True)


def table(result: dict) -> None:
    print(f"\nISBI 2012, scored on slices 5-29 (no round labels them); load average {result['load_average_at_start']:.1f}"
          f" at the start, {result['load_average_at_end']:.1f} at the end, on {result['cpus']} CPUs")
    print(f"{'round':>5}  {'labels':<44}  {'mean IoU':>8}  {'membrane':>8}  {'cell':>6}  {'seconds':>7}")
    for r in result["rounds"]:
        if r["round"] == 1:
            what = f"strokes, {len(r['candidates'])} candidates, kept {r['chosen']}"
        else:
            what = f"+ slice {r['corrected_slice']} corrected, {r['picked']} picked"
        print(f"{r['round']:>5}  {what:<44}  {r['mean_iou']:>8.4f}  {r['iou_membrane']:>8.3f}  {r['iou_cell']:>6.3f}"
              f"  {r['seconds']:>7.0f}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", type=int, default=4, help="round 1's candidate variants (fewer: faster)")
    ap.add_argument("--round1-budget", type=float, default=300.0, help="training seconds of each candidate")
    ap.add_argument("--budget", type=float, default=300.0, help="training seconds of rounds 2 and 3")
    ap.add_argument("--accepted-weight", type=float, default=None, help="loss weight of accepted pixels (default: "
                                                                         "the engine's)")
    ap.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                    help="test-time augmentation at prediction (default: as each model's plan chose)")
    ap.add_argument("--retrain", choices=("both", "fine-tune", "scratch"), default="both",
                    help="later rounds train from the chosen model's weights, from scratch, or both side by side "
                         "(the better by held-out painted pixels is kept, as the wizard does)")
    ap.add_argument("--rounds", type=int, choices=(1, 2, 3), default=3, help="rounds to run")
    ap.add_argument("--keep", type=pathlib.Path, default=None, help="keep round 1's model and segmentation here")
    ap.add_argument("--round1", type=pathlib.Path, default=None,
                    help="start from a round 1 kept with --keep (its figures are reported again, not re-measured)")
    ap.add_argument("--data", type=pathlib.Path, default=DATA)
    ap.add_argument("--json", type=pathlib.Path, default=None, help="write the result here as JSON")
    args = ap.parse_args(argv)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    result = run(args)
    table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
