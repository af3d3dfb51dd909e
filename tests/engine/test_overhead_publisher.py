"""Checkpoints published off the training thread: one waiting at most, the last always sent, failures raised."""

import threading
import time

import pytest
import torch

from dlorch.core.engine.hooks import Progress
from dlorch.core.engine.runcontrol import CheckpointPublisher
from dlorch.core.engine.segment import train_segmentation

from .conftest import fast_plan


class GatedHooks:
    """Background hooks whose on_checkpoint waits for a gate; they record what they were handed."""

    background = True

    def __init__(self, fail_on: int | None = None, delay: float = 0.0) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.sent: list[int] = []
        self.threads: set[str] = set()
        self.fail_on = fail_on
        self.delay = delay

    def should_stop(self) -> bool:
        return False

    def on_checkpoint(self, path, progress: Progress) -> None:
        self.threads.add(threading.current_thread().name)
        self.entered.set()
        self.gate.wait(10)
        time.sleep(self.delay)
        if progress.epochs_done == self.fail_on:
            raise RuntimeError(f"store refused epoch {progress.epochs_done}")
        torch.load(path, map_location="cpu", weights_only=True)  # the file is complete and still there
        self.sent.append(progress.epochs_done)


def test_a_newer_checkpoint_supersedes_one_not_yet_sent_and_flush_sends_the_last(tmp_path):
    hooks = GatedHooks()
    hooks.gate.clear()
    pub = CheckpointPublisher(hooks)
    paths = []
    for i in range(1, 5):
        paths.append(tmp_path / f"{i}.ckpt")
        torch.save({"i": i}, paths[-1])
    pub.submit(paths[0], Progress(1, 4))
    assert hooks.entered.wait(10)  # epoch 1 is being sent ...
    pub.submit(paths[1], Progress(2, 4))
    pub.submit(paths[2], Progress(3, 4))  # ... 2 waits, and 3 replaces it
    assert pub.in_use() == {paths[0], paths[2]}
    hooks.gate.set()
    pub.submit(paths[3], Progress(4, 4))
    pub.flush()
    pub.close()
    assert hooks.sent[0] == 1 and hooks.sent[-1] == 4 and 2 not in hooks.sent
    assert pub.superseded >= 1 and hooks.threads == {"checkpoint-publisher"}


def test_a_failed_publication_is_raised_on_the_training_thread(tmp_path):
    hooks = GatedHooks(fail_on=1)
    pub = CheckpointPublisher(hooks)
    torch.save({}, tmp_path / "a.ckpt")
    pub.submit(tmp_path / "a.ckpt", Progress(1, 2))
    with pytest.raises(RuntimeError, match="store refused epoch 1"):
        pub.flush()
    with pytest.raises(RuntimeError, match="store refused"):
        pub.submit(tmp_path / "a.ckpt", Progress(2, 2))
    pub.close()


@pytest.mark.slow
def test_training_with_background_hooks_publishes_its_last_checkpoint_and_fails_with_them(tiny_data, tmp_path):
    image, labels = tiny_data
    plan = fast_plan(image, labels, epochs=3, steps=2)
    hooks = GatedHooks(delay=0.2)  # slower than an epoch here: some epochs are superseded
    result = train_segmentation(image, labels, plan, workdir=tmp_path / "ok", resume_from=None, hooks=hooks)
    assert result.epochs_done == 3 and hooks.sent[-1] == 3 and hooks.sent == sorted(set(hooks.sent))
    assert hooks.threads == {"checkpoint-publisher"}
    failing = GatedHooks(fail_on=1)
    with pytest.raises(RuntimeError, match="store refused epoch 1"):
        train_segmentation(image, labels, plan, workdir=tmp_path / "bad", resume_from=None, hooks=failing)


def _fitted_trainer(tmp_path):
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, _):
            (x,) = batch
            return self.layer(x).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=0.1)

    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu")
    module = Module()
    trainer.fit(module, DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4))
    return trainer, module


def test_a_snapshot_keeps_the_state_of_its_moment_while_training_goes_on(tmp_path):
    from dlorch.core.engine.runcontrol import snapshot

    trainer, module = _fitted_trainer(tmp_path)
    copied, live = snapshot(trainer), snapshot(trainer, copy=False)
    before = module.layer.weight.detach().clone()
    moments = [s["exp_avg"].clone() for s in copied["optimizer_states"][0]["state"].values()]
    with torch.no_grad():  # the next epoch's steps change weights and moments in place
        module.layer.weight.add_(1.0)
        for s in trainer.optimizers[0].state.values():
            s["exp_avg"].add_(1.0)
    assert torch.equal(copied["state_dict"]["layer.weight"], before)
    assert all(torch.equal(s["exp_avg"], m) for s, m in zip(copied["optimizer_states"][0]["state"].values(), moments))
    assert not torch.equal(live["state_dict"]["layer.weight"], before)  # what an uncopied dump would have written


def test_the_publisher_writes_the_snapshot_on_its_own_thread_before_the_hook_sees_it(tmp_path):
    hooks = GatedHooks()
    pub = CheckpointPublisher(hooks)
    path = tmp_path / "epoch-0001.ckpt"
    pub.submit(path, Progress(1, 1), {"state_dict": {"w": torch.ones(3)}})
    pub.flush()
    pub.close()
    assert hooks.sent == [1] and hooks.threads == {"checkpoint-publisher"}
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.ones(3))
    assert not list(tmp_path.glob("*.tmp"))
