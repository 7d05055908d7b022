"""``tune``'s choice against the ``fastest`` preset, in one interleaved run.

    python benchmarks/tune_vs_fastest.py                     # the reference model, the bundled data
    python benchmarks/tune_vs_fastest.py --model examples.your_own_model:make_model

1. ``hlbd_fast.tune`` on the model and data (``--budget`` seconds) chooses a configuration;
2. the bench trains, from the same initial weights on the same sample order, the plan's loop
   (``baseline``: batch 4 x 8, ``--baseline-epochs`` epochs), ``fastest`` and ``tuned``, in
   rounds of one epoch of each row (every row's trainer alive, so a drift of the machine's
   speed slows them alike);
3. it prints both tables and ``tuned / fastest``: the median over the rounds both completed,
   after the first, of fastest's epoch seconds over tuned's (above 1: tuned is faster).

The claim it checks: tune's choice is within 10% of ``fastest`` or faster (``--json`` keeps it all).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

from hlbd_fast import factory, tune
from hlbd_fast.bench import ROWS, format_table, reference_data, run_bench


def paired_ratio(report: dict[str, Any], base: str, other: str) -> tuple[float | None, int]:
    """Median over the rounds both rows completed (the first left out when there are more) of base's epoch seconds over other's."""
    rows = {r["name"]: r for r in report["rows"]}

    def by_round(name: str) -> dict[int, float]:
        r = rows[name]
        seconds = r.get("epoch_seconds") or []
        return dict(zip(r.get("epoch_rounds") or range(1, len(seconds) + 1), seconds))

    a, b = by_round(base), by_round(other)
    common = sorted(set(a) & set(b))
    used = common[1:] or common
    return (statistics.median(a[k] / b[k] for k in used) if used else None), len(used)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="module:factory (as hlbd-fast tune); default: the reference model")
    p.add_argument("--budget", type=float, default=120.0, help="seconds for tune (default 120)")
    p.add_argument("--epochs", type=int, default=5, help="epochs of fastest and tuned (default 5)")
    p.add_argument("--baseline-epochs", type=int, default=2, help="epochs of the plan's loop (default 2)")
    p.add_argument("--json", default=None, help="write tune's report and the bench's here")
    args = p.parse_args(argv)

    if args.model:
        model, data = factory.load(args.model)
    else:
        data, vocab = reference_data()
        model, _ = factory.reference(vocab)
    tuned = tune(model, data, budget_s=args.budget, device="cpu")
    print(tuned, "\n")

    table = {"baseline": ROWS["baseline"], "fastest": ROWS["fastest"], "tuned": lambda device: tuned.preset}
    bench = run_bench(
        rows=["baseline", "fastest", "tuned"],
        epochs=args.epochs,
        row_epochs={"baseline": args.baseline_epochs},
        device="cpu",
        model_factory=lambda: model,
        data=data,
        row_table=table,
        interleave=True,
    )
    print(format_table(bench))
    ratio, rounds = paired_ratio(bench, "fastest", "tuned")
    verdict = "n/a" if ratio is None else ("within 10% of fastest or faster" if ratio >= 0.9 else "more than 10% slower than fastest")
    print(f"\ntuned / fastest: {'-' if ratio is None else f'{ratio:.2f}x'} (median over {rounds} paired rounds): {verdict}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"tune": tuned.to_dict(), "bench": bench, "tuned_over_fastest": ratio, "rounds": rounds}, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
