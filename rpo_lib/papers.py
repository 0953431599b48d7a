"""The two papers' headline numbers, as they report them, to print beside what the workbook measures.

These are citations, not results of this project: each entry names its table or figure. The workbook cannot rerun
them (7B models, GPT-4 judges, hours of GPU time); notebooks 05 and 06 print them next to the numbers their own
worlds produce and say what differs (docs/math.md section 12).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["HEADLINE_RESULTS", "HeadlineResult", "headline_table"]


@dataclass(frozen=True)
class HeadlineResult:
    """One reported comparison: ``baseline`` (DPO) against ``method`` on ``metric``, in ``setting``."""

    paper: str
    setting: str
    metric: str
    baseline: float
    method: str
    value: float
    higher_is_better: bool = True


HEADLINE_RESULTS: tuple[HeadlineResult, ...] = (
    HeadlineResult("Liu et al. 2024", "zephyr-7b-beta, UltraFeedback", "MT-Bench pairwise win rate vs DPO (GPT-4), %",
                   42.2, "RPO", 57.8),
    HeadlineResult("Liu et al. 2024", "zephyr-7b-beta, UltraFeedback", "AlpacaEval 2.0 pairwise win rate, %",
                   47.0, "RPO", 52.0),
    HeadlineResult("Song et al. 2024", "TL;DR, Pythia 2.8B", "GPT-4 win rate, %", 44.4, "HyPO", 50.5),
    HeadlineResult("Song et al. 2024", "TL;DR, Pythia 2.8B", "reverse KL to pi_ref", 69.0, "HyPO", 49.0,
                   higher_is_better=False),
    HeadlineResult("Song et al. 2024", "Llama-3-8B-Instruct, UltraFeedback", "AlpacaEval 2.0 LC win rate, %",
                   28.4, "HyPO", 30.7),
)


def headline_table(paper: str | None = None) -> str:
    """The headline results (of one paper, if named: ``"Liu"`` or ``"Song"``) as an aligned text table."""
    rows = [r for r in HEADLINE_RESULTS if paper is None or r.paper.startswith(paper)]
    if not rows:
        raise ValueError(f"no results for paper {paper!r}; use 'Liu', 'Song' or None.")
    lines = [f"{'paper':17s} {'setting':36s} {'metric':48s} {'DPO':>6s} {'method':>6s} {'value':>6s}"]
    lines += [f"{r.paper:17s} {r.setting:36s} {r.metric:48s} {r.baseline:6.1f} {r.method:>6s} {r.value:6.1f}"
              for r in rows]
    return "\n".join(lines)
