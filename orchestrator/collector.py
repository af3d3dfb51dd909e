"""``dlorch gc``'s work: list each job's artifacts in the store, ask ``retention`` what may go, delete it."""

from __future__ import annotations

from typing import NamedTuple

from dlorch.orchestrator.retention import Deletion, deletions


class Collected(NamedTuple):
    """What a collection deleted (or, dry, would delete), and the bytes of the files among it."""

    deleted: list[Deletion]
    bytes: int


def collect(c, now: float, older_than_s: float = 0.0, dry_run: bool = False) -> Collected:
    """Delete the artifacts of ``c``'s store that no resume or prediction needs (see ``retention``).

    Args:
        c: a client (its ledger and store).
        now: the time of the decision, seconds since the epoch.
        older_than_s: jobs that ended less than this long ago lose nothing.
        dry_run: decide and report, delete nothing.
    """
    jobs = c.ledger.jobs()
    sizes: dict[str, int] = {}
    for job in jobs:  # attempts/T/ckpt/epoch-N.ckpt is three levels down; an output.zarr's insides are not listed
        sizes.update(c.store.listing(f"jobs/{job.id}/attempts", maxdepth=3))
    doomed = deletions(jobs, sizes, c.store.url, now, older_than_s)
    if not dry_run:
        for d in doomed:
            c.store.delete(d.key)
    return Collected(doomed, sum(sizes[d.key] for d in doomed))
