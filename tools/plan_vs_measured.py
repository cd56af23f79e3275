"""`bigtrain plan`'s per-rank state bytes against what each rank's DeepSpeed engine holds in real CPU runs of the
test model (tests/helpers.py PLAN_LAYOUTS: 1, 2 and 4 ranks under torchrun, gloo). Prints one table row per rank.

    python tools/plan_vs_measured.py            # all worlds (about a minute on 2 cores)
    python tools/plan_vs_measured.py --worlds 2
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
MARK = "PLAN_VS_MEASURED "


def child(workdir: str) -> None:
    """Under torchrun: every layout of this world; rank 0 prints the rows."""
    import torch.distributed as dist

    import helpers
    from bigtrain.parallel.distributed import setup
    env, _ = setup("gloo", timeout_s=600)
    data = helpers.test_data(os.path.join(workdir, "data")) if env.rank == 0 else None
    box = [data]
    dist.broadcast_object_list(box, src=0)
    for i, case in enumerate(helpers.PLAN_LAYOUTS[env.world]):
        rows = helpers.plan_vs_measured(box[0], os.path.join(workdir, f"run-{env.world}-{i}"), case)
        if env.rank == 0:
            print(MARK + json.dumps(rows), flush=True)


def run_world(world: int, workdir: str) -> list[dict]:
    import helpers
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
           str(helpers.free_port()), os.path.abspath(__file__), "--child", workdir]
    proc = subprocess.run(cmd, env=helpers.clean_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=1800)
    if proc.returncode:
        sys.exit(f"world {world} failed:\n{proc.stdout[-4000:]}")
    return [row for line in proc.stdout.splitlines() if line.startswith(MARK) for row in json.loads(line[len(MARK):])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--workdir", default=None, help="where the corpus and runs go (default: a temporary directory)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child)
    workdir = a.workdir or tempfile.mkdtemp(prefix="plan-vs-measured-")
    print("| layout | ranks | rank | stage | plan (params / grads / optimizer) | measured (params / grads / optimizer) "
          "| plan total | measured total | diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for world in a.worlds:
        for r in run_world(world, workdir):
            diff = (r["measured"] - r["plan"]) / r["plan"]
            print(f"| {r['layout']} | {r['world']} | {r['rank']} | {r['stage']} | "
                  f"{' / '.join(f'{x:,}' for x in r['plan_kinds'])} | "
                  f"{' / '.join(f'{x:,}' for x in r['measured_kinds'])} | {r['plan']:,} | {r['measured']:,} | "
                  f"{diff:+.2%} |", flush=True)


if __name__ == "__main__":
    main()
