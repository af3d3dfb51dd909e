"""A checkpoint is loaded as tensors and plain values only: one that would run code is refused, in one line."""

import pytest
import torch

from dlorch.core.engine.checkpoint import UnsafeCheckpoint, read_checkpoint
from dlorch.core.engine.denoise.predict import load_denoiser
from dlorch.core.engine.runcontrol import read_run_state
from dlorch.core.engine.segment import NoHooks, train_segmentation
from dlorch.core.engine.segment.predict import load_model
from dlorch.core.errors import BadInput
from tests.conftest import code_checkpoint

from .conftest import fast_plan


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    image, labels = tiny_data
    plan = fast_plan(image, labels, epochs=1)
    tmp = tmp_path_factory.mktemp("trained")
    return train_segmentation(image, labels, plan, workdir=tmp, resume_from=None, hooks=NoHooks()).checkpoint


def _refused(call, marker, name):
    with pytest.raises(UnsafeCheckpoint) as e:
        call()
    line = str(e.value)
    assert not marker.exists(), "loading the checkpoint ran code from it"
    assert "\n" not in line and name in line and "refused" in line and "never runs code" in line
    assert "weights_only" not in line  # torch's own message advises the one thing never to do here
    assert isinstance(e.value, BadInput)  # permanent: the same file is refused wherever it is tried


@pytest.mark.parametrize("raw", [False, True], ids=["torch-save", "bare-pickle"])
def test_every_loader_refuses_a_checkpoint_that_would_run_code(trained, tiny_data, tmp_path, raw):
    marker = tmp_path / "ran"
    evil = code_checkpoint(tmp_path / "evil.ckpt", marker, base=trained, raw=raw)
    _refused(lambda: read_checkpoint(evil), marker, "evil.ckpt")
    _refused(lambda: read_checkpoint(evil, "s3://bucket/m.ckpt"), marker, "s3://bucket/m.ckpt")
    _refused(lambda: load_model(evil), marker, "evil.ckpt")
    _refused(lambda: load_denoiser(evil), marker, "evil.ckpt")
    _refused(lambda: read_run_state(evil), marker, "evil.ckpt")
    image, labels = tiny_data
    plan = fast_plan(image, labels, epochs=2)
    _refused(lambda: train_segmentation(image, labels, plan, workdir=tmp_path / "w", resume_from=evil,
                                        hooks=NoHooks()), marker, "evil.ckpt")


def test_a_checkpoint_training_wrote_loads_as_weights_only(trained):
    ckpt = read_checkpoint(trained)
    assert "state_dict" in ckpt and read_run_state(trained)["epochs_done"] == 1
    net, plan = load_model(trained)
    assert plan.epochs == 1 and sum(p.numel() for p in net.parameters()) > 0


def test_an_unreadable_file_is_named_in_one_line(trained, tmp_path):
    (tmp_path / "cut.ckpt").write_bytes(trained.read_bytes()[:30000])
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    torch.save([torch.zeros(2)], tmp_path / "list.ckpt")
    for name, needle in {"cut.ckpt": "not a readable model checkpoint", "text.ckpt": "no checkpoint at all",
                         "empty.ckpt": "not a readable model checkpoint", "list.ckpt": "holds a list"}.items():
        with pytest.raises(ValueError) as e:
            read_checkpoint(tmp_path / name)
        assert "\n" not in str(e.value) and name in str(e.value) and needle in str(e.value)
