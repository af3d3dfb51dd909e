"""The options of a bootstrapping round: a warm start from a model, accepted labels, a confidence map."""

import numpy as np
import pytest
import tifffile
import torch

from dlorch.core.engine.segment import NoHooks, predict_segmentation, predict_with_confidence, train_segmentation
from dlorch.core.engine.segment.accepted import decode_accepted, encode_accepted
from dlorch.core.engine.segment.losses import sparse_ce_dice_loss
from dlorch.core.engine.segment.module import CKPT_KEY
from dlorch.core.engine.segment.warmstart import initial_weights

from .conftest import fast_plan, make_scene


@pytest.fixture(scope="module")
def scene():
    return make_scene()


@pytest.fixture(scope="module")
def source(scene, tmp_path_factory):
    """A model trained for one short epoch: the one later trainings start from."""
    image, labels, _ = scene
    plan = fast_plan(image, labels, epochs=1)
    result = train_segmentation(image, labels, plan, workdir=tmp_path_factory.mktemp("src"), resume_from=None,
                                hooks=NoHooks())
    return result.checkpoint, plan


def _net_weights(ckpt):
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return {k[4:]: v for k, v in state.items() if k.startswith("net.") and "running" not in k and "num_batches" not in k}


def test_init_from_starts_training_from_the_models_weights(scene, source, tmp_path):
    image, labels, _ = scene
    ckpt, plan = source
    src = torch.load(ckpt, map_location="cpu", weights_only=True)
    best = src[CKPT_KEY]["best_state"]  # the averaged weights the model predicts with
    frozen = plan.model_copy(update={"lr": 0.0, "weight_decay": 0.0, "ema_decay": 0.0})  # steps change nothing
    warm = train_segmentation(image, labels, frozen, workdir=tmp_path / "w", resume_from=None, hooks=NoHooks(),
                              init_from=ckpt)
    warm_w = _net_weights(warm.checkpoint)
    assert all(torch.equal(warm_w[k], best[k]) for k in warm_w)  # not the seeded random start
    # A resumed attempt continues from its own checkpoint (its live weights), not from the model it started from.
    resumed = train_segmentation(image, labels, frozen.model_copy(update={"epochs": 2}), workdir=tmp_path / "r",
                                 resume_from=ckpt, hooks=NoHooks(), init_from=ckpt)
    res_w = _net_weights(resumed.checkpoint)
    assert all(torch.equal(res_w[k], src["state_dict"]["net." + k]) for k in res_w)
    assert not all(torch.equal(res_w[k], best[k]) for k in res_w)


def test_a_model_of_another_network_or_other_classes_is_refused(source):
    ckpt, plan = source
    with pytest.raises(ValueError, match="do not fit the network"):
        initial_weights(ckpt, plan.model_copy(update={"filters": [8, 16, 32, 64]}), "m.ckpt")
    with pytest.raises(ValueError, match="trained on 2 classes and the labels have 3"):
        initial_weights(ckpt, plan.model_copy(update={"num_classes": 3}), "m.ckpt")


def test_accepted_labels_weigh_less_and_painted_ones_win(scene):
    image, labels, truth = scene
    painted = labels.astype(np.uint8)
    accepted = truth.copy()  # the whole image accepted, painted pixels included
    held = np.zeros_like(painted)
    held[0, :8] = painted[0, :8]  # pretend the top rows' strokes were held back for validation
    train = np.where(held > 0, 0, painted).astype(np.uint8)
    enc = encode_accepted(train, accepted, painted, 2)
    assert (enc[painted > 0] == np.where(held > 0, 0, painted)[painted > 0]).all()  # painted wins; held-out stays out
    assert (enc[painted == 0] == truth[painted == 0] + 2).all()

    torch.manual_seed(0)
    y = torch.from_numpy(enc[:, None].astype(np.int64))
    logits = torch.randn(y.shape[0], 2, *y.shape[2:])
    classes, w = decode_accepted(y, 2, 0.25)
    assert set(w.unique().tolist()) == {0.25, 1.0}
    full = sparse_ce_dice_loss(logits, classes, weights=torch.ones_like(w))
    assert torch.isclose(full, sparse_ce_dice_loss(logits, classes))
    only_painted = sparse_ce_dice_loss(logits, torch.where(y > 2, 0, y))
    losses = [float(sparse_ce_dice_loss(logits, classes, weights=decode_accepted(y, 2, a)[1])) for a in (1e-6, 0.25, 1.0)]
    assert abs(losses[0] - float(only_painted)) < 1e-3  # weightless accepted pixels: the painted loss
    assert losses[1] != pytest.approx(losses[2]) and losses[1] != pytest.approx(losses[0])


def test_training_with_accepted_labels_learns_from_them(scene, source, tmp_path):
    image, labels, truth = scene
    accepted = np.where(np.random.default_rng(1).random(truth.shape) < 0.3, truth, 0).astype(np.uint8)
    plan = source[1]
    result = train_segmentation(image, labels, plan, workdir=tmp_path, resume_from=None, hooks=NoHooks(),
                                accepted=accepted)
    own = torch.load(result.checkpoint, map_location="cpu", weights_only=True)[CKPT_KEY]
    assert own["plan"]["accepted_weight"] == 0.5
    # The class shares the loss saw count the accepted pixels (by weight): the background is now the larger class.
    assert own["train_prior"][0] > 0.55
    with pytest.raises(ValueError, match=r"accepted labels must lie in 0..2"):
        train_segmentation(image, labels, plan, workdir=tmp_path / "bad", resume_from=None, hooks=NoHooks(),
                           accepted=accepted * 2)


def test_confidence_is_the_chosen_class_probability_in_uint8(scene, source):
    image, _, _ = scene
    ckpt, _ = source
    labels, confidence = predict_with_confidence(ckpt, image, tta=False)
    assert labels.shape == confidence.shape == image.shape and confidence.dtype == np.uint8
    assert (labels == predict_segmentation(ckpt, image, tta=False)).all()
    assert confidence.min() >= 127 and confidence.max() <= 255  # two classes: the chosen one has p >= 1/2
    assert confidence.std() > 0


@pytest.mark.slow
def test_round_through_the_cli(tmp_path, monkeypatch):
    """Train, then segment starting from that job's model with accepted labels and a confidence map: the CLI's way."""
    from tests.conftest import synthetic_pair
    from tests.system.harness import dlorch, job_json

    monkeypatch.setenv("DLORCH_HOME", str(tmp_path / "home"))
    for var in ("DLORCH_STORE", "DLORCH_QUEUE", "DLORCH_SECRET"):
        monkeypatch.delenv(var, raising=False)
    img, lab = synthetic_pair(tmp_path)
    first = dlorch("train", "segment", str(img), "--labels", str(lab), "--epochs", "1").stdout.split()[-1]
    acc = tmp_path / "accepted.npy"
    np.save(acc, np.where(np.load(lab) == 0, 1, 0).astype(np.uint8)[:, ::-1])  # any map on the grid
    out = tmp_path / "seg.tif"
    bad = dlorch("segment", str(img), "--labels", str(lab), "-o", str(out), "--init-from", first,
                 "--accepted-weight", "0.3", check=False)
    assert bad.returncode != 0 and "--accepted LABELS" in bad.stderr
    second = dlorch("segment", str(img), "--labels", str(lab), "-o", str(out), "--init-from", first, "--accepted",
                    str(acc), "--accepted-weight", "0.3", "--epochs", "1", "--confidence").stdout.split()[-1]
    job = job_json(second)
    assert job["spec"]["options"]["init_from"] == job_json(first)["model"]  # the job id became its model's URI
    assert job["plan"]["accepted_weight"] == 0.3 and job["plan"]["warm_start"]
    assert job["confidence"].endswith("/confidence.tif")
    seg, conf = tifffile.imread(out), tifffile.imread(tmp_path / "seg.confidence.tif")
    assert seg.shape == conf.shape == np.load(img).shape and conf.dtype == np.uint8 and conf.min() >= 127


def test_a_fine_tuning_worse_than_its_start_keeps_the_starting_weights(scene, tmp_path):
    image, labels, _ = scene
    plan = fast_plan(image, labels, epochs=4, steps=6)
    start = train_segmentation(image, labels, plan, workdir=tmp_path / "s", resume_from=None, hooks=NoHooks())
    source = torch.load(start.checkpoint, map_location="cpu", weights_only=True)[CKPT_KEY]
    # A learning rate that wrecks the weights at the first step: every epoch scores below the start.
    wreck = plan.model_copy(update={"epochs": 2, "lr": 50.0, "warmup_fraction": 0.0, "ema_decay": 0.0,
                                    "warm_start": True})
    result = train_segmentation(image, labels, wreck, workdir=tmp_path / "w", resume_from=None, hooks=NoHooks(),
                                init_from=start.checkpoint)
    m = result.metrics
    assert m["start_val_iou"] == pytest.approx(source["best_val_iou"], abs=0.02)  # the start scored as its model did
    assert m["val_iou"] < m["start_val_iou"] - wreck.select_tolerance  # precondition: the fine-tuning got worse
    own = torch.load(result.checkpoint, map_location="cpu", weights_only=True)[CKPT_KEY]
    assert own["best_epoch"] == -1 and m["best_epoch"] == 0 and m["best_val_iou"] == m["start_val_iou"]
    assert all(torch.equal(own["best_state"][k], source["best_state"][k]) for k in source["best_state"])
    assert (predict_segmentation(result.checkpoint, image, tta=False)
            == predict_segmentation(start.checkpoint, image, tta=False)).all()


def test_an_epoch_the_time_budget_cut_short_is_still_scored(scene, tmp_path):
    image, labels, _ = scene
    plan = fast_plan(image, labels, epochs=3, steps=6).model_copy(update={"time_budget_s": 1e-6})
    result = train_segmentation(image, labels, plan, workdir=tmp_path, resume_from=None, hooks=NoHooks())
    assert result.stopped_by == "time_budget" and result.epochs_done == 1
    m = result.metrics  # Lightning validates whole epochs only; this one was cut at its first batch
    assert 0 <= m["val_iou"] <= 1 and m["best_val_iou"] == m["val_iou"]
