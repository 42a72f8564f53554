"""Measure how the block-score weight alpha (and the mass normalisation) changes calibrated
budgets: one dense capture, then the per-head calibration for several settings.

    python calibration/alpha_sweep.py MODEL.gguf --ctx 8192 --window 4096 --layers 0,6,12,18,23

Prints, per setting, the mean calibrated density of aged blocks and the overall kept share.
"""
import time

import numpy as np

from tca_ggml import calibrate, calibration
from tca_ggml.llama import Llama

from common_args import capture_parser


def main():
    ap = capture_parser()
    ap.add_argument("--layers", default="0,6,12,18,23")
    ap.add_argument("--alphas", default="0,0.25,0.5")
    a = ap.parse_args()
    name, text = calibrate.default_text()
    with Llama(a.model, vocab_only=True, verbose=False) as tok:
        toks = tok.tokenize(text.encode(), add_bos=True)[: a.ctx]
    t0 = time.time()
    cap = calibrate.capture_qk(a.model, toks, n_threads=a.threads, progress=False)
    print(f"capture {a.ctx} tokens: {time.time() - t0:.0f} s")
    mu, sigma, kv = calibration.candidate_grid(a.block)
    layers = [int(x) for x in a.layers.split(",")]
    for alpha in [float(x) for x in a.alphas.split(",")]:
        dens = []
        t1 = time.time()
        for il in layers:
            Q, K = cap.Q[il], cap.K[il]
            G = Q.shape[1] // K.shape[1]
            for g in range(K.shape[1]):
                c, p, d, cov = calibration.calibrate_head(Q[:, g * G:(g + 1) * G].astype(np.float32),
                                                        K[:, g].astype(np.float32), tau=a.tau,
                                                        block_size=a.block, window=a.window, alpha=alpha,
                                                        mu=mu, sigma=sigma, k_values=kv)
                dens.append(d)
        dens = np.array(dens)
        aged = a.ctx - a.window
        kept = (a.window + dens.mean() * aged) / a.ctx
        print(f"alpha={alpha:4.2f}: aged-block density mean {dens.mean():.3f} (min {dens.min():.3f}, max {dens.max():.3f}), "
              f"overall kept {kept:.1%} at {a.ctx} tokens, w={a.window}  [{time.time() - t1:.0f} s]")


if __name__ == "__main__":
    main()
