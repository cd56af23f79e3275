"""What the guards cost per step: the step's agreement (callbacks' vetoes, the non-finite check and the one
all-reduce that also carries the stop signal and failures) and the guard callbacks after the step (non-finite
counter, spike detector over its window), timed inside a real training run, against the step's own time.

    python tools/bench_guard.py                                     # one process, CPU
    torchrun --nproc_per_node 2 tools/bench_guard.py                # two ranks (gloo)
Last line: guard_us_per_step=<median> step_ms=<median> guard_share=<guard / step>
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--workdir", default=None)
    p.add_argument("overrides", nargs="*", help="extra bigtrain config overrides")
    a = p.parse_args()
    import helpers
    import torch.distributed as dist

    from bigtrain.config import load_config
    from bigtrain.parallel import setup
    from bigtrain.train import loop
    from bigtrain.train.guard import NonFiniteGuard, SpikeDetector

    env, _ = setup("gloo")
    work = a.workdir or tempfile.mkdtemp(prefix="bench-guard-")
    box = [helpers.test_data(os.path.join(work, "data")) if env.rank == 0 else None,
           os.path.join(work, f"run-{time.time_ns()}")]
    dist.broadcast_object_list(box)  # rank 0's data and run directory, for every rank
    spent = {"agree": [], "after": []}

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[key].append(time.perf_counter() - t0)
        return wrapper

    loop.Trainer._agree = timed(loop.Trainer._agree, "agree")
    for cls in (NonFiniteGuard, SpikeDetector):
        cls.after_step = timed(cls.after_step, "after")
    cfg = load_config(None, helpers.tiny(box[0], box[1], f"train.steps={a.steps}",
                                         "guard.spike_warmup=5", "guard.spike_metrics=[loss, grad_norm]", *a.overrides))
    result = loop.train(cfg)
    if env.rank == 0:
        warm = a.steps // 5  # leave out the first steps (allocations, first collectives)
        steps = [r["step_seconds"] for r in result.history[warm:]]
        agree = spent["agree"][warm:]
        after = [sum(spent["after"][2 * i:2 * i + 2]) for i in range(warm, len(spent["after"]) // 2)]
        guard = statistics.median(agree) + statistics.median(after)
        step = statistics.median(steps)
        print(f"ranks={env.world}: agreement {statistics.median(agree) * 1e6:.0f} us (incl. the all-reduce that "
              f"carried the stop signal before), guard callbacks {statistics.median(after) * 1e6:.0f} us, step "
              f"{step * 1e3:.1f} ms (median of {len(steps)} steps)")
        print(f"guard_us_per_step={guard * 1e6:.0f} step_ms={step * 1e3:.1f} guard_share={guard / step:.4f}")


if __name__ == "__main__":
    main()
