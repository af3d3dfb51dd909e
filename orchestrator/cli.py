"""The ``dlorch`` command line: a thin layer of typer commands over the client, service and agent."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import typer

from dlorch.core.errors import BadInput, DlorchError
from dlorch.core.spec import MAX_EPOCHS, MAX_PRIORITY, MIN_PRIORITY, parse_spec
from dlorch.orchestrator.inputs import model_uri, training_inputs, upload
from dlorch.core.settings import Settings, requested_precision

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Self-configuring deep-learning segmentation on a queue of idle GPUs.")
train_app = typer.Typer(no_args_is_help=True, help="Train a model without predicting.")
nodes_app = typer.Typer(help="List node agents, or drain one.")
app.add_typer(train_app, name="train")
app.add_typer(nodes_app, name="nodes")

_settings: dict[str, Any] = {}
TTA_HELP = ("segmentation: average 8 flips/rotations at prediction (8x its time). By default the model's plan decides:"
            " on where that costs at most half the training time (a 2D stack: +0.02-0.04 mean IoU on ISBI), off"
            " for a large 3D volume on a CPU")
# Shared by every command that submits work; the limits are the job spec's own.
EPOCHS = typer.Option(None, "--epochs", min=1, max=MAX_EPOCHS, help="override the automatic epoch count")
TIME_BUDGET = typer.Option(None, "--time-budget", min=1, help="cap on training seconds (over resumes)")
PRIORITY = typer.Option(0, "--priority", min=MIN_PRIORITY, max=MAX_PRIORITY,
                        help="higher runs first; FIFO within a priority")


def settings() -> Settings:
    """Settings from options, then ``DLORCH_*`` variables."""
    try:
        return Settings(**{k: v for k, v in _settings.items() if v})
    except Exception as e:
        raise BadInput(f"bad setting: {e}".splitlines()[0]) from None


def client():
    import sqlite3

    from dlorch.orchestrator.client import Client

    s = settings()
    try:
        c = Client(s)
        c.check_queue()
    except (OSError, sqlite3.Error) as e:  # a store path that is a file, an unwritable home, a damaged queue.db
        what = getattr(e, "strerror", None) or str(e)
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        raise BadInput(f"cannot open dlorch's store or queue: {what}{where}; point --store (DLORCH_HOME) at a "
                       "writable directory and --queue at a writable sqlite:/// file or a redis:// URL") from None
    return c


@app.callback()
def _global(
    store: Optional[str] = typer.Option(None, "--store", help="state/data store: directory or s3:// URL [DLORCH_STORE]"),
    queue: Optional[str] = typer.Option(None, "--queue", help="queue: sqlite:///file.db or redis://host:port/db [DLORCH_QUEUE]"),
) -> None:
    _settings.update(store=store, queue=queue)


# -- services ---------------------------------------------------------------------------------------
@app.command()
def up(agents: int = typer.Option(0, "--agents", min=0, help="also start N local node agents")) -> None:
    """Run the orchestrator service (and optionally local agents) until interrupted."""
    from dlorch.orchestrator.client import LocalService

    _log_to_stderr()
    c = client()
    svc = LocalService(c, agents=agents)
    stop = threading.Event()
    for name in ("SIGTERM", "SIGINT", "SIGBREAK"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), lambda *_: stop.set())
    typer.echo(f"orchestrator up: store {c.settings.resolved_store()} queue {c.queue.url} agents {agents}", err=True)
    try:
        while not stop.wait(0.5):
            if svc.error is not None:
                raise svc.error
    finally:
        typer.echo("stopping: draining local agents", err=True)
        svc.close()


@app.command()
def agent(
    node_id: Optional[str] = typer.Option(None, "--node-id", help="a stable name for this node"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for torch (default: all)"),
    spot_notices: Optional[str] = typer.Option(
        None, "--spot-notices", envvar="DLORCH_SPOT_NOTICES",
        help="poll EC2 metadata for spot interruption notices: 'ec2' or a metadata base URL"),
    nice: int = typer.Option(0, "--nice", min=0, max=19, envvar="DLORCH_NICE",
                             help="lower this agent's CPU priority (Unix niceness), e.g. on a lab PC someone works at"),
) -> None:
    """Run a node agent: take jobs from the queue one at a time until drained or signalled."""
    from dlorch.nodeagent.agent import Agent
    from dlorch.nodeagent.interrupts import install_signal_handlers

    _log_to_stderr()
    if nice and hasattr(os, "nice"):
        os.nice(nice)
    if threads:
        os.environ["DLORCH_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)
    spot_url = "http://169.254.169.254" if spot_notices == "ec2" else spot_notices
    a = Agent(settings(), node_id=node_id, spot_metadata_url=spot_url)
    install_signal_handlers(a.stop)
    a.run()


# -- jobs ---------------------------------------------------------------------------------------------
@app.command()
def segment(
    image: str = typer.Argument(..., help="image: TIFF, zarr, .npy or .npz (file.npz:NAME picks an array)"),
    labels: str = typer.Option(..., "--labels", help="sparse labels on the same grid: 0 = unlabelled, 1..K"),
    out: Path = typer.Option(..., "-o", "--out", help="label map to write: .tif, .zarr or .npy"),
    epochs: Optional[int] = EPOCHS,
    time_budget: Optional[float] = TIME_BUDGET,
    priority: int = PRIORITY,
    candidates: int = typer.Option(1, "--candidates", min=1, help="train N candidate models in parallel, keep the best"),
    tta: Optional[bool] = typer.Option(None, "--tta/--no-tta", show_default=False, help=TTA_HELP),
    detach: bool = typer.Option(False, "--detach", help="print only the job id and return"),
) -> None:
    """Train on sparse labels and segment the image (one job; with --candidates, N jobs and the best predicts)."""
    from dlorch.core.imageio import check_output_path, output_format

    fmt = output_format(out)
    check_output_path(out, [image, labels])  # before training: a bad output would waste it, or lose data
    spec = _training_spec("segment", image, labels, epochs, time_budget, priority) | {"output_format": fmt}
    if tta is not None:
        spec["options"] = {"tta": tta}
    if candidates > 1:
        best = _run_candidates({**spec, "kind": "train"}, candidates, detach)
        if best is not None:
            predict_spec = {"kind": "predict", "image": spec["image"], "model": best.model, "priority": priority,
                            "output_format": fmt, "options": {} if tta is None else {"tta": tta}}
            _run_job(predict_spec, detach=False, out=out)
        return
    _run_job(spec, detach, out=out)


@app.command()
def denoise(
    image: str = typer.Argument(..., help="noisy image: TIFF, zarr, .npy or .npz (file.npz:NAME picks an array)"),
    out: Path = typer.Option(..., "-o", "--out", help="denoised image to write (float32): .tif, .zarr or .npy"),
    second: Optional[str] = typer.Option(None, "--second", help="a second noisy acquisition: Noise2Noise"),
    clean: Optional[str] = typer.Option(None, "--clean", help="a clean target of the same scene: supervised (CARE)"),
    epochs: Optional[int] = EPOCHS,
    time_budget: Optional[float] = TIME_BUDGET,
    priority: int = PRIORITY,
    detach: bool = typer.Option(False, "--detach", help="print only the job id and return"),
) -> None:
    """Denoise an image, self-supervised from the noisy image alone (Noise2Void) unless given more."""
    from dlorch.core.imageio import check_output_path, output_format

    fmt = output_format(out)
    check_output_path(out, [r for r in (image, second, clean) if r])
    _run_job(_denoise_spec("denoise", image, second, clean, epochs, time_budget, priority) | {"output_format": fmt},
             detach, out=out)


@train_app.command("denoise")
def train_denoise(
    image: str = typer.Argument(..., help="noisy image"),
    second: Optional[str] = typer.Option(None, "--second", help="a second noisy acquisition: Noise2Noise"),
    clean: Optional[str] = typer.Option(None, "--clean", help="a clean target: supervised (CARE)"),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="also copy the model checkpoint here"),
    epochs: Optional[int] = EPOCHS,
    time_budget: Optional[float] = TIME_BUDGET,
    priority: int = PRIORITY,
    detach: bool = typer.Option(False, "--detach", help="print only the job id and return"),
) -> None:
    """Train a denoising model; `dlorch predict JOB IMAGE` applies it."""
    _checkpoint_out(out, [image, second, clean])
    _run_job(_denoise_spec("train", image, second, clean, epochs, time_budget, priority), detach, out=out)


@train_app.command("segment")
def train_segment(
    image: str = typer.Argument(..., help="image: TIFF, zarr, .npy or .npz"),
    labels: str = typer.Option(..., "--labels", help="sparse labels: 0 = unlabelled, 1..K"),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="also copy the model checkpoint here"),
    epochs: Optional[int] = EPOCHS,
    time_budget: Optional[float] = TIME_BUDGET,
    priority: int = PRIORITY,
    candidates: int = typer.Option(1, "--candidates", min=1, help="train N candidate models in parallel"),
    detach: bool = typer.Option(False, "--detach", help="print only the job id(s) and return"),
) -> None:
    """Train a segmentation model; `dlorch predict JOB IMAGE` applies it."""
    _checkpoint_out(out, [image, labels])
    spec = _training_spec("train", image, labels, epochs, time_budget, priority)
    if candidates > 1:
        best = _run_candidates(spec, candidates, detach)
        if best is not None and out is not None:
            client().fetch(best.model, out)
        return
    _run_job(spec, detach, out=out)


@app.command()
def predict(
    model: str = typer.Argument(..., help="id of a succeeded training job, or a model .ckpt path/URI"),
    image: str = typer.Argument(..., help="image to segment or denoise (the model's task); a .zarr volume (path or"
                                          " s3:// URL) into .zarr is predicted blockwise, memory-bounded"),
    out: str = typer.Option(..., "-o", "--out", help="labels or denoised image to write: .tif, .zarr or .npy; or an"
                                                   " s3://... .zarr URL"),
    priority: int = PRIORITY,
    block_voxels: Optional[int] = typer.Option(None, "--block-voxels", min=1,
                                               help="blockwise: voxels per block (default: ~3 s of compute, measured)"),
    tta: Optional[bool] = typer.Option(None, "--tta/--no-tta", show_default=False, help=TTA_HELP),
    detach: bool = typer.Option(False, "--detach", help="print only the job id and return"),
) -> None:
    """Segment or denoise an image with a trained model."""
    from dlorch.core.imageio import check_output_path, output_format

    fmt = output_format(Path(out))
    check_output_path(out, [image])  # a URL stays a string: Path() would mangle s3://
    c = client()
    model_ref, task = model_uri(c, model)
    if task == "denoising" and tta is not None:
        raise BadInput(f"--tta/--no-tta apply to segmentation models; {model} is a denoising model")
    spec = {"kind": "predict", "task": task, "image": upload(c, image, "image"), "model": model_ref,
            "priority": priority, "output_format": fmt}
    if "://" in out:  # a URL (s3://bucket/out.zarr): blocks write there directly
        spec["output"] = out
    options: dict[str, Any] = {"block_voxels": block_voxels} if block_voxels else {}
    if tta is not None:
        options["tta"] = tta
    if options:
        spec["options"] = options
    _run_job(spec, detach, out=None if "://" in out else Path(out), c=c)


@app.command()
def submit(
    spec_file: Path = typer.Argument(..., help="a JobSpec as JSON; local image/labels/model paths are uploaded"),
    wait: bool = typer.Option(False, "--wait", help="follow the job to its end"),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="with --wait: copy the result here"),
) -> None:
    """Submit a job described by a JSON spec (for scripts); prints the job id."""
    from dlorch.core.imageio import check_output_path, output_format

    if not spec_file.is_file():
        raise BadInput(f"spec file not found: {spec_file}" if not spec_file.exists() else
                       f"spec {spec_file} is a directory; pass the JSON file")
    try:
        data = json.loads(spec_file.read_text())
    except ValueError as e:
        raise BadInput(f"spec {spec_file} is not valid JSON: {e}") from None
    spec = parse_spec(data)  # fail on a bad field before uploading anything
    if out is not None:  # the result is copied as it was written: the suffix must say the same format
        fmt = output_format(out)
        check_output_path(out, [data[r] for r in ("image", "labels", "target") if data.get(r)])
        if data.get("output_format", fmt) != fmt:
            raise BadInput(f"-o {out} asks for {fmt} but the spec's output_format is {data['output_format']}")
        data["output_format"] = fmt
    c = client()
    # A training job's inputs get the engine's checks here (labels on the image's grid, a target of
    # its shape), as `dlorch segment` gives them, instead of failing on a node after its retries.
    arrays = training_inputs(data, spec.task, spec.mode) if spec.trains else {}
    for role in ("image", "labels", "target"):
        value = data.get(role)
        if value and not value.startswith(c.store.url):
            data[role] = upload(c, value, role, arrays.get(role))
    if data.get("model") and not data["model"].startswith(c.store.url):  # a .ckpt, a URL or a training job's id
        data["model"], task = model_uri(c, data["model"])
        data.setdefault("task", task)
    _run_job(data, detach=not wait, out=out, c=c)


@app.command()
def jobs(as_json: bool = typer.Option(False, "--json", help="one JSON document")) -> None:
    """List jobs, oldest first, with their node and epochs (blocks: `dlorch status JOB`)."""
    from dlorch.orchestrator import views

    all_jobs = client().ledger.jobs()
    if as_json:
        typer.echo(json.dumps([j.public() for j in all_jobs], indent=1))
    else:
        views.jobs_table(all_jobs)


@app.command()
def status(job: str = typer.Argument(...), as_json: bool = typer.Option(False, "--json")) -> None:
    """One job in detail: status, attempts, progress, timings, plan."""
    from dlorch.orchestrator import views

    j = client().ledger.get(job)
    if as_json:
        typer.echo(json.dumps(j.public(), indent=1))
    else:
        views.job_detail(j)


@app.command()
def logs(job: str = typer.Argument(...)) -> None:
    """The job's history and each attempt's log."""
    c = client()
    for line in c.logs(c.ledger.get(job)):
        typer.echo(line)


@app.command()
def cancel(job: str = typer.Argument(...)) -> None:
    """Cancel a queued or running job (its node stops at the next heartbeat)."""
    reply = client().call({"type": "cancel", "job": job})
    typer.echo(f"cancelled {reply['job']}")


@nodes_app.callback(invoke_without_command=True)
def nodes(ctx: typer.Context, as_json: bool = typer.Option(False, "--json"),
          all_nodes: bool = typer.Option(False, "--all", help="include nodes that left")) -> None:
    """List node agents with their hardware, job and last heartbeat."""
    if ctx.invoked_subcommand:
        return
    from dlorch.orchestrator import views

    c = client()
    now = time.time()
    found = [n for n in c.ledger.nodes() if all_nodes or n.alive(now, c.settings.lease_s)]
    if as_json:
        typer.echo(json.dumps([n.public(now, c.settings.lease_s) for n in found], indent=1))
    else:
        views.nodes_table(found, now, c.settings.lease_s)


@nodes_app.command("drain")
def drain(node: str = typer.Argument(..., help="node id (or a unique prefix)")) -> None:
    """Ask a node to finish or checkpoint its job, hand it back, and exit."""
    reply = client().call({"type": "drain", "node": node})
    typer.echo(f"draining {reply['node']}")


@app.command()
def evaluate(
    prediction: Path = typer.Argument(..., help="predicted label map"),
    truth: str = typer.Argument(..., help="dense labels (file.npz:NAME picks an array)"),
    slices: Optional[str] = typer.Option(None, "--slices", help="first axis range to score, e.g. 5:30"),
) -> None:
    """Score a label map against dense labels: IoU per class, mean IoU, pixel error."""
    from dlorch.core.imageio import read_image, split_key
    from dlorch.core.metrics import label_map, segmentation_scores

    pred = label_map(read_image(prediction, role="labels"), "prediction", str(prediction))
    path, key = split_key(truth)
    true = label_map(read_image(path, key, role="labels"), "truth", truth)
    if pred.shape != true.shape:
        raise BadInput(f"prediction shape {pred.shape} differs from truth shape {true.shape}")
    if slices:
        n = pred.shape[0]
        a, sep, b = slices.partition(":")
        try:
            sl = slice(int(a) if a else None, int(b) if b else None) if sep else slice(int(a), int(a) + 1)
        except ValueError:
            raise BadInput(f"--slices {slices!r} is not a range such as 5:30") from None
        pred, true = pred[sl], true[sl]
        if pred.size == 0:
            raise BadInput(f"--slices {slices} selects none of the {n} slices; give a range inside 0:{n}")
    if not (true > 0).any():
        raise BadInput(f"truth {truth} has no labelled pixel (all 0); score against dense labels 1..K")
    scores = segmentation_scores(pred, true)
    for k, v in scores.items():
        typer.echo(f"{k:>16}: {v:.4f}")


# -- helpers ------------------------------------------------------------------------------------------
def _checkpoint_out(out: Path | None, inputs: list[str | None]) -> None:
    """Where ``train -o`` copies the model: a file path that destroys nothing (see ``check_output_path``)."""
    from dlorch.core.imageio import check_output_path

    if out is not None:
        if out.suffix != ".ckpt":
            raise BadInput(f"-o {out}: a model is written as a .ckpt file; give a name ending in .ckpt")
        check_output_path(out, [r for r in inputs if r], fmt="npy")  # any single-file format: the same rules


def _local(ref: str | None, role: str) -> None:
    """Training reads its inputs on this machine: a URL is refused in one line."""
    if ref and "://" in ref:
        raise BadInput(f"training reads local files, and the {role} is a URL ({ref}); copy it here first "
                       "(`dlorch predict` reads .zarr volumes from s3:// directly)")


def _training_spec(kind: str, image: str, labels: str, epochs, time_budget, priority) -> dict[str, Any]:
    for ref, role in ((image, "image"), (labels, "labels")):
        _local(ref, role)
    c = client()
    # The engine's own checks, here so that a bad label map fails before it is uploaded and queued.
    arrays = training_inputs({"image": image, "labels": labels}, "segmentation")
    return {"kind": kind, "image": upload(c, image, "image", arrays["image"]),
            "labels": upload(c, labels, "labels", arrays["labels"]),
            "epochs": epochs, "time_budget": time_budget, "priority": priority}


def _denoise_spec(kind: str, image: str, second, clean, epochs, time_budget, priority) -> dict[str, Any]:
    for ref, role in ((image, "image"), (second, "second acquisition"), (clean, "clean target")):
        _local(ref, role)
    if second and clean:
        raise BadInput("give --second (another noisy acquisition) or --clean (a clean target), not both")
    c = client()
    other = second or clean
    mode = "n2n" if second else "care" if clean else None
    try:
        arrays = training_inputs({"image": str(image), "target": other}, "denoising", mode)
    except BadInput as e:  # name the option the user gave, not the spec's field
        raise BadInput(str(e).replace("target shape", "--second shape" if second else "--clean shape")) from None
    spec: dict[str, Any] = {"kind": kind, "task": "denoising", "image": upload(c, str(image), "image", arrays["image"]),
                            "epochs": epochs, "time_budget": time_budget, "priority": priority}
    if other:
        spec |= {"target": upload(c, other, "target", arrays["target"]), "mode": mode}
    return spec


def _run_job(spec: dict[str, Any], detach: bool, out: Path | None, c=None) -> None:
    from dlorch.orchestrator import views
    from dlorch.orchestrator.client import ensure_local_service

    c = c or client()
    if detach:
        typer.echo(c.submit(spec))
        return
    parse_spec(spec)  # a bad spec fails before a local orchestrator and agent are started for it
    service = ensure_local_service(c)
    try:
        job_id = c.submit(spec)
        typer.echo(f"job {job_id}", err=True)
        job = views.follow(c, job_id, service)
    except KeyboardInterrupt:
        typer.echo("interrupted: the job stays in the queue; `dlorch up` continues it", err=True)
        raise typer.Exit(130) from None
    finally:
        if service is not None:
            service.close()
    if job.status.value != "succeeded":
        raise DlorchError(f"job {job.id} {job.status.value}: {job.error or 'see `dlorch logs ' + job.id + '`'}")
    result = job.output if job.spec.kind != "train" else job.model
    if job.spec.output:
        typer.echo(f"wrote {job.spec.output}", err=True)
    elif out is not None and result:
        c.fetch(result, out)
        typer.echo(f"wrote {out}", err=True)
    if job.model:
        typer.echo(f"model {job.model}", err=True)
    typer.echo(job.id)


def _run_candidates(spec: dict[str, Any], n: int, detach: bool):
    """Submit one training job per model variant, follow them together, print their validation table."""
    from dlorch.core.engine.zoo import candidate_names
    from dlorch.orchestrator import views
    from dlorch.orchestrator.client import ensure_local_service

    try:
        names = candidate_names(n)
    except ValueError as e:
        raise BadInput(str(e)) from None
    c = client()
    parse_spec({**spec, "options": {"variant": names[0]}})
    service = None if detach else ensure_local_service(c, agents=n)
    try:
        ids = {c.submit({**spec, "options": {"variant": v}, "name": f"candidate {v}"}): v for v in names}
        if detach:
            for jid in ids:
                typer.echo(jid)
            return None
        finals = views.follow_many(c, list(ids), service)
    finally:
        if service is not None:
            service.close()
    views.candidates_table(finals, ids)
    ok = [j for j in finals if j.status.value == "succeeded"]
    if not ok:
        raise DlorchError("no candidate succeeded; see `dlorch jobs` and `dlorch logs JOB`")
    best = max(ok, key=lambda j: (j.metrics.get("best_val_iou", 0.0), -j.metrics.get("val_loss", 0.0)))
    typer.echo(f"best: {ids[best.id]} ({best.id}), held-out stroke IoU {best.metrics.get('best_val_iou', 0):.4f}",
               err=True)
    return best


def _log_to_stderr() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("lightning", "pytorch_lightning", "lightning.pytorch", "huey", "lightning.fabric",
                  "pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero",
                  "pytorch_lightning.trainer.connectors.checkpoint_connector", "botocore", "aiobotocore", "s3fs",
                  "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _hoist_global_options(argv: list[str]) -> list[str]:
    """Accept ``--store``/``--queue`` anywhere on the line, not only before the command."""
    front, rest, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a in ("--store", "--queue") and i + 1 < len(argv):
            front += [a, argv[i + 1]]
            i += 2
            continue
        if a.startswith(("--store=", "--queue=")):
            front.append(a)
        else:
            rest.append(a)
        i += 1
    return front + rest


def main() -> None:
    """Entry point: one line on stderr and a non-zero exit for every error a user can cause."""
    argv = _hoist_global_options(sys.argv[1:])
    if not os.environ.get("DLORCH_DEBUG"):
        sys.unraisablehook = _log_unraisable
    # SIGTERM (a `timeout`, a closed terminal's kill) ends a command as Ctrl-C does, so the local
    # orchestrator and agent a command started are stopped, not orphaned. `up` and `agent` install
    # their own handlers.
    signal.signal(signal.SIGTERM, _interrupt)
    from typer._click import exceptions as click  # typer carries its own click; its exceptions are these

    try:
        requested_precision()  # a bad DLORCH_PRECISION: one line now, not a failed job later
        code = app(args=argv, prog_name="dlorch", standalone_mode=False)
    except click.NoArgsIsHelpError as e:
        text = e.ctx.get_help() if e.ctx else ""  # typer's rich help prints itself and returns ""
        if text.strip():
            typer.echo(text)
        sys.exit(2)
    except click.UsageError as e:  # a bad option or argument: one line, and where the help is
        command = e.ctx.command_path if e.ctx else "dlorch"
        typer.echo(f"error: {e.format_message().rstrip('.')}; see `{command} --help`", err=True)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        typer.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except typer.Abort:  # Ctrl-C outside a job (inside one, the job's own message came first)
        sys.exit(130)
    except DlorchError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # never a traceback for the user; DLORCH_DEBUG=1 shows it
        if os.environ.get("DLORCH_DEBUG"):
            raise
        typer.echo(f"error: unexpected {type(e).__name__}: {e} (DLORCH_DEBUG=1 shows where)", err=True)
        sys.exit(1)
    if isinstance(code, int) and code:  # typer.Exit(code) inside a command
        sys.exit(code)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _log_unraisable(unraisable: Any) -> None:
    """Send "Exception ignored in ..." reports to the debug log instead of stderr.

    After a failed S3 read, zarr leaves the reads it ran beside it unfinished; when they are
    collected, aiobotocore's context reset raises in them, and Python prints each traceback to
    stderr although the error was already handled and reported on one line. DLORCH_DEBUG=1 keeps
    Python's default.
    """
    logging.getLogger("dlorch").debug("ignored in %r: %s: %s", unraisable.object,
                                      getattr(unraisable.exc_type, "__name__", unraisable.exc_type),
                                      unraisable.exc_value)


if __name__ == "__main__":
    main()
