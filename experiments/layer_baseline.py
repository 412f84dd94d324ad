"""Doubt 3 of science.md: a layer's count means something only as its excess over layer 0 (token
embeddings) and over the same layer of a randomly initialised model. Every MiniLM hidden state 0..6,
trained and random-init, each beside its matched-Gaussian null."""

from common import no_default_toys, run
from sparsefeat import plots

FULL = {"toys": no_default_toys(), "model": {"layers": [0, 1, 2, 3, 4, 5, 6]}}
QUICK = {"toys": no_default_toys(), "model": {"layers": [0, 1, 2, 3, 4, 5, 6]},
         "sweep": {"model": {"sizes": [48, 96, 192], "steps": 300}}}


def main(argv=None):
    args, result = run("layer_baseline", __doc__, FULL, QUICK, argv)
    chosen = [result.count(h.label) for h in result.headlines]  # each site at its headline sparsity setting
    plots.save_figure(plots.count_by_layer(chosen), args.out / "figures", "count_by_layer", force=True)
    print(f"\n{'layer':5s} {'trained':>10s} {'random':>10s} {'null':>6s}  (N at the largest size; estimate)")
    for layer in range(7):
        row = {}
        for name, label in (("trained", f"minilm/resid_{layer}"), ("random", f"minilm-random/resid_{layer}"),
                            ("null", f"null:minilm/resid_{layer}")):
            c = next((c for c in chosen if c.label == label), None)
            row[name] = "-" if c is None else f"{c.sizes[-1].reproduced:.0f}"
        print(f"{layer:5d} {row['trained']:>10s} {row['random']:>10s} {row['null']:>6s}")
    print(f"figure: {args.out / 'figures' / 'count_by_layer.png'}")


if __name__ == "__main__":
    main()
