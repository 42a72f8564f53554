"""Budgets of several calibration modes from ONE dense pass over the final mode's text (planted
facts + questions), so the modes differ only in what they simulate:

    python calibration/compare_modes.py MODEL.gguf --ctx 8192 [--threads 2] [--save CAP.npz | --load CAP.npz]

(`tca-ggml calibrate ... --save-capture CAP.npz` writes the same file.)

* final   -- the default of `tca-ggml calibrate`: one final selection per question (observation
             window = the question's last n_obs queries), the answer's queries as probes;
* final-wN -- the same with N blocks kept whole instead of 4 (final-w0: none);
* end     -- one final selection at the text's end, the last 256 positions (questions and
             answers) as probes scored against it;
* chunked -- the "stream" retention's per-ubatch re-selection, filler probes (last 256 + 256
             random positions).

Prints the per-layer mean density of each mode and the median over heads; for the final modes also
the answer probes' mean and worst coverage at the sparsest candidate. The capture (Q/K of
every layer, f16) can be saved and reloaded (~50 MB per 1K tokens for the 0.5B model).
"""
import time

import numpy as np

from tca_ggml import calibrate, calibration
from tca_ggml.llama import Llama

from common_args import capture_parser


def main():
    ap = capture_parser()
    ap.add_argument("--modes", default="final,final-w0,end,chunked")
    ap.add_argument("--layers", default=None, help="comma-separated layers (default all)")
    ap.add_argument("--save", help="write the capture and episodes to this .npz")
    ap.add_argument("--load", help="read them from this .npz instead of a dense pass")
    a = ap.parse_args()
    if a.load:
        cap, episodes = calibrate.load_capture(a.load)
    else:
        with Llama(a.model, vocab_only=True, verbose=False) as tok:
            ct = calibrate.build_calibration_text(
                lambda t, bos: tok.tokenize(t.encode("utf-8"), add_bos=bos, special=False), a.ctx)
        t0 = time.time()
        cap = calibrate.capture_qk(a.model, ct.tokens, n_threads=a.threads, progress=True)
        print(f"dense pass over {cap.n_tokens} tokens: {time.time() - t0:.0f} s")
        episodes = ct.episodes
        if a.save:
            calibrate.save_capture(a.save, cap, episodes)
    layers = list(range(len(cap.Q))) if a.layers is None else [int(x) for x in a.layers.split(",")]
    n = cap.n_tokens
    res, sparsest = {}, {}
    for mode in a.modes.split(","):
        t1 = time.time()
        if mode.startswith("final") or mode == "end":
            whole = int(mode[len("final-w"):]) if mode.startswith("final-w") else 4
            eps = episodes if mode != "end" else [calibration.Episode(n, np.arange(n - 256, n))]
            mu, sigma, kv = calibration.candidate_grid(a.block)
            p_list, t, kv = calibration._grid_lists(a.block, mu, sigma, kv)
            dens, covs, c0 = [], [], []
            for il in layers:
                Q, K = cap.Q[il], cap.K[il]
                G = Q.shape[1] // K.shape[1]
                for g in range(K.shape[1]):
                    cov = calibration.final_candidate_coverages(
                        Q[:, g * G:(g + 1) * G].astype(np.float64), K[:, g].astype(np.float64), p_list, kv,
                        a.block, a.window, 4, 0.5, eps, n_whole=whole)
                    _, _, d, c = calibration._pick_sparsest(p_list, t, cov.mean(axis=1), kv, a.tau)
                    dens.append(d); covs.append(c); c0.append((cov[0].mean(), cov[0].min()))
            res[mode] = (np.array(dens), np.array(covs))
            sparsest[mode] = np.array(c0)
        else:
            out = calibrate.calibrate_capture(cap, mode, tau=a.tau, block=a.block, window=a.window, layers=layers)
            res[mode] = (np.array(out[2]), np.array(out[3]))
        print(f"{mode}: {time.time() - t1:.0f} s")
    nkv = cap.K[0].shape[1]
    print(f"\nper-layer mean density of aged blocks ({n} tokens, w={a.window}, b={a.block}, tau={a.tau})")
    print("layer " + " ".join(f"{m:>9}" for m in res))
    for j, il in enumerate(layers):
        print(f"{il:>5} " + " ".join(f"{d[j * nkv:(j + 1) * nkv].mean():>9.3f}" for d, _ in res.values()))
    print("mean  " + " ".join(f"{d.mean():>9.3f}" for d, _ in res.values()))
    print("median" + " ".join(f"{np.median(d):>9.3f}" for d, _ in res.values()))
    print("dense " + " ".join(f"{int((d >= 1).sum()):>9d}" for d, _ in res.values()))
    mu, sigma, kv = calibration.candidate_grid(a.block)
    d0 = calibration._grid_lists(a.block, mu, sigma, kv)[1][0] / a.block      # the sparsest density
    print("sparser" + " ".join(f"{int((d > d0 + 1e-6).sum()):>8d} " for d, _ in res.values())
          + "  (heads above the sparsest candidate)")
    if sparsest:
        print("\ncoverage of the probes at the sparsest candidate: mean / worst probe, per layer (mean over heads)")
        print("layer " + " ".join(f"{m:>15}" for m in sparsest))
        for j, il in enumerate(layers):
            print(f"{il:>5} " + " ".join(f"{c[j * nkv:(j + 1) * nkv, 0].mean():>7.3f} {c[j * nkv:(j + 1) * nkv, 1].mean():>7.3f}"
                                         for c in sparsest.values()))


if __name__ == "__main__":
    main()
