"""SLURM on a real two-node cluster on this host (tools/slurm/start.sh --nodes 2: slurmctld, a slurmd per node,
slurmdbd + MariaDB, munge),
CPU, 2 tasks, no mocks: `bigtrain submit` through submitit (to completion; interrupted by a real time limit; on two
nodes, interrupted by a killed rank, a hang, `scontrol requeue` and the time-limit signal), the plain sbatch templates
(one node, and TP2 x DP2 on two), failures that must not requeue, --dry-run, validation before queueing, and quoting
of user values in the generated script.

The session fixture starts the cluster when it is not up (and stops it afterwards only then). Every job
gets a fresh submitit folder: job ids restart at 1 when a cluster's state is wiped.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOLS = os.path.join(ROOT, "tools", "slurm")
# SLURM checks time limits every 30 s, so with --time 1 and launch.signal_seconds=20 the signal comes 10-40 s
# after the job starts. STEPS keeps training going past that on an idle 2-core machine (~0.04 s a step,
# ~5 s start-up); under load steps are slower and the signal still lands mid-run (or during start-up, where
# it is held back until the first step).
STEPS = 1000
LIMIT_SIGNAL = 20
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED")
JOB_NAME = "bt \"ref\" run's #1 \\ $HOME"
RUN_NAME = "ref \"run\" it's $HOME \\ ;x"


def _run(cmd, timeout=60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout, **kw)


def _cluster_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    try:
        proc = _run(["sinfo", "-h", "-o", "%T"], timeout=20)
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0 and bool(re.search(r"^(idle|mixed|allocated)", proc.stdout, re.M))


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running local cluster: the one already up (e.g. started by .ci/run), else started here and
    stopped at the end of the session."""
    started = False
    if not _cluster_up():
        if os.geteuid() != 0:
            pytest.fail("no SLURM cluster up, and starting one needs root: run `sudo bash tools/slurm/start.sh` first")
        t0 = time.time()
        proc = _run(["bash", os.path.join(TOOLS, "start.sh"), "--nodes", "2"], timeout=900)
        assert proc.returncode == 0, f"tools/slurm/start.sh failed:\n{proc.stdout[-5000:]}"
        print(f"started the local SLURM cluster in {time.time() - t0:.1f} s")
        started = True
        assert _cluster_up()
    yield
    if started:
        _run(["bash", os.path.join(TOOLS, "stop.sh")], timeout=300)


def overrides(data, run_dir, *extra) -> list[str]:
    return helpers.tiny(data, run_dir, f"train.steps={STEPS}", "checkpoint.interval=100", "checkpoint.keep=2", *extra)


def env() -> dict:
    # sbatch exports the submitting environment to the job: no rank variables, one thread per rank (2 cores)
    return helpers.clean_env(OMP_NUM_THREADS="1")


def submit(*args, timeout=600) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "bigtrain", "submit", *args], timeout=timeout, env=env(), cwd=ROOT)


CPU2 = ["--nodes", "1", "--gpus-per-node", "2", "--cpu", "--cpus-per-task", "1"]


def job_id(out: str) -> str:
    m = re.search(r"submitted job (\d+)", out)
    assert m, out
    return m.group(1)


def sacct_state(job: str) -> str:
    out = _run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job]).stdout.split()
    return out[0] if out else "UNKNOWN"


def live_state(job: str) -> str:
    """The controller's view while the job is known to it (sacct lags behind at submission), else sacct's."""
    out = _run(["squeue", "-h", "-j", job, "-o", "%T"]).stdout.split()
    return out[0] if out else sacct_state(job)


def wait_done(job: str, timeout: float = 300) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = sacct_state(job)
        if state.startswith(TERMINAL) and not _run(["squeue", "-h", "-j", job]).stdout.strip():
            return state
        time.sleep(1)
    _run(["scancel", job])
    raise AssertionError(f"job {job} not done after {timeout} s (state {sacct_state(job)})")


def show_job(job: str) -> dict:
    """`scontrol show job` as a dict (names and paths hold the rest of their line: they may have spaces)."""
    out = _run(["scontrol", "show", "job", job]).stdout
    info = {}
    for key in ("JobName", "StdOut", "StdErr", "WorkDir", "Command"):
        m = re.search(rf"\b{key}=(.*)$", out, re.M)
        if m:
            info[key] = m.group(1)
    for k, v in re.findall(r"(\w+)=(\S*)", out):
        info.setdefault(k, v)
    return info


def slurm_restart_gap(job: str) -> float:
    """Seconds from the end of the job's first run (its requeue) to the start of its second, per sacct."""
    import datetime
    out = _run(["sacct", "-n", "-X", "-P", "-D", "-o", "State,Start,End", "-j", job]).stdout
    rows = [r.split("|") for r in out.splitlines()]
    try:
        t = [datetime.datetime.fromisoformat(rows[1][1]), datetime.datetime.fromisoformat(rows[0][2])]
    except (IndexError, ValueError):
        return float("nan")
    return (t[0] - t[1]).total_seconds()


def events(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "events.jsonl")) as f:
        return [json.loads(line) for line in f]


def log_text(folder: str, job: str, rank: int = 0) -> str:
    text = ""
    for ext in ("out", "err"):
        p = os.path.join(folder, f"{job}_{rank}_log.{ext}")
        if os.path.exists(p):
            text += open(p).read()
    return text


def jobs_submitted() -> int:
    """slurmctld's count of submitted jobs (immediate, unlike sacct, whose records of finished jobs may lag)."""
    out = _run(["sdiag"]).stdout
    return int(re.search(r"Jobs submitted:\s*(\d+)", out).group(1))


def test_submit_runs_to_completion(slurm_cluster, data, tmp_path):
    """`bigtrain submit --wait` (2 CPU ranks) to the end; its job name and one override carry spaces, quotes, `#`,
    `$` and a backslash."""
    run_dir, steps = str(tmp_path / "run"), 20
    t0 = time.time()
    proc = submit("/dev/null", *helpers.tiny(data, run_dir, f"train.steps={steps}", f"run.name={RUN_NAME}"), *CPU2,
                  "--time", "10", "--job-name", JOB_NAME, "--wait")
    print(f"bigtrain submit --wait: {time.time() - t0:.1f} s")
    assert proc.returncode == 0, proc.stdout[-6000:]
    job = job_id(proc.stdout)
    assert f"job {job}: COMPLETED" in proc.stdout
    folder = os.path.join(run_dir, "slurm")
    assert f"logs: {folder}/{job}_<rank>_log.out" in proc.stdout
    rows = helpers.read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert [e["event"] for e in events(run_dir) if e["event"] != "checkpoint"] == ["start"]
    assert events(run_dir)[0]["restart"] == 0
    # one task per rank, each with its own log; both trained in one process group
    for rank in (0, 1):
        assert os.path.exists(os.path.join(folder, f"{job}_{rank}_log.out"))
        assert f"rank {rank}/2 on" in log_text(folder, job, rank)
    # the job name and the override went through the script and SLURM unchanged
    assert show_job(job)["JobName"] == JOB_NAME
    from bigtrain.config import load_config
    assert load_config(os.path.join(run_dir, "config.yaml")).run.name == RUN_NAME


def test_time_limit_signal_checkpoints_requeues_and_resumes(slurm_cluster, data, tmp_path):
    """A real time limit: --time 1 with launch.signal_seconds=20, so SLURM's USR2 comes mid-run. bigtrain
    checkpoints at the next step boundary, rank 0 requeues the job once, the job resumes where it stopped and
    finishes; `--wait` follows the job across the requeue. (Once the requeue is seen, the test raises the pending
    job's limit so that the second run finishes instead of being stopped again: that keeps the test's time bounded.
    That a resume after the signal continues bit for bit is checked on two nodes, against an uninterrupted run.)"""
    run_dir = str(tmp_path / "run")
    t0 = time.time()
    cmd = [sys.executable, "-m", "bigtrain", "submit", "/dev/null",
           *overrides(data, run_dir, f"launch.signal_seconds={LIMIT_SIGNAL}"), *CPU2, "--time", "1",
           "--job-name", "bt-timelimit", "--wait"]
    proc = subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first = ""
        while "submitted job" not in first:  # skip start-up warnings (stderr is merged)
            line = proc.stdout.readline()
            assert line, first
            first += line
        job = job_id(first)
        folder = os.path.join(run_dir, "slurm")
        deadline = time.time() + 300
        while show_job(job).get("Restarts", "0") == "0":
            state = live_state(job)
            assert time.time() < deadline and not state.startswith(TERMINAL), \
                (state, log_text(folder, job)[-5000:])
            time.sleep(0.2)
        assert _run(["scontrol", "update", f"JobId={job}", "TimeLimit=10"]).returncode == 0
        out = first + proc.communicate(timeout=400)[0]
    finally:
        proc.kill()
    state = wait_done(job)
    print(f"time-limit test: {time.time() - t0:.1f} s")
    assert state == "COMPLETED", log_text(folder, job)[-5000:]
    assert proc.returncode == 0 and f"job {job}: COMPLETED at step {STEPS}" in out, out
    ev = events(run_dir)
    stopped = [e for e in ev if e["event"] == "stopped"]
    requeued = [e for e in ev if e["event"] == "requeue"]
    resumed = [e for e in ev if e["event"] == "resume"]
    assert len(stopped) == 1 and stopped[0]["reason"] == "SIGUSR2", ev
    assert len(requeued) == 1 and requeued[0]["action"] == f"requeued job {job}", ev
    assert len(resumed) == 1 and resumed[0]["restart"] == 1 and resumed[0]["step"] == stopped[0]["step"], ev
    assert 0 < stopped[0]["step"] < STEPS
    print(f"stopped at step {stopped[0]['step']}; requeue -> resumed training: "
          f"{resumed[0]['time'] - requeued[0]['time']:.1f} s (SLURM restarted the job after {slurm_restart_gap(job):.0f} s)")
    log = log_text(folder, job)
    # submitit's own handlers (USR2: checkpoint + requeue; SIGTERM: bypass) never ran
    for line in ("Caught signal SIGUSR2", "Bypassing signal SIGUSR2", "Bypassing signal SIGTERM", "Requeued job"):
        assert line not in log, line
    rows = helpers.read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))


def _sbatch(template: str, folder: str, *args: str, options=()) -> str:
    # the templates ask for GPUs: command-line options override their #SBATCH lines for this CPU node
    cmd = ["sbatch", "--parsable", *options, "--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1", "--mem=1G",
           "--time=10", f"--output={folder}/%j.out", os.path.join(ROOT, "slurm", template), *args]
    proc = _run(cmd, env=dict(env(), BIGTRAIN_PYTHON=sys.executable), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout
    return proc.stdout.strip().split(";")[0]


def test_sbatch_template_trains_to_completion(slurm_cluster, data, tmp_path):
    run_dir = str(tmp_path / "run dir")  # a space: the template passes "$@" through unchanged
    t0 = time.time()
    job = _sbatch("single_node.sbatch", str(tmp_path), os.devnull,
                  *helpers.tiny(data, run_dir, "train.steps=10", f"run.name={RUN_NAME}"))
    state = wait_done(job)
    print(f"sbatch single_node.sbatch: {time.time() - t0:.1f} s")
    log = open(tmp_path / f"{job}.out").read()
    assert state == "COMPLETED", log[-5000:]
    assert "bigtrain exited with status 0" in log
    assert [r["step"] for r in helpers.read_metrics(run_dir)] == list(range(1, 11))
    ev = events(run_dir)
    assert ev[0]["event"] == "start" and ev[0]["world"] == 2 and ev[0]["launcher"] == "slurm", ev
    from bigtrain.config import load_config
    assert load_config(os.path.join(run_dir, "config.yaml")).run.name == RUN_NAME


def test_multi_node_template_keeps_tp_in_a_node_and_matches_one_process(slurm_cluster, data, tmp_path):
    """slurm/multi_node.sbatch on the two-node cluster: 2 nodes x 2 tasks, TP2 inside each node (megatron's rank
    order: ranks 0-1 on the first node) x DP2 across the nodes; per-step fp32 losses equal one process's."""
    nodes = _run(["sinfo", "-h", "-N", "-o", "%N"]).stdout.split()
    assert len(set(nodes)) >= 2, f"the multi-node tests need `tools/slurm/start.sh --nodes 2` (nodes: {nodes})"
    run_dir = str(tmp_path / "run")
    overrides = helpers.tiny(data, run_dir, "train.steps=8", "parallel.tensor=2")
    t0 = time.time()
    job = _sbatch("multi_node.sbatch", str(tmp_path), os.devnull, *overrides, options=["--nodes=2"])
    state = wait_done(job)
    print(f"sbatch multi_node.sbatch on 2 nodes: {time.time() - t0:.1f} s")
    log = open(tmp_path / f"{job}.out").read()
    assert state == "COMPLETED", log[-5000:]
    assert re.search(r"on 127\.0\.0\.\[2-3\]: 4 ranks, master 127\.0\.0\.2:", log), log[:2000]
    ev = events(run_dir)
    assert ev[0]["world"] == 4 and ev[0]["launcher"] == "slurm", ev
    got = [r["loss"] for r in helpers.read_metrics(run_dir)]
    want = helpers.reference_losses(str(tmp_path), helpers.tiny(data, "", "train.steps=8"))  # one process
    assert helpers.max_rel_diff(got, want) < 1e-5, (got, want)


def _wait_for(job: str, folder: str, ready, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not ready():
        state = live_state(job)
        assert time.time() < deadline and not state.startswith(TERMINAL), (state, log_text(folder, job)[-5000:])
        time.sleep(0.2)


def test_submit_on_two_nodes_survives_a_killed_rank_a_hang_a_preemption_and_a_time_limit(slurm_cluster, data, tmp_path):
    """`bigtrain submit --nodes 2` on the two-node cluster, PP2 across the nodes (stage 0 = rank 0 on the first node,
    stage 1 = rank 1 on the second), one job interrupted four ways, each followed by SLURM starting it again:
    1. rank 1 is killed (SIGKILL, debug.faults kind `kill`, first run only) in step 151: rank 0's collective fails,
       rank 1 left no error note, so rank 0 calls it a lost rank, requeues the job (exit 124) and the second run
       resumes from the step-100 checkpoint;
    2. rank 1 sleeps inside step 171 of the second run (kind `hang`): both watchdogs give up after
       watchdog.step_timeout and dump their stacks, one rank requeues, the third run resumes from step 100 again and
       its events name the hang;
    3. `scontrol requeue` mid-run (what preemption with requeue does): SIGTERM -> checkpoint at the next step
       boundary -> restart 3 resumes there;
    4. the time-limit signal (USR2, what submit's --signal=USR2@N sends to the job's tasks) mid-run: checkpoint, rank 0
       requeues -> restart 4 finishes.
    Every step's loss (the last run of each step) equals, bit for bit, that of the same layout run uninterrupted
    under torchrun (started beside the job); its first 50 steps equal one process's within 1e-5."""
    nodes = _run(["sinfo", "-h", "-N", "-o", "%N"]).stdout.split()
    assert len(set(nodes)) >= 2, f"the multi-node tests need `tools/slurm/start.sh --nodes 2` (nodes: {nodes})"
    run_dir, steps = str(tmp_path / "run"), 300
    faults = ("debug.faults=[{kind: kill, batch: 150, rank: 1, restart: 0}, "
              "{kind: hang, batch: 170, rank: 1, value: 3600, restart: 1}]")
    common = [f"train.steps={steps}", "parallel.pipeline=2"]
    t0 = time.time()
    uninterrupted = str(tmp_path / "uninterrupted")
    ref = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                            str(helpers.free_port()), "--no-python", "bigtrain", "train", os.devnull,
                            *helpers.tiny(data, uninterrupted, *common)], env=env(), cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        proc = submit("/dev/null", *helpers.tiny(data, run_dir, *common, "checkpoint.interval=100", "checkpoint.keep=2",
                                                 "watchdog.step_timeout=5", faults),
                      "--nodes", "2", "--gpus-per-node", "1", "--cpu", "--cpus-per-task", "1", "--time", "10",
                      "--job-name", "bt-two-nodes")
        assert proc.returncode == 0, proc.stdout
        job = job_id(proc.stdout)
        folder = os.path.join(run_dir, "slurm")

        def resumed(restart):
            return [e for e in events(run_dir) if e["event"] == "resume" and e["restart"] == restart]

        def last_step():
            rows = helpers.read_metrics(run_dir) if os.path.exists(os.path.join(run_dir, "metrics.jsonl")) else []
            return rows[-1]["step"] if rows else 0

        # 1. the killed rank, 2. the hang: both resume at step 100
        _wait_for(job, folder, lambda: os.path.exists(os.path.join(run_dir, "events.jsonl")) and resumed(2)
                  and last_step() >= 150)
        t_preempt = time.time()
        assert _run(["scontrol", "requeue", job]).returncode == 0
        # 3. the preemption, then 4. the time-limit signal
        _wait_for(job, folder, lambda: resumed(3) and last_step() >= resumed(3)[0]["step"] + 20)
        t_limit = time.time()
        assert _run(["scancel", "--signal=USR2", job]).returncode == 0
        state = wait_done(job, timeout=400)
        print(f"two-node submit, kill -9 + hang + scontrol requeue + time-limit signal: {time.time() - t0:.1f} s")
        logs = log_text(folder, job, 0) + log_text(folder, job, 1)
        assert state == "COMPLETED", logs[-6000:]
        assert show_job(job).get("Restarts") == "4"
        assert re.search(r"rank 0/2 on 127\.0\.0\.2", log_text(folder, job, 0)), log_text(folder, job, 0)[:3000]
        assert re.search(r"rank 1/2 on 127\.0\.0\.3", log_text(folder, job, 1)), log_text(folder, job, 1)[:3000]
        with open(os.path.join(run_dir, "hangs", "hangs.jsonl")) as f:
            records = [json.loads(line) for line in f]
        lost = [h for h in records if h["restart"] == 0]
        hangs = [h for h in records if h["restart"] == 1]
        assert len(records) == len(lost) + len(hangs)
        # 1. the kill: rank 0 found no error note, called it a lost rank and requeued the job
        assert [(h["kind"], h["rank"], h["step"], h["requeue"]) for h in lost] == [("lost rank", 0, 150, True)], lost
        assert "bigtrain: error: rank 0: lost rank: another rank is gone without an error of its own" in logs
        # 2. the hang: both ranks' watchdogs, stacks of both, one requeue
        assert {h["rank"] for h in hangs} == {0, 1} and {h["step"] for h in hangs} == {170}, hangs
        assert all(h["kind"] == "hang" and h["job"] == job and h["phase"] == "step" for h in hangs), hangs
        assert any(h["requeue"] for h in hangs)
        for rank in (0, 1):
            assert os.path.getsize(os.path.join(run_dir, "hangs", f"restart1-rank{rank}.txt")) > 0
        assert re.search(r"bigtrain: error: rank \d: hang: step took more than 5 s \(watchdog.step_timeout\) at step "
                         r"170;", logs), logs[-5000:]
        assert f"requeued job {job}; it resumes from its last checkpoint" in logs
        ev = events(run_dir)
        assert [(e["event"], e["step"]) for e in ev if e["event"] in ("lost_rank", "hang")] == \
            [("lost_rank", 150), ("hang", 170)], ev
        assert resumed(1)[0]["step"] == 100 and resumed(2)[0]["step"] == 100, ev
        # 3. and 4.: a SIGTERM stop and a time-limit stop, each resumed where it stopped
        stopped = [e for e in ev if e["event"] == "stopped"]
        assert [e["reason"] for e in stopped] == ["SIGTERM", "SIGUSR2"], ev
        assert resumed(3)[0]["step"] == stopped[0]["step"] and resumed(4)[0]["step"] == stopped[1]["step"], ev
        assert 150 <= stopped[0]["step"] < stopped[1]["step"] < steps, ev
        print(f"resumed: after the kill {resumed(1)[0]['time'] - lost[0]['time']:.1f} s, after the hang "
              f"{resumed(2)[0]['time'] - max(h['time'] for h in hangs):.1f} s, after scontrol requeue "
              f"{resumed(3)[0]['time'] - t_preempt:.1f} s, after the time-limit signal "
              f"{resumed(4)[0]['time'] - t_limit:.1f} s")
        got = {r["step"]: r["loss"] for r in helpers.read_metrics(run_dir)}
        assert sorted(got) == list(range(1, steps + 1))
        out = ref.communicate(timeout=300)[0]
        assert ref.returncode == 0, out[-3000:]
        assert [got[s] for s in sorted(got)] == helpers.losses(uninterrupted)
        want = helpers.reference_losses(str(tmp_path), helpers.tiny(data, "", *common[:1]))  # one process
        assert helpers.max_rel_diff([got[s] for s in range(1, 51)], want[:50]) < 1e-5
    finally:
        ref.kill()


def test_failing_job_is_not_requeued(slurm_cluster, data, tmp_path):
    """A config error (the same for a code error: exit 1) ends the job FAILED; nothing requeues it."""
    run_dir = str(tmp_path / "run")
    job = _sbatch("multi_node.sbatch", str(tmp_path), os.devnull, *helpers.tiny(data, run_dir, "model.hidden_size=65"),
                  options=["--nodes=1"])
    state = wait_done(job)
    log = open(tmp_path / f"{job}.out").read()
    assert state == "FAILED", log
    assert "bigtrain: error: config key 'model.hidden_size'" in log
    # rank 0 exits 2; srun's --kill-on-bad-exit then ends rank 1 (srun reports the highest status)
    assert re.search(r"bigtrain exited with status [1-9]", log), log
    exit_code = _run(["sacct", "-n", "-X", "-P", "-o", "ExitCode", "-j", job]).stdout.strip()
    assert exit_code != "0:0", exit_code
    assert show_job(job).get("Restarts") == "0"
    # only one record of the job: it never went through REQUEUED
    states = _run(["sacct", "-n", "-X", "-P", "-D", "-o", "State", "-j", job]).stdout.split()
    assert states == ["FAILED"], states
    assert not os.path.exists(os.path.join(run_dir, "checkpoints"))


def test_dry_run_prints_the_script_and_queues_nothing(slurm_cluster, data, tmp_path):
    run_dir = str(tmp_path / "run")
    before = jobs_submitted()
    proc = _run([sys.executable, "-m", "bigtrain", "submit", "/dev/null",
                 *overrides(data, run_dir, "train.micro_batch_size=1", "launch.signal_seconds=90"),
                 "--nodes", "2", "--gpus-per-node", "4", "--time", "30", "--partition", "gpu", "--account", "my acct",
                 "--dry-run"], env=env(), cwd=ROOT, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out
    for line in ("#!/bin/bash", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --signal=USR2@90", "#SBATCH --requeue", "#SBATCH --time=30", "#SBATCH --partition=gpu",
                 '#SBATCH --account="my acct"', "#SBATCH --open-mode=append"):
        assert line in out.splitlines(), (line, out)
    assert re.search(r"^srun .*--kill-on-bad-exit=1 .*-m submitit\.core\._submit ", out, re.M), out
    assert f"--output {run_dir}/slurm/%j_%t_log.out" in out
    assert "dry run: nothing submitted" in out
    assert jobs_submitted() == before
    assert not os.path.exists(os.path.join(run_dir, "slurm"))
    # --cpu: no GPU request
    proc = _run([sys.executable, "-m", "bigtrain", "submit", "/dev/null", *overrides(data, run_dir), *CPU2,
                 "--dry-run"], env=env(), cwd=ROOT, timeout=300)
    assert proc.returncode == 0 and "#SBATCH --ntasks-per-node=2" in proc.stdout
    assert "gpus" not in proc.stdout


@pytest.mark.parametrize("bad, key", [
    ("parallel.tensr=2", "parallel.tensr"),                  # unknown key
    ("parallel.tensor=4", "parallel.tensor"),                # does not divide the 2 ranks of the job
    ("launch.signal_seconds=600", "launch.signal_seconds"),  # longer than --time 5
])
def test_bad_config_fails_before_queueing(slurm_cluster, data, tmp_path, bad, key):
    run_dir = str(tmp_path / "run")
    before = jobs_submitted()
    proc = submit("/dev/null", *overrides(data, run_dir, bad), *CPU2, "--time", "5", timeout=300)
    assert proc.returncode == 2, proc.stdout
    errors = [line for line in proc.stdout.splitlines() if line.startswith("bigtrain: error:")]
    assert len(errors) == 1 and key in errors[0], proc.stdout
    assert "Traceback" not in proc.stdout
    assert jobs_submitted() == before
    assert not os.path.exists(run_dir)


def test_user_values_are_quoted_in_the_script(slurm_cluster, data, tmp_path):
    """Job name and override values with spaces, quotes, `#`, `$`, backslashes and `;` survive the generated
    script: bash reads the recorded command back exactly, and SLURM reads the job name back exactly."""
    run_dir = str(tmp_path / "run")
    odd = ["run.name=" + RUN_NAME, "run.dir=" + run_dir + "/it's a \"dir\""]
    proc = _run([sys.executable, "-m", "bigtrain", "submit", "/dev/null", *overrides(data, run_dir), *odd, *CPU2,
                 "--job-name", JOB_NAME, "--folder", str(tmp_path / "job folder"), "--dry-run"],
                env=env(), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout
    script = proc.stdout.split("[bigtrain submit] dry run")[0]
    path = tmp_path / "script.sh"
    path.write_text(script)
    assert _run(["bash", "-n", str(path)]).returncode == 0
    # bash reads the recorded command back element by element
    line = next(x for x in script.splitlines() if x.startswith("bigtrain_command=("))
    back = _run(["bash", "-c", line + '\nprintf "%s\\0" "${bigtrain_command[@]}"']).stdout.split("\0")[:-1]
    assert back == ["bigtrain", "train", "/dev/null", *overrides(data, run_dir), *odd]
    # SLURM reads the #SBATCH values back exactly (held, so it never runs)
    held = _run(["sbatch", "--parsable", "--hold", str(path)], cwd=str(tmp_path))
    assert held.returncode == 0, held.stdout
    job = held.stdout.strip().split(";")[0]
    try:
        info = show_job(job)
        assert info["JobName"] == JOB_NAME
        assert info["StdOut"] == f"{tmp_path}/job folder/{job}_0_log.out"
    finally:
        _run(["scancel", job])
    # control characters cannot be carried by an #SBATCH line: refused before queueing
    proc = submit("/dev/null", *overrides(data, run_dir), *CPU2, "--job-name", "two\nlines", "--dry-run")
    assert proc.returncode == 2 and "bigtrain: error: --job-name" in proc.stdout, proc.stdout


GUARD = r"""
import os, signal, sys, time
from bigtrain.launch.job import _SignalGuard

def wait(cond, seconds=5):
    end = time.time() + seconds
    while not cond() and time.time() < end:
        time.sleep(0.02)
    return cond()

mode = sys.argv[1]
guard = _SignalGuard()
if mode == "term":
    os.kill(os.getpid(), signal.SIGTERM)   # before training: exits 75 at once
    time.sleep(5)
    sys.exit(0)
os.kill(os.getpid(), signal.SIGUSR2)       # before training: held back
time.sleep(0.3)
got = []
previous = {s: signal.signal(s, lambda n, f: got.append(n))     # what StopRequest does when training starts
            for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)}
print("delivered:", wait(lambda: got) and got, flush=True)
for s, h in previous.items():                                  # StopRequest.restore_handlers
    signal.signal(s, h)
guard.close()
os.kill(os.getpid(), signal.SIGUSR2)       # after training: ignored
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.2)
print("alive", got, flush=True)
"""


@pytest.mark.parametrize("mode", ["usr2", "term"])
def test_signal_guard_outside_the_training_loop(mode):
    """The job's handlers before/after bigtrain's StopRequest owns the signals: a time-limit signal that
    comes during start-up is handed to StopRequest once it is installed (exactly once); SIGTERM during
    start-up exits 75; signals after training are ignored. (No cluster needed.)"""
    proc = _run([sys.executable, "-c", GUARD, mode], env=env(), cwd=ROOT, timeout=60)
    if mode == "term":
        assert proc.returncode == 75, proc.stdout
        assert "SIGTERM before training started" in proc.stdout
    else:
        assert proc.returncode == 0, proc.stdout
        assert f"delivered: [{int(signal.SIGUSR2)}]" in proc.stdout
        assert f"alive [{int(signal.SIGUSR2)}]" in proc.stdout
        assert "SIGUSR2 after training ended: ignored" in proc.stdout
        assert "SIGTERM after training ended: ignored" in proc.stdout
