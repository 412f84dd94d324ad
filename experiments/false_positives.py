"""Doubt 2 of science.md: does the count find "features" in data that has few? The same sweeps and rule
on a sparse toy with known features, a mixture of 12 Gaussians, the unit square, an isotropic Gaussian
and the toy's matched-Gaussian null, all of the same width."""

from common import check, run

TOYS = {"gaussian": {"kind": "gaussian"}}  # beside the default sparse toy, gmm (12) and square
FULL = {"study": {"toy_samples": 60_000, "toy_width": 64},
        "toys": {**TOYS, "sparse": {"kind": "sparse", "n_features": 128, "mean_active": 2.0}},
        "model": {"enabled": False},
        "sweep": {"toy": {"sizes": [32, 64, 128, 256, 512, 1024], "l1": [0.3], "steps": 2000}}}
QUICK = {"toys": TOYS, "model": {"enabled": False}, "sweep": {"toy": {"l1": [0.3]}}}


def main(argv=None):
    args, result = run("false_positives", __doc__, FULL, QUICK, argv)
    toy = result.count("sparse")
    print()
    for c in result.counts:
        last = c.sizes[-1]
        print(f"{c.label:12s} {c.role:8s} {c.estimate_text():36s} N(m={last.size})={last.reproduced:.0f}  "
              f"test FVU {last.test_fvu:.3f}")
    controls = [c for c in result.counts if c.role in ("control", "null")]
    check(f"every control counts fewer than a fifth of the toy's {toy.expected} features",
          all(c.saturation.estimate is not None and c.saturation.estimate < toy.expected / 5 for c in controls))
    check("the toy's excess over its matched null is beyond noise", toy.comparisons["null"].within_noise is False)
    gaussian = result.count("gaussian")
    check("the isotropic Gaussian's loss falls with m although nothing is reproduced",
          gaussian.sizes[-1].test_fvu < gaussian.sizes[0].test_fvu and gaussian.sizes[-1].reproduced <= 2)


if __name__ == "__main__":
    main()
