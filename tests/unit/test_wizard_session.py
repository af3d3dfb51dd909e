"""The wizard's session in a local store: strokes under revisions, counts, accepted boxes, labels loaded, resume."""

from __future__ import annotations

import numpy as np
import pytest

from dlorch.core.errors import BadInput
from dlorch.core.store import DataStore
from dlorch.orchestrator.web.wizardstate import Session, StrokeGap


@pytest.fixture
def session(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (2, 40, 50), dtype=np.uint8)
    return Session.create(DataStore(str(tmp_path / "store")), image, "img.npy", "blob://img")


def test_strokes_apply_in_revision_order_and_a_resent_one_is_not_written_twice(session):
    patch = np.full((3, 4), 2, np.uint8)
    ack = session.apply_patch("painted", 1, 1, 5, 6, patch)
    assert ack["rev"] == 1 and ack["counts"]["painted"][2] == 12
    assert (session.window("painted", 1, 5, 6, 3, 4) == 2).all()
    again = session.apply_patch("painted", 1, 1, 0, 0, np.ones((3, 4), np.uint8))  # resent: acknowledged only
    assert again["duplicate"] and session.window("painted", 1, 0, 0, 3, 4).sum() == 0
    with pytest.raises(StrokeGap):
        session.apply_patch("painted", 3, 1, 0, 0, patch)
    session.apply_patch("painted", 2, 1, 5, 6, np.zeros((3, 4), np.uint8))  # an undo is a stroke too
    assert session.state.counts["painted"][2] == 0 and session.state.counts["painted"][0] == 2 * 40 * 50


def test_a_stroke_outside_the_image_or_of_an_unknown_class_is_refused(session):
    with pytest.raises(BadInput, match="outside the image"):
        session.apply_patch("painted", 1, 0, 38, 0, np.ones((4, 4), np.uint8))
    with pytest.raises(BadInput, match="not in the palette"):
        session.apply_patch("painted", 1, 0, 0, 0, np.full((2, 2), 7, np.uint8))
    with pytest.raises(BadInput, match="painted or accepted"):
        session.apply_patch("pred-r1-x", 1, 0, 0, 0, np.ones((2, 2), np.uint8))
    with pytest.raises(BadInput, match="unknown layer"):
        session.window("../state", 0)
    assert session.state.revision == 0


def test_an_accepted_box_never_overwrites_painted_pixels_and_respects_the_confidence(session):
    session.write_layer("pred-r1-a", np.full((2, 40, 50), 1, np.uint8))
    conf = np.zeros((2, 40, 50), np.uint8)
    conf[:, :, 25:] = 250
    session.write_layer("conf-r1-a", conf)
    session.apply_patch("painted", 1, 0, 0, 30, np.full((2, 2), 2, np.uint8))
    taken = session.accept_box("pred-r1-a", 0, 0, 0, 10, 50, "conf-r1-a", 0.9)
    accepted = session.window("accepted", 0)
    assert taken == 10 * 25 - 4 and accepted[:10, 25:].sum() == taken and not accepted[:10, :25].any()
    assert not accepted[0:2, 30:32].any(), "a painted pixel stays painted only"
    assert session.state.revision == 2


def test_labels_from_another_tool_are_checked_and_the_session_resumes_from_the_store(session):
    with pytest.raises(BadInput, match=r"labels shape \(40, 50\) differs from the image's \(2, 40, 50\)"):
        session.load_labels(np.zeros((40, 50), np.uint8))
    labels = np.zeros((2, 40, 50), np.uint16)
    labels[0, :3] = 1
    labels[1, -3:] = 4
    session.load_labels(labels)
    assert [c.id for c in session.state.classes] == [1, 2, 3, 4]
    again = Session.open(session.store, session.state.session)
    assert again.state.revision == session.state.revision == 1
    assert again.state.counts["painted"][1:] == [150, 0, 0, 150]
    assert (again.snapshot("painted") == labels).all()
    with pytest.raises(BadInput, match="class 4 is painted"):
        again.set_classes(["a", "b"])
    again.set_classes(["membrane", "cell", "c", "d", "e"])
    assert Session.open(session.store, session.state.session).state.classes[4].name == "e"


def test_the_same_image_opens_the_same_session_and_an_unknown_one_is_one_line(session, tmp_path):
    image = np.asarray(session.array("image")[...])
    assert Session.create(session.store, image, "img.npy", "blob://img").state.session == session.state.session
    with pytest.raises(BadInput, match="no wizard session w-000000000000"):
        Session.open(session.store, "w-000000000000")
    with pytest.raises(BadInput, match="invalid session id"):
        Session.open(session.store, "../x")


def test_a_later_round_keeps_the_better_held_out_score_once_both_trainings_ended():
    from dlorch.orchestrator.web.wizardjobs import kept_model
    from dlorch.orchestrator.web.wizardstate import Candidate, Round

    rnd = Round(n=2, started_at=0.0, labelled_at_start=0, labels="l")
    rnd.candidates["unet-deep"] = Candidate(variant="unet-deep", network="unet-deep", train_job="a", status="ready",
                                            score=0.71)
    rnd.candidates["unet-deep-from-scratch"] = Candidate(variant="unet-deep-from-scratch", network="unet-deep",
                                                         from_scratch=True, train_job="b", status="predicting",
                                                         score=0.74)
    assert kept_model(rnd) is None  # one is still running
    rnd.candidates["unet-deep-from-scratch"].status = "ready"
    assert kept_model(rnd).variant == "unet-deep-from-scratch"
    rnd.candidates["unet-deep-from-scratch"].score = 0.71
    assert kept_model(rnd).variant == "unet-deep"  # a tie: the model trained on from the chosen weights
    rnd.candidates["unet-deep"].status = "failed"
    assert kept_model(rnd).variant == "unet-deep-from-scratch"
    rnd.candidates["unet-deep-from-scratch"].status = "failed"
    assert kept_model(rnd) is None
