"""Chaos: three agents on Redis, a mix of training and inference jobs, an agent SIGKILLed every few seconds."""

import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tests.conftest import synthetic_pair
from tests.system.harness import Cluster

KILLS = 10
TRAIN_EPOCHS = 3
TRAINS, PREDICTS = range(6), range(4)


def test_chaos_every_job_succeeds_with_exact_epochs(redis_server, home, tmp_path):
    img, lab = synthetic_pair(tmp_path)
    with Cluster(tmp_path, home, DLORCH_QUEUE=redis_server.url, DLORCH_LEASE_S="4") as c:
        nodes = ["n1", "n2", "n3"]
        for n in nodes:
            c.agent(n)
        # A model and a reference prediction, made without kills.
        model = c.submit("train", "segment", str(img), "--labels", str(lab), "--epochs", "1")
        c.wait_job(model, lambda j: j["status"] == "succeeded", 300)
        ref = c.submit("predict", model, str(img), "-o", str(tmp_path / "ref.npy"))
        ref_out = np.load(c.wait_job(ref, lambda j: j["status"] == "succeeded", 120)["output"])

        kills, stop = [], threading.Event()
        rng = random.Random(7)

        def killer():
            while not stop.wait(rng.uniform(4, 7)):
                victim = rng.choice(nodes)
                proc = c.agents[victim]
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    kills.append((time.time(), victim))
                c.agent(victim)  # the node comes back (a fresh process)

        # The kills start before the jobs are submitted: started after the last submission (a process each,
        # one after another), they found every job done on a quiet machine and only ever killed idle agents.
        # The submissions run side by side, so that all three agents have work from the start.
        t = threading.Thread(target=killer, daemon=True)
        t.start()
        try:
            with ThreadPoolExecutor(len(TRAINS) + len(PREDICTS)) as pool:
                trains = list(pool.map(lambda i: c.submit("segment", str(img), "--labels", str(lab), "-o",
                                                          str(tmp_path / f"t{i}.tif"), "--epochs", str(TRAIN_EPOCHS)),
                                       TRAINS))
                preds = list(pool.map(lambda i: c.submit("predict", model, str(img), "-o", str(tmp_path / f"p{i}.npy")),
                                      PREDICTS))
            everything = trains + preds
            for jid in everything:
                c.wait_job(jid, lambda j: j["status"] in ("succeeded", "failed", "cancelled"), 900)
            while len(kills) < KILLS:  # keep the chaos going to the promised count
                time.sleep(0.5)
        finally:
            stop.set()
            t.join()

        redone = 0
        for jid in trains:
            j = c.job(jid)
            assert j["status"] == "succeeded", (jid, j["error"])
            assert j["epochs_done"] == TRAIN_EPOCHS
            chain = [a for a in j["attempts"]]
            for a, b in zip(chain, chain[1:]):
                assert b["epochs_start"] <= a["epochs_done"]  # never ahead of what was accepted
            published = list((home / "jobs" / jid / "attempts").glob("*/ckpt/*.ckpt"))
            redone += len(published) - TRAIN_EPOCHS
        for jid in preds:
            j = c.job(jid)
            assert j["status"] == "succeeded", (jid, j["error"])
            np.testing.assert_array_equal(np.load(j["output"]), ref_out)
        assert len(kills) >= KILLS
        assert any(len(c.job(jid)["attempts"]) > 1 for jid in everything)  # the kills hit work in progress
        assert redone <= len(kills), f"{redone} epochs redone over {len(kills)} kills"
