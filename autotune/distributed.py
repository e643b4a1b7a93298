"""Several workers on one study storage: who tunes which study, and what happens when one dies.

Optuna's storages are the only channel between workers (a journal file on one host, an RDB such
as PostgreSQL across hosts). Work is split by whole studies, so every bucket is timed on one GPU
and no candidate is measured twice:

* **Claims.** A worker owns a study while the study's ``rope_autotune:claim`` system attribute
  names it: its generation, worker, host, pid, heartbeat time, and whether it was released.
  Every change of a claim is an atomic compare-and-set (:mod:`autotune._compare_and_set`): it
  applies only if the claim is still the one the worker read, so exactly one worker wins each
  generation. A worker claims a study before it exists by creating it empty. Readers of the
  storage see only the studies; they never meet a claim.
* **Liveness.** The owner refreshes the heartbeat from a thread. A claim is dead when it was
  released, when its heartbeat is older than the grace period, or at once when its owner ran on
  this host and its process is gone. Anyone may then set the next generation and take the
  study over; an owner that finds its claim taken stops after its trial in flight.
* **Orphans.** A new owner fails the trials left running in the study: with the claim held, no
  live worker can be running them. (RDB storages also get Optuna's own trial heartbeat, which
  fails them on the next trial anyway.) A dead worker so loses only its trial in flight; its
  finished trials stay, and enqueued candidates it never measured are enqueued again.
* **Order.** Worker ``i`` of ``n`` starts its walk over the studies ``i/n`` of the way in, so
  workers rarely contend for a claim; one that finds every remaining study owned by live workers
  waits, and takes over any whose owner dies, so the survivors finish the run.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.exceptions import DuplicatedStudyError, UpdateFinishedTrialError
from optuna.study import StudyDirection
from optuna.trial import TrialState

from ._compare_and_set import compare_and_set
from .runner import StudyRunner
from .studies import StudyKey

__all__ = ["CLAIM_ATTR", "DEFAULT_GRACE_S", "Claim", "ClaimBook", "host_id", "run_worker"]

logger = logging.getLogger(__name__)

# A claim whose heartbeat is older than this is dead. Long enough for the slowest single step
# of a trial (a first torch.compile on the GPU), short enough that survivors take over soon.
DEFAULT_GRACE_S = 120.0
# The study system attribute that holds a study's claim.
CLAIM_ATTR = "rope_autotune:claim"


def host_id() -> str:
    """This machine: host name plus boot id, so that containers sharing a host name differ."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@dataclass
class Claim:
    """A held claim: refreshes its heartbeat from a thread until released, or until it finds
    the claim taken over (:meth:`lost`).

    Attributes:
        storage: The shared storage.
        study_id: The claimed study.
        value: The claim as last written by its holder.
        interval_s: Seconds between heartbeats.
    """

    storage: optuna.storages.BaseStorage
    study_id: int
    value: Mapping[str, Any]
    interval_s: float
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _lost: threading.Event = field(default_factory=threading.Event, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)

    @property
    def generation(self) -> int:
        """How many times the study was claimed before this claim."""
        return int(self.value["generation"])

    def lost(self) -> bool:
        """Whether another worker took the study over (this one's heartbeat came too late)."""
        return self._lost.is_set()

    def start(self) -> Claim:
        self._thread = threading.Thread(target=self._beat, name="claim-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _replace(self, **changes: Any) -> bool:
        """Compare-and-set the claim to its value with ``changes``; False when it was taken."""
        new = {**self.value, **changes}
        if not compare_and_set(self.storage, self.study_id, CLAIM_ATTR, self.value, new):
            self._lost.set()
            return False
        self.value = new
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if not self._replace(heartbeat=time.time()):
                    logger.warning("%s: claim taken over by another worker", self.value["worker"])
                    return
            except Exception as exc:  # a storage hiccup: the next beat retries
                logger.debug("heartbeat failed: %s", exc)

    def release(self) -> None:
        """Stop the heartbeat and mark the claim released (the next worker need not wait)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self.lost():
            self._replace(released=True)


@dataclass
class ClaimBook:
    """Claims on studies in one storage, seen from one worker.

    Attributes:
        storage: The shared storage.
        worker: This worker's name (for logs and the claim).
        grace_s: Heartbeat age after which a claim is dead.
    """

    storage: optuna.storages.BaseStorage
    worker: str
    grace_s: float = DEFAULT_GRACE_S
    _claims: dict[str, tuple[int, Mapping[str, Any] | None]] = field(
        default_factory=dict, init=False
    )

    def refresh(self) -> None:
        """Read every study's claim from the storage."""
        self._claims = {
            study.study_name: (study._study_id, study.system_attrs.get(CLAIM_ATTR))
            for study in self.storage.get_all_studies()
        }

    def _alive(self, claim: Mapping[str, Any] | None) -> bool:
        if claim is None or claim.get("released"):
            return False
        if time.time() - float(claim["heartbeat"]) > self.grace_s:
            return False
        # An owner on this host is checked directly: a killed worker's studies go at once.
        return claim.get("host") != host_id() or _pid_alive(int(claim.get("pid", -1)))

    def owner(self, study_name: str) -> str | None:
        """The live owner of ``study_name`` as last refreshed, or None."""
        claim = self._claims.get(study_name, (None, None))[1]
        return str(claim.get("worker", "?")) if claim is not None and self._alive(claim) else None

    def try_claim(self, study_name: str) -> Claim | None:
        """Claim ``study_name`` (creating it empty if it does not exist) unless a live worker
        holds it or another wins the race."""
        study_id, current = self._claims.get(study_name, (None, None))
        if self._alive(current):
            return None
        if study_id is None:
            try:
                study_id = self.storage.create_new_study([StudyDirection.MINIMIZE], study_name)
            except DuplicatedStudyError:  # created since the last refresh; the claim decides
                study_id = self.storage.get_study_id_from_name(study_name)
        new = {
            "generation": 0 if current is None else int(current["generation"]) + 1,
            "worker": self.worker,
            "host": host_id(),
            "pid": os.getpid(),
            "heartbeat": time.time(),
            "released": False,
        }
        if not compare_and_set(self.storage, study_id, CLAIM_ATTR, current, new):
            return None
        self._claims[study_name] = (study_id, new)
        if current is not None and not current.get("released"):
            logger.warning(
                "%s: took over %s from %s (no heartbeat)",
                self.worker,
                study_name,
                current.get("worker", "an unknown worker"),
            )
        return Claim(self.storage, study_id, new, self.grace_s / 6).start()


def fail_orphans(storage: optuna.storages.BaseStorage, study_name: str) -> int:
    """Fail the trials left running in a study whose claim the caller holds; their count."""
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return 0
    failed = 0
    for trial in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
        try:
            if storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                failed += 1
        except UpdateFinishedTrialError:  # finished meanwhile
            pass
    if failed:
        logger.warning("%s: failed %d trial(s) left running by a dead worker", study_name, failed)
    return failed


def run_worker(
    runner: StudyRunner,
    keys: Sequence[StudyKey],
    *,
    index: int = 0,
    count: int = 1,
    worker: str | None = None,
    grace_s: float = DEFAULT_GRACE_S,
    poll_s: float | None = None,
    on_study: Callable[[StudyKey], None] = lambda key: None,
) -> None:
    """Run every study of ``keys`` that is not complete, claiming each first.

    Returns when every study is complete (by this worker or others). Waits while live workers
    own the rest, and takes over the studies of dead ones.

    Raises:
        KeyboardInterrupt: the claim in hand is released first.
    """
    worker = worker or f"{host_id().split('/')[0]}:{os.getpid()}"
    book = ClaimBook(runner.storage, worker, grace_s)
    poll_s = min(2.0, grace_s / 4) if poll_s is None else poll_s
    start = (index * len(keys)) // max(1, count)
    pending = list(keys[start:]) + list(keys[:start])
    while pending:
        book.refresh()
        waiting, ran = [], False
        for key in pending:
            if runner.is_complete(key):
                continue
            claim = book.try_claim(key.name)
            if claim is None:
                waiting.append(key)
                continue
            try:
                if not runner.is_complete(key):
                    fail_orphans(runner.storage, key.name)
                    on_study(key)
                    runner.run(key, should_stop=claim.lost)
            finally:
                claim.release()
            ran = True
            book.refresh()  # a long study: others' claims may have changed meanwhile
        pending = waiting
        if pending and not ran:
            owners = sorted({book.owner(k.name) or "?" for k in pending})
            logger.debug(
                "%s: %d studies owned by %s; waiting", worker, len(pending), ", ".join(owners)
            )
            time.sleep(poll_s)
