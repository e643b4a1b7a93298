"""The tuner under interrupts and failures: nothing measured is lost, nothing failed is frozen,
and what is timed excludes compiling."""

from dataclasses import dataclass, field

import pytest
import torch
from conftest import CPU_TABLE, QUICK, TINY, perf_model_data, put_model

from autotune import open_storage, tune
from autotune.studies import is_counted
from autotune.warm_start import WARM_START_CONFIGS
from kernels import get_provider, measure
from kernels.perf_model import PerfModel, model_file_name
from kernels.providers import Provider
from kernels.table import device_metadata, read_table

MODEL_FILE = model_file_name(device_metadata("cpu")["device_name"])


@pytest.mark.slow
def test_a_stop_right_after_a_studys_last_trial_keeps_its_bucket(tmp_path):
    """The stop lands after the first study's last trial, before the study is flagged
    complete: its bucket is written now, and a resume finishes the other one."""
    kwargs = dict(
        device="cpu", providers=["torch", "triton"], trials=2, storage=tmp_path / "s.journal",
        output=tmp_path / "out", seed=0, progress=False, time_kwargs=QUICK,
    )  # fmt: skip
    counted = []

    def stop_after_the_first_study(study, trial):
        counted.append(is_counted(trial))
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
    (study,) = storage.get_all_studies()
    trials = storage.get_all_trials(study._study_id)
    assert trials and {t.user_attrs.get("outcome") for t in trials} == {outcome}
    assert "complete" not in study.user_attrs

    provider.failure.clear()  # the memory is free again, the library loads
    table = tune([TINY], [3], **kwargs)
    assert table["entries"]["graph"][TINY.key]["3"]["provider"] == provider.name


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_new_study_first_measures_the_models_predicted_configs(tmp_path, dirs):
    """With a performance model for the device, each new study measures every provider's
    default, then the model's best predicted Triton configs, before the sampler proposes."""
    put_model(dirs["env"], perf_model_data(torch_log_us=3.0, triton_log_us=1.0))
    storage = open_storage(tmp_path / "s.journal")
    kwargs = dict(
        device="cpu", providers=["torch", "triton"], storage=storage, seed=0, progress=False,
        time_kwargs=QUICK,
    )  # fmt: skip
    tune([TINY], [4], trials=12, **kwargs)
    (study,) = storage.get_all_studies()
    trials = storage.get_all_trials(study._study_id)
    defaults = [(p, get_provider(p).default_config(TINY, 4)) for p in ("torch", "triton")]
    predicted = [("triton", c) for c in PerfModel.load(dirs["env"] / MODEL_FILE)
                 .rank_configs("triton", TINY, 4, WARM_START_CONFIGS)]  # fmt: skip
    first = [c for c in dict.fromkeys(map(_key, defaults + predicted))]
    measured = [_key((t.user_attrs["provider"], t.user_attrs["config"])) for t in trials]
    assert measured[: len(first)] == first
    assert all(t.user_attrs.get("enqueued") for t in trials[: len(first)])

    # Without the warm start the same budget samples after the defaults.
    other = open_storage(tmp_path / "t.journal")
    tune([TINY], [4], trials=12, warm_start=False, **{**kwargs, "storage": other})
    (study,) = other.get_all_studies()
    enqueued = [t for t in other.get_all_trials(study._study_id) if t.user_attrs.get("enqueued")]
    assert len(enqueued) == len(defaults)


def _key(candidate):
    provider, config = candidate
    return provider, tuple(sorted(config.items()))
