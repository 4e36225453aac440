"""The PPL-k% search (SPEC section 1): the largest CETT value c whose per-layer thresholds keep
PPL(sparse) / PPL(dense) <= target, found with few sparse passes (`search_c`).

`search_c` needs only an object with `evaluate(c, windows=None) -> (.c, .ratio)` and `.windows`
(a `Calibrator`, or the checkpoint sweep's mean over several).
"""

from __future__ import annotations

import math

from sparse_ffn.errors import UserError
from sparse_ffn.calibrate.calibrator import Calibrator, Eval

C_TOL = 1e-3  # the reference's tolerance on c in the outer bisection
# stop once the best feasible c is this close below the target: the precision the reference's own answer
# has (its final ratio lies anywhere across its last 1e-3 step in c: about 6e-4 below PPL-1% on SmolLM2,
# plus the curve's roughness, +-1e-3 at 8192 tokens), and the agreement the benchmark asks of the two
RATIO_TOL = 1e-3
AIM_BELOW = 0.25  # both phases aim this fraction of ratio_tol below the target
# the least step beyond the known end of a one-sided bracket, by the number of probes there (1: the root)
ONE_SIDED_GROWTH = (1.0, 1.0, 1.05, 1.15, 1.4)
RESOLVED = 1 + 1e-9  # midpoints halve a bracket to c_tol only up to float rounding (1.0000000000000009e-3)


def check_target(target_ppl_ratio: float | None, cett: float | None) -> None:
    """UserError unless exactly one is given: a PPL ratio target r > 1, or a fixed CETT c in [0, 1]."""
    if (target_ppl_ratio is None) == (cett is None):
        raise UserError("give exactly one of --target-ppl-ratio and --cett")
    if target_ppl_ratio is not None and not (math.isfinite(target_ppl_ratio) and target_ppl_ratio > 1):
        raise UserError(f"--target-ppl-ratio {target_ppl_ratio:g}: must be > 1 (e.g. 1.01 for PPL-1%)")
    if cett is not None and not (math.isfinite(cett) and 0 <= cett <= 1):
        raise UserError(f"--cett {cett:g}: must be in [0, 1]")


def effective_ratio_tol(target: float, ratio_tol: float) -> float:
    """The ratio tolerance a search for `target` uses: `ratio_tol`, at most a quarter of target - 1."""
    return min(ratio_tol, (target - 1) / 4)


class Bracket:
    """Evaluated (c, ratio) points of one fidelity: the largest feasible c (`lo`, ratio <= target) and the
    smallest infeasible one (`hi`), and the next c to try."""

    def __init__(self, target: float) -> None:
        self.target = target
        self.points: dict[float, float] = {0.0: 1.0}  # c = 0: all thresholds 0, the dense model itself

    def add(self, c: float, ratio: float) -> None:
        self.points[c] = ratio

    @property
    def hi(self) -> float | None:
        return min((c for c, r in self.points.items() if r > self.target), default=None)

    @property
    def lo(self) -> float:
        hi = self.hi
        return max(c for c, r in self.points.items() if r <= self.target and (hi is None or c < hi))

    def model_root(self, aim: float, beta_prior: float | None, c0: float) -> float:
        """Where a power law ratio - 1 = A c^beta through the evaluated points reaches `aim`: anchored
        at the point nearest `aim` (in log(ratio - 1)), one of the two bracket ends once both exist;
        beta from the two points nearest the bracket ends (else `beta_prior`, else 1.5). `c0` when
        there is no point with ratio > 1 yet. On a curve that is not monotone at this resolution, a
        point beyond the bracket can be nearer `aim` than its ends (SmolLM2, 8192 tokens: 1.01062 at
        c = 0.04183 beyond hi = 0.03955 at 1.01080), and anchoring there throws the root out of it."""
        pts = sorted((c, r) for c, r in self.points.items() if c > 0 and r > 1)
        if not pts:
            lo = self.lo
            return c0 if lo == 0 else 4 * lo
        beta = None
        candidates = pts
        if len(pts) >= 2:
            lo, hi = self.lo, self.hi
            below = [p for p in pts if p[0] <= lo]
            above = [p for p in pts if hi is not None and p[0] >= hi]
            if below and above:
                a, b = below[-1], above[0]
                candidates = [a, b]
            else:
                a, b = sorted(sorted(pts, key=lambda p: abs(math.log((p[1] - 1) / (aim - 1))))[:2])
            if a[0] != b[0] and a[1] != b[1]:
                beta = (math.log(b[1] - 1) - math.log(a[1] - 1)) / (math.log(b[0]) - math.log(a[0]))
                beta = beta if 0 < beta < 50 else None
        beta = beta or beta_prior or 1.5
        anchor = min(candidates, key=lambda p: abs(math.log((p[1] - 1) / (aim - 1))))
        return anchor[0] * math.exp(math.log((aim - 1) / (anchor[1] - 1)) / beta)

    def propose(self, aim: float, c_tol: float, beta_prior: float | None, c0: float, n0: int = 1) -> float:
        """The model's root, safeguarded.

        While one end of the bracket is missing (no infeasible c yet, or no feasible c > 0 yet), the
        root itself the first time, then at least a growing step beyond the known end (x1.05, x1.15,
        x1.4, then x2; the same factors downwards): on a ratio curve as rough as a few thousand tokens
        give (SmolLM2, 2048 tokens: +-0.005 around PPL-5%), the root keeps landing on the known side
        and a small, sure bracket is what saves passes. Once the bracket [lo, hi] exists, the root is
        projected as in the ITP method (Oliveira & Takahashi 2020) onto a neighbourhood of the
        bracket's midpoint that shrinks with each step, the step budget counted afresh whenever the
        bracket itself allows fewer: the bracket reaches c_tol in at most
        ceil(log2((hi - lo) / c_tol)) + n0 steps (bisection's count + n0) from any bracket it had."""
        lo, hi = self.lo, self.hi
        c = self.model_root(aim, beta_prior, c0)
        if hi is None or lo == 0.0:
            known = lo if hi is None else hi
            self._one_sided = getattr(self, "_one_sided", 0) + (known > 0)
            k = self._one_sided
            grow = ONE_SIDED_GROWTH[k] if k < len(ONE_SIDED_GROWTH) else 2.0
            if hi is None:
                return min(1.0, max(c, lo * grow + c_tol / 2))
            c = min(c, hi / grow - min(0.02 * hi, c_tol / 4))
            return max(c, min(c_tol, hi / 2))  # below c_tol the search cannot tell c from 0 anyway
        steps = math.ceil(math.log2(max((hi - lo) / c_tol, 1.0))) + n0  # bisection's count from here, + n0
        if getattr(self, "_itp", None) is None or steps < self._itp:
            self._itp = steps
        n_left = self._itp
        self._itp -= 1
        margin = min(0.02 * (hi - lo), c_tol / 4)
        c = min(hi - margin, max(lo + margin, c))
        half = (lo + hi) / 2
        radius = (c_tol / 2) * 2 ** n_left - (hi - lo) / 2
        if abs(c - half) > radius:
            c = half + math.copysign(max(radius, 0.0), c - half)
        return c


def search_c(cal: Calibrator, target: float, *, c_tol: float, ratio_tol: float, c0: float,
            steer_windows: int | None, max_steps: int) -> Eval:
    """The largest c (to c_tol, or with ratio within ratio_tol below target) whose thresholds keep
    PPL(sparse)/PPL(dense) <= target on all calibration windows.

    1. Steering (cheap): up to 4 probes on the first `steer_windows` windows, with thresholds fitted on
       those windows' tokens only, locate where the curve crosses the target and its log-log slope.
    2. All windows, exact thresholds: power-law root estimates from there, ITP-safeguarded once a
       bracket exists (then at most bisection's count + 1 more passes; the reference's bisection
       takes 10); stop once the best feasible c has ratio >= target - ratio_tol or the bracket is
       <= c_tol (the reference's resolution).
    Both phases aim a quarter of ratio_tol below the target (an overshoot is infeasible and costs a
    pass; landing low within the tolerance does not); steering stops within ratio_tol.
    """
    ratio_tol = effective_ratio_tol(target, ratio_tol)
    aim = target - ratio_tol * AIM_BELOW
    beta_prior = None
    if steer_windows and steer_windows < cal.windows.shape[0]:
        steer = Bracket(target)
        for step in range(4):
            c = steer.propose(aim, c_tol, None, c0)
            steer.add(c, cal.evaluate(c, windows=steer_windows).ratio)
            lo, hi = steer.lo, steer.hi
            if (lo > 0 and steer.points[lo] >= target - ratio_tol) or lo >= 1.0 or \
                    (hi is not None and hi - lo <= c_tol * RESOLVED):
                break
        if sum(1 for c, r in steer.points.items() if c > 0 and r > 1) >= 2:
            beta_prior = steer_beta(steer, aim)
        c0 = min(1.0, max(c_tol, steer.model_root(aim, beta_prior, c0)))
    full = Bracket(target)
    results: dict[float, Eval] = {}
    for step in range(max_steps):
        c = full.propose(aim, c_tol, beta_prior, c0)
        ev = cal.evaluate(c)
        full.add(c, ev.ratio)
        results[c] = ev
        lo, hi = full.lo, full.hi
        if lo > 0 and full.points[lo] >= target - ratio_tol:
            break
        if (hi is not None and hi - lo <= c_tol * RESOLVED) or lo >= 1.0 or (hi is None and 1.0 - lo <= c_tol):
            break
    lo, hi = full.lo, full.hi
    if lo == 0.0:
        r_hi = full.points[hi] if hi is not None else float("nan")
        raise UserError(f"--target-ppl-ratio {target:g}: unreachable: the smallest c the search resolves "
                        f"(c={hi:.4g}) already gives PPL ratio {r_hi:.6f}; thresholds would all be 0 (dense). "
                        f"Use a larger ratio or a fixed --cett")
    return results[lo]


MIN_LOG_SPAN = 0.1  # steering points closer than 10% in c give a log-log slope dominated by noise


def steer_beta(steer: Bracket, aim: float) -> float | None:
    """log-log slope of the steering points nearest the target (the prior for the full data): of the pairs
    at least 10% apart in c, the one whose farther point is nearest the target in log(ratio - 1) (the
    two nearest points when no pair is that far apart). Two probes a few % apart in c differ in ratio by
    little more than the ratio's roughness, and their slope can be off by a factor 3 (SmolLM2: 0.8 from
    c = 0.0351, 0.0368, against 2.4-2.6 over 0.030-0.047), which costs extra full passes."""
    pts = sorted((c, r) for c, r in steer.points.items() if c > 0 and r > 1)
    dist = {p: abs(math.log((p[1] - 1) / (aim - 1))) for p in pts}
    pairs = [(x, y) for i, x in enumerate(pts) for y in pts[i + 1:] if math.log(y[0] / x[0]) >= MIN_LOG_SPAN]
    if pairs:
        a, b = min(pairs, key=lambda q: (max(dist[q[0]], dist[q[1]]), min(dist[q[0]], dist[q[1]])))
    else:
        a, b = sorted(sorted(pts, key=lambda p: dist[p])[:2])
    if a[0] == b[0] or a[1] == b[1]:
        return None
    beta = (math.log(b[1] - 1) - math.log(a[1] - 1)) / (math.log(b[0]) - math.log(a[0]))
    return beta if 0 < beta < 50 else None
