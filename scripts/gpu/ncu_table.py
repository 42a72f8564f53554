#!/usr/bin/env python3
"""Per-kernel GPU time from an `ncu --csv --metrics gpu__time_duration.sum` log (scripts/gpu/gpu_suite.sh).

    python3 scripts/gpu/ncu_table.py LOG --last N [--per NAME:K] [--top 14]

Sums the durations of the last N profiled kernels by kernel name (templates and arguments cut) and
prints them, largest first. With --per NAME:K the sums are divided by (launches of NAME) / K, e.g.
`--per tca_score_stats:16` gives microseconds per compaction of a 16-layer model.
"""
import argparse
import collections
import csv


def read(path):
    hdr, rows = None, []
    with open(path, newline="") as f:
        for r in csv.reader(f):
            if "Kernel Name" in r:
                hdr = r
                continue
            if hdr and len(r) == len(hdr):
                rows.append(dict(zip(hdr, r)))
    return rows


def micros(d):
    v = float(d["Metric Value"].replace(",", ""))
    unit = d.get("Metric Unit", "ns")
    return v / 1000.0 if unit in ("nsecond", "ns") else v if unit in ("usecond", "us") else v * 1000.0


BYTES = {"byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "KB": 1e3, "MB": 1e6, "GB": 1e9}


def short(name):
    name = name.split("(")[0]
    name = name.replace("void ", "").replace("<unnamed>::", "")
    return name[:60]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("log")
    ap.add_argument("--last", type=int, default=0, help="only the last N kernels (0: all)")
    ap.add_argument("--per", default=None, help="NAME:K -> divide by launches(NAME)/K")
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--label", default="")
    a = ap.parse_args()
    rows = read(a.log)
    # one row a (kernel, metric): the time rows, and DRAM bytes read where the log has them
    byts = {d.get("ID"): float(d["Metric Value"].replace(",", "")) * BYTES.get(d.get("Metric Unit", "byte"), 1.0)
            for d in rows if d.get("Metric Name") == "dram__bytes_read.sum"}
    rows = [d for d in rows if d.get("Metric Name", "gpu__time_duration.sum") == "gpu__time_duration.sum"]
    sel = rows[-a.last:] if a.last else rows
    tot, cnt, mb = collections.defaultdict(float), collections.Counter(), collections.defaultdict(float)
    for d in sel:
        k = short(d["Kernel Name"])
        tot[k] += micros(d)
        cnt[k] += 1
        mb[k] += byts.get(d.get("ID"), 0.0) / 1e6
    div, unit = 1.0, "us"
    if a.per:
        name, k = a.per.rsplit(":", 1)
        n = sum(c for key, c in cnt.items() if key.startswith(name))
        if n:
            div, unit = n / float(k), f"us per {n // int(k)}-th ({name} x{k})"
    print(f"{a.label}{len(rows)} kernels profiled; {len(sel)} counted: {sum(tot.values()) / div:.0f} {unit}")
    for k, v in sorted(tot.items(), key=lambda x: -x[1])[:a.top]:
        bw = f"  {mb[k] / div:8.1f} MB {mb[k] / v:5.2f} TB/s" if byts else ""
        print(f"  {v / div:9.1f}  {cnt[k] / div:7.1f}x{bw}  {k}")


if __name__ == "__main__":
    main()
