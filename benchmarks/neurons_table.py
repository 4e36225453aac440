"""Markdown tables of `sparse-ffn analyze neurons` reports (docs/RESULTS.md): python benchmarks/neurons_table.py DIR.

Reads every neurons-*.json under DIR. Per report: median WD per n, median RI per n, the share of neurons
whose WD at the largest n is below WD_1, the relative output error, Spearman(non-Gaussianity, RI) and
Spearman(kurtosis, RI) at the largest n with their bootstrap CIs, the median RI of the most non-Gaussian
decile of neurons against the other 90%, and the run time.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def _ci(s: dict) -> str:
    if s["rho"] is None:
        return "n/a"
    return f"{s['rho']:+.2f} [{s['ci'][0]:+.2f}, {s['ci'][1]:+.2f}]"


def rows(reports: list[dict]) -> tuple[list[str], list[str]]:
    """(WD/RI table lines, correlation table lines)."""
    ns = reports[0]["clusters"]
    top = str(ns[-1])
    wd = ["| layer | linear | sparsity | " + " | ".join(f"WD n={n}" for n in ns) + " | "
          + " | ".join(f"RI n={n}" for n in ns[1:]) + f" | WD_{top} < WD_1 | rel. error n=1 / n={top} | seconds |",
          "|---|---|---|" + "---:|" * (2 * len(ns) + 2)]
    corr = [f"| layer | linear | sparsity | non-Gaussianity, median [p90] | rho(non-Gauss., RI_{top}) [95% CI] | "
            f"rho(kurtosis, RI_{top}) [95% CI] | RI_{top}: most non-Gaussian 10% | RI_{top}: other 90% |",
            "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in sorted(reports, key=lambda r: (r["layer"], r["linear"]["module"], -float(r["sparsity"]))):
        s = r["summary"]
        head = f"| {r['layer']} | {r['linear']['module'].rsplit('.', 1)[-1]} | {r['sparsity']} |"
        err = r["measurement"]["rel_output_error"]
        wd.append(head + "".join(f" {s['wd'][str(n)]['median']:.4f} |" for n in ns)
                  + "".join(f" {s['ri'][str(n)]['median']:+.3f} |" for n in ns[1:])
                  + f" {s['wd_falls'][top]:.2f} | {err['1']:.4f} / {err[top]:.4f} | {r['timing']['total_s']:.0f} |")
        ng = np.array(r["per_neuron"]["non_gaussianity"], dtype=float)
        ri = np.array(r["per_neuron"]["ri"][top], dtype=float)
        ok = np.isfinite(ng) & np.isfinite(ri)
        cut = np.quantile(ng[ok], 0.9)
        hi, lo = np.median(ri[ok & (ng >= cut)]), np.median(ri[ok & (ng < cut)])
        sp = s["spearman"][top]
        corr.append(head + f" {s['non_gaussianity']['median']:.3f} [{s['non_gaussianity']['p90']:.3f}] | "
                    f"{_ci(sp['non_gaussianity_vs_ri'])} | {_ci(sp['kurtosis_vs_ri'])} | {hi:+.3f} | {lo:+.3f} |")
    return wd, corr


def main(argv: list[str]) -> int:
    reports = [json.loads(p.read_text()) for p in sorted(Path(argv[0]).rglob("neurons-*.json"))]
    if not reports:
        print(f"no neurons-*.json under {argv[0]}", file=sys.stderr)
        return 2
    wd, corr = rows(reports)
    print("\n".join(wd) + "\n\n" + "\n".join(corr))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
