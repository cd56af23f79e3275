"""The hang watchdog, measured: its false-positive margin on the quickstart, its cost per step, and the time
from a hang to the job's end.

1. The quickstart (configs/tiny.yaml, one process) with the watchdog on and off, same run otherwise. From the
   run's own step times: for each step the budget the watchdog held (watchdog.step_timeout=0: max(min, factor x
   slowest recent step)) over the step's time -- the margin by which that step stayed inside its budget; the
   smallest over the run is the false-positive margin. Also shown with a 1 ms floor (min_step_timeout=0.001), the
   margin of the derivation alone. Eval and checkpoint phases are timed from events against their budgets.
2. Two ranks (torchrun, gloo), rank 1 frozen with SIGSTOP at batch 20, watchdog.step_timeout=B: seconds from the
   start of the stuck step to the job's end, and the detection latency (that minus B).

    python tools/bench_watchdog.py [--steps 200] [--budget 5]
Last line: fp_margin=<x> fp_margin_no_floor=<x> overhead=<on/off step time ratio> hang_to_exit_s=<s> budget_s=<B>
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


def quickstart(work: str, steps: int, *extra: str) -> tuple[list[dict], list[dict], float]:
    run_dir = os.path.join(work, f"run-{time.time_ns()}")
    cmd = [sys.executable, "-m", "bigtrain", "train", os.path.join(ROOT, "configs", "tiny.yaml"),
           f"train.steps={steps}", f"run.dir={run_dir}", *extra]
    t0 = time.time()
    subprocess.run(cmd, cwd=work, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.time() - t0
    read = lambda name: [json.loads(line) for line in open(os.path.join(run_dir, name))]  # noqa: E731
    return read("metrics.jsonl"), read("events.jsonl"), wall


def margins(seconds: list[float], cfg) -> float:
    """min over steps of (the budget the watchdog held for that step) / (the step's time): a real Watchdog (not
    started) is fed the run's step times, so the budgets are the ones its own derivation gives."""
    from bigtrain.train.watchdog import Watchdog
    w, worst = Watchdog(cfg, rank=0), float("inf")
    for s in seconds:
        w.enter("step")
        worst = min(worst, w._state[1] / s)
        w.after_step(None, {"step_seconds": s})
    return worst


def frozen_rank(work: str, budget: float) -> float:
    import helpers
    data = helpers.test_data(os.path.join(work, "data"))
    run_dir = os.path.join(work, f"hang-{time.time_ns()}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(helpers.free_port()), "--no-python", "bigtrain", "train", os.devnull,
           *helpers.tiny(data, run_dir, "train.steps=500", f"watchdog.step_timeout={budget}",
                         "debug.faults=[{kind: stop, batch: 20, rank: 1}]")]
    subprocess.run(cmd, env=helpers.clean_env(OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=300)
    ended = time.time()
    records = [json.loads(line) for line in open(os.path.join(run_dir, "hangs", "hangs.jsonl"))]
    first = min(records, key=lambda r: r["time"])
    return ended - (first["time"] - first["elapsed"])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--budget", type=float, default=5.0)
    p.add_argument("--workdir", default=None)
    a = p.parse_args()
    from bigtrain.config import load_config
    config = os.path.join(ROOT, "configs", "tiny.yaml")
    cfg = load_config(config)
    w = cfg.watchdog
    work = a.workdir or tempfile.mkdtemp(prefix="bench-watchdog-")
    os.makedirs(os.path.join(work, "data"), exist_ok=True)
    quickstart(work, 2)  # builds the quickstart corpus once (data.prepare), outside the timed runs
    off, _, _ = quickstart(work, a.steps, "watchdog.enabled=false")
    on, events, wall = quickstart(work, a.steps)
    seconds = [r["step_seconds"] for r in on]
    fp = margins(seconds, cfg)
    fp_nofloor = margins(seconds, load_config(config, ["watchdog.min_step_timeout=0.001"]))  # the factor alone
    median_on = statistics.median(seconds[1:])
    median_off = statistics.median(r["step_seconds"] for r in off[1:])
    ckpt = [e.get("stall_s") or 0 for e in events if e["event"] == "checkpoint"]
    print(f"quickstart, {a.steps} steps, one process: step median {median_on * 1e3:.1f} ms (watchdog on), "
          f"{median_off * 1e3:.1f} ms (off): ratio {median_on / median_off:.3f}; slowest step "
          f"{max(seconds[1:]) * 1e3:.0f} ms, first step {seconds[0] * 1e3:.0f} ms; run {wall:.1f} s")
    print(f"false-positive margin (smallest budget/step time over the run): {fp:.0f}x with the defaults "
          f"(min_step_timeout={w.min_step_timeout:g} s, factor {w.step_timeout_factor:g}), {fp_nofloor:.1f}x "
          f"from the factor alone; checkpoint stalls up to {max(ckpt, default=0):.2f} s vs a "
          f"{w.checkpoint_timeout:g} s budget")
    hang = frozen_rank(work, a.budget)
    print(f"rank 1 of 2 frozen (SIGSTOP), watchdog.step_timeout={a.budget:g} s: the job ended {hang:.1f} s after "
          f"the stuck step began ({hang / a.budget:.2f}x the budget; detection latency {hang - a.budget:.1f} s)")
    print(f"fp_margin={fp:.0f} fp_margin_no_floor={fp_nofloor:.1f} overhead={median_on / median_off:.3f} "
          f"hang_to_exit_s={hang:.2f} budget_s={a.budget:g}")


if __name__ == "__main__":
    main()
