"""Run one arm of `tca-ggml eval` on the same jobs (same seed, lengths, tasks) and score each RULER
answer with RULER's own scorer: to compare TCA options against each other (or add samples to an
earlier run) without repeating every arm. The dense arm reads/writes the eval's dense cache.

    python scripts/eval_tca_arm.py -m MODEL.gguf --tasks niah_multikey_2,vt --ruler-lengths 8192 \
        --ruler-samples 4 --first-sample 2 --tca-opt prefill=early --threads 1 -o OUT.json
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
    ap.add_argument("--ruler-lengths", default=None)
    ap.add_argument("--ruler-samples", default=None)
    ap.add_argument("--first-sample", type=int, default=0, help="skip RULER samples with a lower index")
    ap.add_argument("--tca-opt", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--tca-density", type=float, default=None)
    ap.add_argument("--arm", choices=["tca", "dense"], default="tca")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args()
    cfg = E.make_config(a.model, lengths=[int(x) for x in a.lengths.split(",")], tasks=a.tasks.split(","),
                        ruler_lengths=[int(x) for x in a.ruler_lengths.split(",")] if a.ruler_lengths else None,
                        ruler_samples=a.ruler_samples, tca_opts=E.parse_tca_opts(a.tca_opt),
                        tca_density=a.tca_density, threads=a.threads, seed=a.seed)
    jobs = [j for j in E.build_jobs(cfg) if j.family != "ruler" or j.params["index"] >= a.first_sample]
    t = time.time()
    cache = None
    if a.arm == "dense":
        from tca_ggml.evalkit.cache import DenseCache
        cache = DenseCache(cfg.cache_dir, cfg.model, enabled=cfg.cache, strict=cfg.cache_strict)
    res = E.run_arm(cfg, a.arm, jobs, log=lambda m: print(m, flush=True), cache=cache)
    rows = []
    for j, r in zip(jobs, res["results"]):
        row = {"task": j.task, "length": j.length, "params": j.params, "answer": r.get("answer"),
               "kept": r.get("tca", {}).get("kept_share")}
        if j.family == "ruler":
            row["score"] = E.ruler_score(j.task, r["answer"], j.expected)
        rows.append(row)
    sc = [r["score"] for r in rows if "score" in r]
    print(f"{a.arm} {res['label']} {dict(cfg.tca_opts)}: {len(sc)} RULER prompts, mean {sum(sc) / max(1, len(sc)):.1f}; "
          f"seconds {time.time() - t:.1f}")
    with open(a.output, "w") as f:
        json.dump({"label": res["label"], "options": dict(cfg.tca_opts), "rows": rows, "raw": res}, f, default=str, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
