"""Several workers on one study storage: who tunes which study, and what happens when one dies.

Optuna's storages are the only channel between workers (a journal file on one host, an RDB such
as PostgreSQL across hosts). Work is split by whole studies, so every bucket is timed on one GPU
and no candidate is measured twice:

* **Claims.** A worker owns a study while it holds the study's newest *claim*: an empty marker
  study named ``<study>#claim<generation>``. Creating a study is atomic in every Optuna storage
  (a second create of the same name raises ``DuplicatedStudyError``: the journal keeps the first
  create in log order, an RDB has a unique name constraint), so exactly one worker wins each
  generation.
* **Liveness.** The owner writes its host, pid and a heartbeat time into the claim's user
  attributes, refreshing the heartbeat from a thread. A claim is dead when it was released, when
  its heartbeat is older than the grace period, or at once when its owner ran on this host and
  its process is gone. Anyone may then create the next generation and take the study over.
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
import re
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.exceptions import DuplicatedStudyError, UpdateFinishedTrialError
from optuna.study import StudyDirection
from optuna.trial import TrialState

from .runner import StudyRunner
from .studies import StudyKey

__all__ = ["DEFAULT_GRACE_S", "Claim", "ClaimBook", "host_id", "run_worker"]

logger = logging.getLogger(__name__)

# A claim whose heartbeat is older than this is dead. Long enough for the slowest single step
# of a trial (a first torch.compile on the GPU), short enough that survivors take over soon.
DEFAULT_GRACE_S = 120.0
_CLAIM_RE = re.compile(r"^(?P<study>.+)#claim(?P<generation>\d+)$")


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
    """A held claim: refreshes its heartbeat from a thread until released."""

    storage: optuna.storages.BaseStorage
    study_id: int
    generation: int
    interval_s: float
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)

    def start(self) -> Claim:
        self._thread = threading.Thread(target=self._beat, name="claim-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.storage.set_study_user_attr(self.study_id, "heartbeat", time.time())
            except Exception as exc:  # a storage hiccup: the next beat retries
                logger.debug("heartbeat failed: %s", exc)

    def release(self) -> None:
        """Stop the heartbeat and mark the claim released (the next worker need not wait)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.storage.set_study_user_attr(self.study_id, "released", True)


@dataclass
class ClaimBook:
    """Claims on studies in one storage, seen from one worker.

    Attributes:
        storage: The shared storage.
        worker: This worker's name (for logs and the claim's attributes).
        grace_s: Heartbeat age after which a claim is dead.
    """

    storage: optuna.storages.BaseStorage
    worker: str
    grace_s: float = DEFAULT_GRACE_S
    _latest: dict[str, tuple[int, int, dict[str, Any]]] = field(default_factory=dict, init=False)
    _bare_since: dict[int, float] = field(default_factory=dict, init=False)

    def refresh(self) -> None:
        """Read every claim's newest generation and attributes from the storage."""
        latest: dict[str, tuple[int, int, dict[str, Any]]] = {}
        for study in self.storage.get_all_studies():
            match = _CLAIM_RE.match(study.study_name)
            if match is None:
                continue
            name, generation = match["study"], int(match["generation"])
            if name not in latest or generation > latest[name][0]:
                latest[name] = (generation, study._study_id, dict(study.user_attrs))
        self._latest = latest

    def _alive(self, study_id: int, attrs: dict[str, Any]) -> bool:
        now = time.time()
        if attrs.get("released"):
            return False
        if "heartbeat" not in attrs:  # its owner died between creating and describing it?
            first_seen = self._bare_since.setdefault(study_id, now)
            return now - first_seen < self.grace_s
        if now - float(attrs["heartbeat"]) > self.grace_s:
            return False
        # An owner on this host is checked directly: a killed worker's studies go at once.
        return attrs.get("host") != host_id() or _pid_alive(int(attrs.get("pid", -1)))

    def owner(self, study_name: str) -> str | None:
        """The live owner of ``study_name`` as last refreshed, or None."""
        latest = self._latest.get(study_name)
        if latest is None or not self._alive(latest[1], latest[2]):
            return None
        return str(latest[2].get("worker", "?"))

    def try_claim(self, study_name: str) -> Claim | None:
        """Claim ``study_name`` unless a live worker holds it or another wins the race."""
        latest = self._latest.get(study_name)
        if latest is not None and self._alive(latest[1], latest[2]):
            return None
        generation = 0 if latest is None else latest[0] + 1
        try:
            study_id = self.storage.create_new_study(
                [StudyDirection.MINIMIZE], f"{study_name}#claim{generation}"
            )
        except DuplicatedStudyError:
            return None
        for attr, value in {
            "worker": self.worker,
            "host": host_id(),
            "pid": os.getpid(),
            "heartbeat": time.time(),
        }.items():
            self.storage.set_study_user_attr(study_id, attr, value)
        self._latest[study_name] = (generation, study_id, {"worker": self.worker})
        if latest is not None and not latest[2].get("released"):
            logger.warning(
                "%s: took over %s from %s (no heartbeat)",
                self.worker,
                study_name,
                latest[2].get("worker", "an unknown worker"),
            )
        return Claim(self.storage, study_id, generation, self.grace_s / 6).start()


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
                    runner.run(key)
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
