"""Rerun only the TCA arm of `tca-ggml eval` on the same jobs (same seed, lengths, tasks), to
compare a change of the TCA side against an earlier full run without repeating the dense arm.

    python scripts/eval_tca_arm.py -m MODEL.gguf --tasks ruler --lengths 6144 --threads 1 -o OUT.json
"""
import argparse
import json
import time

from tca_ggml import evaluate as E


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--tasks", default="ruler")
    ap.add_argument("--lengths", default="6144")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args()
    cfg = E.make_config(a.model, lengths=[int(x) for x in a.lengths.split(",")], tasks=a.tasks.split(","),
                        threads=a.threads, seed=a.seed)
    jobs = E.build_jobs(cfg)
    t = time.time()
    res = E.run_arm(cfg, "tca", jobs, log=lambda m: print(m, flush=True))
    print(f"seconds {time.time() - t:.1f}")
    with open(a.output, "w") as f:
        json.dump(res, f, default=str, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
