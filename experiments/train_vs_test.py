"""Doubt 1 of science.md (reference result 4): on finite noisy data a large dictionary spends latents on
the noise of its training rows, so the train loss keeps falling with m while the test loss stops, and
the gap between them grows. A sparse toy with Gaussian noise (half the signal's RMS) and 800 rows
(--quick; 2000 rows of 128 features in 64 dims in full)."""

from common import check, no_default_toys, run

# Few rows and sparse codes: a dictionary with many more atoms than the data has features can point
# atoms at individual training rows, noise included, which helps on those rows only. (With dense codes
# in few dimensions every dictionary spans the noise and train and test move together.)
NOISY = {"kind": "sparse", "n_features": 64, "mean_active": 2.0, "noise": 0.5, "n_samples": 800}
FULL = {"study": {"toy_width": 64, "nulls": False},
        "toys": {**no_default_toys(), "noisy": {**NOISY, "n_features": 128, "n_samples": 2_000}},
        "model": {"enabled": False},
        "sweep": {"toy": {"sizes": [32, 64, 128, 256, 512, 1024, 2048], "l1": [0.3], "steps": 6000, "lr": 3e-3}}}
QUICK = {"study": {"nulls": False}, "toys": {**no_default_toys(), "noisy": NOISY}, "model": {"enabled": False},
         "sweep": {"toy": {"sizes": [16, 64, 256, 1024], "l1": [0.3], "steps": 3000}}}


def main(argv=None):
    args, result = run("train_vs_test", __doc__, FULL, QUICK, argv)
    noisy = result.count("noisy")
    print("\n    m  train MSE  test MSE   gap")
    for s in noisy.sizes:
        print(f"{s.size:5d}  {s.train_mse:9.4f}  {s.test_mse:8.4f}  {s.gap:+.4f}")
    print(f"held-out: {noisy.held_out_text()}")
    gaps = [s.gap for s in noisy.sizes]
    check("train loss < test loss at the largest size", gaps[-1] > 0)
    check("the gap grows with m", gaps[-1] > gaps[0])
    check("the test loss stops improving inside the sweep while the train loss still falls",
          noisy.held_out.size is not None and noisy.held_out.train_still_falls)


if __name__ == "__main__":
    main()
