"""``hlbd_fast.tune`` (the package :mod:`hlbd_fast.tuning`): the fastest configuration for *your* model, measured on it, with the proof attached.

:func:`tune` takes a model and its data and answers: which strategies, together, train
this model fastest while computing what the plain fp32 loop computes (exactly, up to
float rounding, or within the tolerance of lower precision)? It works in four stages:

1. **The plain loop** (:class:`~hlbd_fast.FastTrainer` with no strategies, at the given
   micro-batch size) trains ``proof_steps`` optimizer steps from the model's initial
   weights, reading its running loss after every step. A model that cannot train one
   step is refused here, with the plain loop's own error.
2. **Each candidate alone** (:func:`default_candidates`: what the device allows; a
   candidate whose declaration says it cannot run the model, such as ``Unpad`` for a
   model that cannot run unpadded, is not tried, and says why) trains the same steps
   from the same weights on the same batches, and is compared with the plain loop step
   by step: the running loss after each step and the weights after the last one. Its
   **verdict**: ``exact`` (the same numbers, bit for bit), ``rounding`` (within
   ``rounding_tol``), ``precision`` (a strategy declared lower precision, within
   ``precision_tol``), ``random stream`` (a strategy that draws dropout's masks from
   another stream; the comparison runs with dropout off), or ``refused`` (its own proof
   failed, e.g. trimming a model that lets padding reach real positions, or the numbers
   are outside tolerance), with the measured numbers and the reason. Proofs run with the
   model's dropout off (the model in ``eval()`` mode during the steps), so that a
   strategy that changes the tensors' shapes is compared on its computation, not on
   another draw of the masks.
3. **Timing alone**: the plain loop and every accepted candidate in paired interleaved
   rounds (the bench's discipline: one epoch of ``steps_per_round`` steps of every row
   per round, the speed-up of a row the median of its per-round ratios to the plain
   loop, after the first round).
4. **Greedy combination**: the accepted candidates, fastest alone first, are added one
   at a time; a candidate whose declaration conflicts with those already chosen is
   passed over (the declarations decide, nothing is tried and caught), and one whose
   requirement another candidate provides brings it along. Each combination is proven
   against the plain loop as in 2; the combinations that pass are timed in a second
   interleaved run, and the fastest is chosen (the plain loop when nothing is faster).

The time budget (``budget_s``) is shared by the stages and ends whole rounds only; each
ratio says how many rounds it rests on. The result is a :class:`TuneReport`:
``str(report)`` is the table and the chosen configuration as Python code,
``report.preset`` is a :class:`~hlbd_fast.presets.Preset` for
:meth:`FastTrainer.from_preset`, ``report.save(path)`` writes JSON. From the shell:
``hlbd-fast tune``.

The package: :mod:`.search` (:func:`tune`: the proofs, the rounds, the combination),
:mod:`.report` (the results and their text) and :mod:`.cli` (``hlbd-fast tune``).
"""

from .cli import add_arguments, main, run
from .report import PLAIN, VERDICTS, TuneReport, TuneRow, as_code
from .search import Candidate, TuneError, default_candidates, tune

__all__ = ["tune", "TuneReport", "TuneRow", "TuneError", "Candidate", "default_candidates", "VERDICTS", "PLAIN", "as_code", "add_arguments", "main", "run"]
