"""The command line shared by the calibration experiments (alpha_sweep.py, compare_modes.py): the
model and the capture / calibration settings they both take."""
import argparse


def capture_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--tau", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=2)
    return ap
