"""Reference result 5 of science.md: two seeds share nearly all features on toy data when m = n, and far
fewer on the controls. Three seeds per size on the sparse toy, the 12-Gaussian mixture, the unit square,
an isotropic Gaussian and the toy's matched null."""

from common import check, run

FULL = {"toys": {"gaussian": {"kind": "gaussian"}}, "model": {"enabled": False}, "study": {"toy_samples": 60_000},
        "sweep": {"toy": {"l1": [0.3], "seeds": [0, 1, 2], "steps": 2000}}}
QUICK = {"toys": {"gaussian": {"kind": "gaussian"}}, "model": {"enabled": False},
         "sweep": {"toy": {"l1": [0.3], "seeds": [0, 1, 2]}}}


def main(argv=None):
    args, result = run("seed_stability", __doc__, FULL, QUICK, argv)
    toy = result.count("sparse")
    n = toy.expected
    print(f"\nshared fraction across seeds (decoder and encoder cosine >= 0.7) and N(m)/m, by size")
    print(f"{'dataset':16s}" + "".join(f"{s.size:>14d}" for s in toy.sizes))
    for c in result.counts:
        cells = "".join(f"{s.shared_seed:7.2f} {s.reproduced / s.size:5.2f} " for s in c.sizes)
        print(f"{c.label:16s}{cells}")
    at_n = next(s for s in toy.sizes if s.size == n)
    check(f"seeds share nearly all features on the toy at m = n = {n} (N/m >= 0.8)", at_n.reproduced / n >= 0.8)
    others = [c for c in result.counts if c.role in ("control", "null")]
    check("far fewer on every control at the same size (N/m < 0.3)",
          all(next(s for s in c.sizes if s.size == n).reproduced / n < 0.3 for c in others))


if __name__ == "__main__":
    main()
