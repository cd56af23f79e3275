"""The watchdog's pure parts: phase budgets derived from measured step times, the requeue decision after a hang,
the straggler report's figures, NCCL's diagnostics defaults, and the config keys scripts rely on."""
import pytest

from bigtrain.config import ConfigError, load_config
from bigtrain.parallel.distributed import nccl_debug_env
from bigtrain.train.stragglers import straggler_fields
from bigtrain.train.watchdog import Watchdog, requeue_decision


def watchdog(*overrides):
    return Watchdog(load_config(None, list(overrides)), rank=0)


def test_the_first_step_gets_its_own_budget_then_the_budget_follows_measured_steps():
    w = watchdog("watchdog.first_step_timeout=300", "watchdog.min_step_timeout=20", "watchdog.step_timeout_factor=10")
    w.enter("step")
    assert w._state[:2] == ("first step", 300)
    for seconds in (0.5, 3.0, 1.0):
        w.recent.append(seconds)
    w.enter("step")
    assert w._state[:2] == ("step", 30.0)   # 10 x the slowest recent step
    w.recent.clear()
    w.recent.append(0.1)
    w.enter("step")
    assert w._state[:2] == ("step", 20.0)   # never under watchdog.min_step_timeout


def test_a_set_step_timeout_is_used_from_the_first_step_and_phases_nest():
    w = watchdog("watchdog.step_timeout=7", "watchdog.evaluation_timeout=99", "watchdog.checkpoint_timeout=55")
    w.enter("step")
    assert w._state[:2] == ("step", 7)
    with w.phase("evaluation"):
        assert w._state[:2] == ("evaluation", 99)
        with w.phase("checkpoint"):
            assert w._state[:2] == ("checkpoint", 55)
        assert w._state[:2] == ("evaluation", 99)
    assert w._state[:2] == ("step", 7)


def test_the_first_measured_step_of_a_process_is_left_out():
    w = watchdog("watchdog.min_step_timeout=1", "watchdog.step_timeout_factor=2")
    w.after_step(None, {"step_seconds": 100.0})
    w.after_step(None, {"step_seconds": 2.0})
    assert list(w.recent) == [2.0]
    w.enter("step")
    assert w._state[:2] == ("step", 4.0)


HUNG_AT_40 = [{"restart": 0, "step": 40, "phase": "step", "rank": 1}]


@pytest.mark.parametrize("earlier, step, phase, restart, in_slurm, requeue, why", [
    ([], 40, "step", 0, True, True, "requeues itself"),
    ([], 40, "step", 0, False, False, "not under SLURM"),
    (HUNG_AT_40, 40, "first step", 1, True, False, "hung at step 40 in first step before (restart 0)"),
    (HUNG_AT_40, 40, "step", 1, True, False, "the hang comes back"),
    (HUNG_AT_40, 41, "step", 1, True, True, "requeues itself"),
    (HUNG_AT_40, 40, "checkpoint", 1, True, True, "requeues itself"),
    ([], 40, "step", 3, True, False, "3 requeues already (launch.max_requeues=3)"),
])
def test_requeue_after_a_hang_is_bounded_and_never_repeats_a_hang(earlier, step, phase, restart, in_slurm,
                                                                   requeue, why):
    got, text = requeue_decision(earlier, step, phase, restart, max_requeues=3, in_slurm=in_slurm)
    assert got is requeue and why in text, text


def test_straggler_fields_name_the_slowest_rank_and_its_ratio_to_the_median():
    f = straggler_fields([1.0, 1.1, 3.0, 0.9])
    assert f["straggler/slowest_rank"] == 2
    assert f["straggler/median_s"] == pytest.approx(1.05)
    assert f["straggler/ratio"] == pytest.approx(3.0 / 1.05)
    assert straggler_fields([2.0, 2.0])["straggler/ratio"] == 1.0


def test_nccl_diagnostics_are_defaults_the_user_overrides(tmp_path):
    env = nccl_debug_env(str(tmp_path), {"TORCH_NCCL_TRACE_BUFFER_SIZE": "0"})
    assert "TORCH_NCCL_TRACE_BUFFER_SIZE" not in env  # the user's own setting stays
    assert env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1" and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    assert env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == f"{tmp_path}/nccl_trace_rank_"


@pytest.mark.parametrize("item, message", [
    ("watchdog.step_timeout=-1", "config key 'watchdog.step_timeout': expected >= 0"),
    ("watchdog.collective_timeout=0", "config key 'watchdog.collective_timeout': expected > 0"),
    ("watchdog.step_timeout_factor=0.5", "config key 'watchdog.step_timeout_factor': expected >= 1"),
    ("debug.faults=[{kind: freeze}]", "debug.faults"),
])
def test_watchdog_keys_are_checked_in_one_line(item, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [item])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_with_remote_sources_a_derived_step_budget_outlasts_one_shard_read():
    """The loader gives up on a stalled shard (and counts it) before the watchdog calls the step hung."""
    remote = watchdog("data.sources=[{path: 'http://127.0.0.1:9/s-{0..3}.tar'}]", "data.stall_timeout=20",
                      "data.connect_timeout=5", "data.retries=2", "data.retry_backoff=1", "watchdog.min_step_timeout=1")
    remote.recent.append(0.1)
    remote.enter("step")
    assert remote._state[:2] == ("step", 3 * (5 + 20) + 3)
    local = watchdog("watchdog.min_step_timeout=1")
    local.recent.append(0.1)
    local.enter("step")
    assert local._state[:2] == ("step", 1.0)
