"""The tuner under interrupts and failures: nothing measured is lost, nothing failed is frozen,
and what is timed excludes compiling."""

from dataclasses import dataclass, field

import pytest
import torch
from conftest import CPU_TABLE, QUICK, TINY

from autotune import measure, open_storage, tune
from autotune.studies import COUNTED_OUTCOMES
from kernels import get_provider
from kernels.providers import Provider
from kernels.table import read_table


def test_a_stop_right_after_a_studys_last_trial_keeps_its_bucket(tmp_path):
    """The stop lands after the first study's last trial, before the study is flagged
    complete: its bucket is written now, and a resume finishes the other one."""
    kwargs = dict(
        device="cpu", providers=["torch", "triton"], trials=2, storage=tmp_path / "s.journal",
        output=tmp_path / "out", seed=0, progress=False, time_kwargs=QUICK,
    )  # fmt: skip
    counted = []

    def stop_after_the_first_study(study, trial):
        counted.append(trial.user_attrs.get("outcome") in COUNTED_OUTCOMES)
        if sum(counted) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tune([TINY], [1, 16], callbacks=[stop_after_the_first_study], **kwargs)
    assert set(read_table(tmp_path / "out" / CPU_TABLE)["entries"]["graph"][TINY.key]) == {"1"}
    table = tune([TINY], [1, 16], **kwargs)
    assert set(table["entries"]["graph"][TINY.key]) == {"1", "16"}
    assert read_table(tmp_path / "out" / CPU_TABLE)["entries"] == table["entries"]


@dataclass(frozen=True)
class _FlakyProvider(Provider):
    """The torch provider, except that every call raises ``failure`` while it is set."""

    name: str = "test_flaky"
    description: str = "fails while told to"
    failure: list = field(default_factory=list, compare=False)

    def build(self, spec, config):
        inner = get_provider("torch").callable_for(spec, {})

        def run(positions, query, key, cos_sin_cache):
            if self.failure:
                raise self.failure[0]
            inner(positions, query, key, cos_sin_cache)

        return run


@pytest.mark.parametrize(
    ("failure", "outcome"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "transient"),
        (ImportError("libflashinfer.so: cannot open shared object file"), "transient"),
        (RuntimeError("an unspecified launch failure"), "error"),
    ],
    ids=["out-of-memory", "load-failure", "kernel-error"],
)
def test_a_study_that_measured_nothing_is_retried_by_the_next_run(
    tmp_path, registered, failure, outcome
):
    provider = registered(_FlakyProvider(failure=[failure]))
    storage = open_storage(tmp_path / "s.journal")
    kwargs = dict(
        device="cpu", providers=[provider.name], trials=2, storage=storage, seed=0,
        progress=False, time_kwargs=QUICK,
    )  # fmt: skip
    table = tune([TINY], [3], **kwargs)
    assert not table["entries"]["graph"]  # nothing measured: nothing in the table
    (study,) = [s for s in storage.get_all_studies() if "#claim" not in s.study_name]
    trials = storage.get_all_trials(study._study_id)
    assert trials and {t.user_attrs.get("outcome") for t in trials} == {outcome}
    assert "complete" not in study.user_attrs

    provider.failure.clear()  # the memory is free again, the library loads
    table = tune([TINY], [3], **kwargs)
    assert table["entries"]["graph"][TINY.key]["3"]["provider"] == provider.name


def test_timed_rounds_hold_no_compile_whatever_ran_before(monkeypatch):
    """torch.compile recompiles when the token count first leaves its specialization (1 to
    16): the warm-up takes that recompile, the timed rounds never do, in either order."""
    from torch._dynamo.utils import counters

    fn = get_provider("torch_compile").callable_for(TINY, {})
    compiles_while_timed = []
    time_wall = measure._time_wall

    def watched(*args, **kwargs):
        before = counters["stats"]["unique_graphs"]
        result = time_wall(*args, **kwargs)
        compiles_while_timed.append(counters["stats"]["unique_graphs"] - before)
        return result

    monkeypatch.setattr(measure, "_time_wall", watched)
    for tokens in (1, 16, 1, 7):
        measure.time_rope(fn, TINY, tokens, "cpu", seed=0, **QUICK)
    assert compiles_while_timed == [0, 0, 0, 0]
    assert counters["stats"]["unique_graphs"] >= 2  # the recompile happened, in the warm-up
