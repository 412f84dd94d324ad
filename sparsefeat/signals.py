"""Signals that compare the members of a sweep: each dictionary with the next size, seeds with each
other, dictionaries with a toy's ground truth. Computed once by the trainer from the final weights and
stored in the results file; the thresholds are the count's (`SignalThresholds.from_count_config`),
recorded beside them in the file (attribute `signal_thresholds`)."""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from . import metrics
from .results import SIGNAL_KEYS
from .sweep_config import MemberSpec


@dataclass(frozen=True)
class SignalThresholds:
    """Cosines at which two atoms count as the same direction."""

    match: float = field(default=0.9, metadata={
        "help": "next size and ground truth: an atom is matched when its cosine is at least this"})
    seed: float = field(default=0.7, metadata={
        "help": "cross-seed: a pair is shared when its decoder and encoder cosines are both at least this "
                "(Paulo & Belrose 2025)"})

    @classmethod
    def from_count_config(cls, config) -> "SignalThresholds":
        """The thresholds of a `count.CountConfig`: its `match_floor` is the matching cosine."""
        return cls(match=float(config.match_floor))

    def to_dict(self) -> dict:
        return asdict(self)


def cross_member_signals(specs: list[MemberSpec], weights: dict[str, dict[str, np.ndarray]],
                         ground_truth: np.ndarray | None, alive: dict[str, np.ndarray] | None = None,
                         thresholds: SignalThresholds | None = None
                         ) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """The tables comparing members, and each member's summary signals (NaN where not applicable).

    - next: each dictionary against the next larger size of the same sparsity and seed: MMCS
      (mean max cosine of its *alive* atoms, those that fired on the test split when `alive` is
      given, with the larger's atoms: a dead atom is a random direction and would pull MMCS down
      exactly where dead latents appear, past the true number of features), and one-to-one Hungarian matching (mean
      cosine of the pairs, share of its atoms whose pair has cosine ≥ `thresholds.match`, stored as
      `share_next_0_9`, the name it had when the threshold was fixed at 0.9).
    - seeds: each pair of seeds at the same size and sparsity: the shared fraction (Hungarian on
      decoder + encoder cosines, shared when both ≥ `thresholds.seed`); a member's `shared_seed` is the mean over
      the other seeds.
    - ground_truth (toy stores): MMCS of the true features with the atoms, share recovered
      (≥ `thresholds.match`).
    """
    thresholds = thresholds or SignalThresholds()
    per = {s.id: {k: math.nan for k in SIGNAL_KEYS} for s in specs}
    tables: dict[str, list[dict]] = {"next": [], "seeds": []}
    groups: dict[tuple, list[MemberSpec]] = {}
    for s in specs:
        groups.setdefault((s.sparsity, s.seed), []).append(s)
    for group in groups.values():
        group = sorted(group, key=lambda s: s.size)
        for small, big in zip(group, group[1:]):
            a, b = weights[small.id]["decoder"], weights[big.id]["decoder"]
            live = a if alive is None else a[alive[small.id]]
            mm = metrics.mmcs(live, b) if len(live) else math.nan
            hung, share = metrics.hungarian_summary(a, b, threshold=thresholds.match)
            per[small.id].update(mmcs_next=mm, mmcs_next_hungarian=hung, share_next_0_9=share)
            tables["next"].append(dict(member=small.id, next_member=big.id, size=small.size, next_size=big.size,
                                       sparsity=small.sparsity, seed=small.seed, mmcs=mm,
                                       hungarian_mean_cos=hung, share_0_9=share))
    by_setting: dict[tuple, list[MemberSpec]] = {}
    for s in specs:
        by_setting.setdefault((s.size, s.sparsity), []).append(s)
    shared: dict[str, list[float]] = {s.id: [] for s in specs}
    for group in by_setting.values():
        for a, b in itertools.combinations(sorted(group, key=lambda s: s.seed), 2):
            wa, wb = weights[a.id], weights[b.id]
            frac = metrics.shared_fraction(wa["decoder"], wb["decoder"], wa["encoder"], wb["encoder"],
                                           threshold=thresholds.seed)
            shared[a.id].append(frac)
            shared[b.id].append(frac)
            tables["seeds"].append(dict(member_a=a.id, member_b=b.id, size=a.size, sparsity=a.sparsity,
                                        seed_a=a.seed, seed_b=b.seed, shared_fraction=frac,
                                        shared_count=frac * a.size))
    for sid, fracs in shared.items():
        if fracs:
            per[sid]["shared_seed"] = float(np.mean(fracs))
    if ground_truth is not None:
        tables["ground_truth"] = []
        for s in specs:
            dec = weights[s.id]["decoder"]
            mm, rec = metrics.mmcs(ground_truth, dec), metrics.recovered_fraction(ground_truth, dec, thresholds.match)
            per[s.id].update(mmcs_gt=mm, recovered_gt=rec)
            tables["ground_truth"].append(dict(member=s.id, size=s.size, sparsity=s.sparsity, seed=s.seed,
                                               features=int(ground_truth.shape[0]), mmcs=mm, recovered=rec))
    return tables, per
