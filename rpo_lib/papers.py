"""What the two papers report, whole, as citations to print beside what the workbook measures.

Every number here is copied from a paper's table, and each entry names that table. The workbook cannot rerun them
(7B models, GPT-4 judges, hours of GPU time); notebooks 05 and 06 print them next to the numbers their own worlds
produce and say what differs (docs/math.md section 12). They are kept *whole*: every row of every results table,
including the rows where a method did not win (``not_won``), because a learner must see those too.

Sources (arXiv HTML of each paper):
- **Liu et al. 2024** (RPO), section 6 and appendix D.3. Table 1: GPT-4 pairwise win rates on 150 test prompts of the
  training data (in distribution); Table 2: MT-Bench scores and AlpacaEval 2.0 (LC) win rates against GPT-4; Tables
  4-6: pairwise win rates on MT-Bench (beta series) and on AlpacaEval 2.0 (gemma series). MT-Bench is scored 1-10 by
  GPT-4; AlpacaEval 2.0's (length-controlled, LC) win rates are against GPT-4 Preview's answers. The beta series
  starts from mistral-7b-sft-beta and trains on UltraFeedback; the gemma series starts from zephyr-7b-gemma-sft-v0.1
  and trains on Argilla DPO-Mix-7K. Two defects of the printed tables are repaired here, and said: in Table 4 the DPO
  row's two entries are swapped (they contradict the complements of the RPO and Ref. rows, which sum to 100 everywhere
  else), and Tables 5 and 6 label their rows "(beta)" under a caption and a text that say gemma. Pairwise tables are
  stored as printed, row model against column model. One printed pair does not sum to 100 and is kept as printed:
  Table 6, Ref. vs DPO 36.44 and DPO vs Ref. 64.56.
- **Song et al. 2024** (HyPO), section 5.1. Table 1: TL;DR summarisation with Pythia 1.4B and 2.8B (GPT-4 win rate
  on 600 validation prompts, reward-model score, reverse KL to pi_ref; the paper prints a spread in parentheses);
  Table 2: MT-Bench and AlpacaEval 2.0 for Llama-3-8B-Instruct fine-tuned on UltraFeedback (last 4 layers trained);
  Table 3: the Open LLM leaderboard tasks for the same models. Fig. 1 (validation KL over 5 epochs of TL;DR,
  Pythia 2.8B) is a plot without printed numbers, so it has no entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

__all__ = ["COSTS", "REPORTED", "SETTINGS", "ULTRAFEEDBACK_TRAIN_PAIRS", "Contest", "Cost", "Reported", "Settings",
           "contests", "cost_table", "evidence_table", "not_won", "reported", "settings", "settings_table"]

# Rows of HuggingFaceH4/ultrafeedback_binarized, split train_prefs (its dataset card): the data of Liu et al.'s beta
# series and of Song et al.'s chat runs, and of the qlora_7b preset (one epoch = ceil(pairs / batch) steps).
ULTRAFEEDBACK_TRAIN_PAIRS = 61_135

LIU, SONG = "Liu et al. 2024", "Song et al. 2024"
_BETA = "beta series: mistral-7b-sft-beta on UltraFeedback"
_GEMMA = "gemma series: zephyr-7b-gemma-sft on DPO-Mix-7K"
_LLAMA = "Llama-3-8B-Instruct on UltraFeedback"


@dataclass(frozen=True)
class Reported:
    """One number a paper prints.

    Attributes:
        paper: ``"Liu et al. 2024"`` or ``"Song et al. 2024"``.
        source: the table it is printed in, e.g. ``"Table 2"``.
        setting: model and data.
        metric: what is measured, with the judge and its unit.
        model: the model the number belongs to (``"RPO"``, ``"DPO"``, ``"Ref."`` = the starting model, ...).
        value: the number as printed.
        versus: for a pairwise win rate, the opponent (``value`` is ``model``'s win rate against it); else None.
        spread: the number the paper prints in parentheses beside ``value``, if any.
        higher_is_better: False for a KL.
    """

    paper: str
    source: str
    setting: str
    metric: str
    model: str
    value: float
    versus: str | None = None
    spread: float | None = None
    higher_is_better: bool = True


def _scores(paper: str, source: str, setting: str, metrics: tuple[str, ...], rows: dict[str, tuple[float, ...]],
            spreads: dict[str, tuple[float, ...]] | None = None,
            lower_is_better: tuple[str, ...] = ()) -> list[Reported]:
    """A table of per-model scores: ``rows[model]`` lists one value per metric."""
    return [Reported(paper, source, setting, metric, model, value,
                     spread=None if spreads is None else spreads[model][i],
                     higher_is_better=metric not in lower_is_better)
            for model, values in rows.items() for i, (metric, value) in enumerate(zip(metrics, values, strict=True))]


def _pairwise(paper: str, source: str, setting: str, metric: str,
              printed: dict[tuple[str, str], float]) -> list[Reported]:
    """A pairwise win-rate table: ``printed[(row, column)]`` is the row model's win rate against the column model."""
    return [Reported(paper, source, setting, metric, row, value, versus=column)
            for (row, column), value in printed.items()]


def _matrix(models: tuple[str, str, str], rows: tuple[tuple[float, float], ...]) -> dict[tuple[str, str], float]:
    """The off-diagonal cells of a 3x3 pairwise table, row by row (the diagonal's 50 left out)."""
    return {(row, column): value for row, values in zip(models, rows, strict=True)
            for column, value in zip([m for m in models if m != row], values, strict=True)}


_THREE = ("RPO", "Ref.", "DPO")

_MT_ALPACA = ("MT-Bench (1-10)", "AlpacaEval LC win %", "AlpacaEval win %")
_WIN_GPT4 = "GPT-4 pairwise win rate, % (150 test prompts of the training data)"
_SONG_T1 = ("GPT-4 win rate %", "RM score", "KL(pi || pi_ref)")
_SONG_T2 = ("MT-Bench 1st turn", "MT-Bench 2nd turn", "MT-Bench average", "AlpacaEval LC win %",
            "AlpacaEval win %")
_SONG_T3 = ("MMLU (5-shot)", "GSM8K (5-shot)", "Arc (25-shot)", "TruthfulQA (0-shot)", "HellaSwag (10-shot)",
            "Open LLM average")

REPORTED: tuple[Reported, ...] = tuple(
    _pairwise(LIU, "Table 1", _BETA, _WIN_GPT4, _matrix(_THREE, ((79.0, 56.0), (21.0, 22.7), (44.0, 77.3))))
    + _pairwise(LIU, "Table 1", _GEMMA, _WIN_GPT4, _matrix(_THREE, ((71.7, 54.0), (28.3, 32.7), (46.0, 67.3))))
    + _scores(LIU, "Table 2", _BETA, _MT_ALPACA, {
        "RPO": (7.381, 23.28, 21.01), "Ref.": (5.088, 7.19, 4.69), "DPO": (7.278, 21.15, 17.27),
        "zephyr-7b-beta (released)": (7.200, 13.20, 10.99)})
    + _scores(LIU, "Table 2", _GEMMA, _MT_ALPACA, {
        "RPO": (7.916, 15.51, 13.85), "Ref.": (7.266, 8.35, 4.61), "DPO": (7.688, 15.36, 13.69),
        "zephyr-7b-gemma (released)": (7.719, 14.78, 12.14)})
    + _pairwise(LIU, "Table 4", _BETA, "MT-Bench pairwise win rate (GPT-4), %",
                _matrix(_THREE, ((83.75, 57.81), (16.25, 21.25), (42.19, 78.75))))  # DPO row repaired
    + _pairwise(LIU, "Table 5", _GEMMA, "AlpacaEval 2.0 pairwise win rate (GPT-4), %",
                _matrix(_THREE, ((80.13, 52.02), (19.87, 20.61), (47.98, 79.39))))
    + _pairwise(LIU, "Table 6", _GEMMA, "AlpacaEval 2.0 pairwise LC win rate (GPT-4), %",
                _matrix(_THREE, ((64.93, 51.33), (35.07, 36.44), (48.67, 64.56))))
    + _scores(SONG, "Table 1", "TL;DR, Pythia 1.4B", _SONG_T1,
              {"DPO": (42.17, 0.16, 44.90), "HyPO": (46.44, 0.37, 27.07)},
              spreads={"DPO": (2.5, 0.05, 1.29), "HyPO": (2.39, 0.05, 2.34)}, lower_is_better=_SONG_T1[2:])
    + _scores(SONG, "Table 1", "TL;DR, Pythia 2.8B", _SONG_T1,
              {"DPO": (44.39, 2.43, 68.95), "HyPO": (50.50, 2.51, 48.98)},
              spreads={"DPO": (0.4, 0.10, 3.08), "HyPO": (1.89, 0.13, 4.23)}, lower_is_better=_SONG_T1[2:])
    + _scores(SONG, "Table 2", _LLAMA, _SONG_T2, {
        "Ref.": (8.31, 7.89, 8.10, 26.0, 25.3), "DPO": (8.08, 7.41, 7.75, 28.4, 30.9),
        "HyPO": (8.43, 7.75, 8.09, 30.7, 32.2)})
    + _scores(SONG, "Table 3", _LLAMA, _SONG_T3, {
        "Ref.": (65.68, 74.91, 62.12, 43.88, 78.76, 65.07), "DPO": (65.82, 73.62, 63.14, 45.02, 79.1, 65.34),
        "HyPO": (65.74, 73.84, 62.71, 45.55, 79.74, 65.51)})
)


@dataclass(frozen=True)
class Cost:
    """The training time a paper reports for one method in one setting (wall clock, hours, as a range)."""

    paper: str
    source: str
    setting: str
    method: str
    hours_low: float
    hours_high: float
    hardware: str


COSTS: tuple[Cost, ...] = (
    Cost(LIU, "appendix D.1", _BETA, "DPO or RPO", 3, 3, "8 A100"),
    Cost(LIU, "appendix D.1", _GEMMA, "DPO or RPO", 5, 5, "8 A6000"),
    Cost(SONG, "appendix D", "TL;DR, Pythia", "DPO", 1, 2, "4 A6000/L40"),
    Cost(SONG, "appendix D", "TL;DR, Pythia", "HyPO", 4, 5, "4 A6000/L40"),
    Cost(SONG, "appendix D", _LLAMA + ", one epoch", "DPO", 3, 3, "8 A100 80GB"),
    Cost(SONG, "appendix D", _LLAMA + ", one epoch", "HyPO", 18, 18, "8 A100 80GB"),
)


def cost_table(paper: str | None = None) -> str:
    """The training times the papers report (of one paper, if named), one line each."""
    name = _paper(paper)
    return "\n".join(f"{c.paper}, {c.source} | {c.setting} | {c.method}: "
                     + (f"{c.hours_low:g} h" if c.hours_low == c.hours_high else f"{c.hours_low:g}-{c.hours_high:g} h")
                     + f" on {c.hardware}" for c in COSTS if name is None or c.paper == name)


@dataclass(frozen=True)
class Settings:
    """The training settings a paper reports for one method in one setting: ``values`` as (name, value) pairs,
    named as ``rpo_lib.train.TrainConfig`` names them where it has the field."""

    paper: str
    source: str
    setting: str
    method: str
    values: tuple[tuple[str, float | str], ...]

    def __getitem__(self, name: str) -> float | str:
        for key, value in self.values:
            if key == name:
                return value
        raise KeyError(f"{self.paper}, {self.setting}: no setting {name!r}; it has {[k for k, _ in self.values]}.")


SETTINGS: tuple[Settings, ...] = (
    Settings(LIU, "Table 3, section 6", _BETA, "DPO and RPO", (
        ("learning_rate", 5e-7), ("lr_schedule", "cosine"), ("batch_size", 128), ("epochs", 1), ("beta", 0.01),
        ("eta", 0.005), ("optimizer", "adamw"), ("precision", "bfloat16"))),
    Settings(LIU, "Table 3, section 6", _GEMMA, "DPO and RPO", (
        ("learning_rate", 5e-7), ("lr_schedule", "cosine"), ("batch_size", 128), ("epochs", 2), ("beta", 0.05),
        ("eta", 0.005), ("optimizer", "adamw"), ("precision", "bfloat16"))),
    Settings(SONG, "appendix D.2.1", "TL;DR, Pythia", "DPO and HyPO", (
        ("learning_rate", 3e-6), ("lr_schedule", "cosine"), ("batch_size", 64), ("beta", 0.05), ("lam", 1e-4),
        ("k_online", 2), ("optimizer", "adamw"))),
    Settings(SONG, "appendix D.2.2", _LLAMA, "HyPO", (
        ("learning_rate", 3e-6), ("lr_schedule", "linear"), ("batch_size", 8), ("beta", 0.05), ("lam", 2e-4),
        ("k_online", 2), ("length_penalty", 0.02), ("optimizer", "adamw"))),
)


def settings(paper: str, setting: str) -> Settings:
    """The settings of one paper whose setting contains ``setting`` (e.g. ``settings("Liu", "beta series")``)."""
    name = _paper(paper)
    found = [s for s in SETTINGS if s.paper == name and setting in s.setting]
    if len(found) != 1:
        raise ValueError(f"{setting!r} names {len(found)} settings of {name}; they are "
                         f"{[s.setting for s in SETTINGS if s.paper == name]}.")
    return found[0]


def settings_table(paper: str | None = None) -> str:
    """The training settings the papers report (of one paper, if named), one line each."""
    name = _paper(paper)
    return "\n".join(f"{s.paper}, {s.source} | {s.setting} | {s.method}: "
                     + ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in s.values)
                     for s in SETTINGS if name is None or s.paper == name)


def _paper(paper: str | None) -> str | None:
    if paper is None:
        return None
    for name in (LIU, SONG):
        if name.startswith(paper):
            return name
    raise ValueError(f"no results for paper {paper!r}; use 'Liu', 'Song' or None.")


def reported(paper: str | None = None, source: str | None = None) -> tuple[Reported, ...]:
    """The entries of one paper (``"Liu"`` or ``"Song"``; all if None), of one table if ``source`` is given."""
    name = _paper(paper)
    rows = tuple(r for r in REPORTED if (name is None or r.paper == name) and (source is None or r.source == source))
    if not rows:
        raise ValueError(f"{paper} has no {source!r}; its tables are "
                         f"{sorted({r.source for r in REPORTED if r.paper == name})}.")
    return rows


@dataclass(frozen=True)
class Contest:
    """``method`` against ``opponent`` on one metric of one table: ``margin > 0`` means the method won.

    For a score, ``margin`` is the method's value minus the opponent's (sign flipped for a KL); for a pairwise win
    rate it is the method's win rate minus 50, and ``opponent_value`` the opponent's printed rate against it.
    """

    source: str
    setting: str
    metric: str
    method: str
    opponent: str
    method_value: float
    opponent_value: float
    margin: float

    @property
    def won(self) -> bool:
        return self.margin > 0


def contests(paper: str, method: str, opponents: Iterable[str] | None = None) -> list[Contest]:
    """Every comparison the paper's tables allow between ``method`` and each opponent (all other models if None)."""
    rows = reported(paper)
    out = []
    for row in rows:
        if row.model != method:
            continue
        if row.versus is not None:  # a pairwise win rate: the table itself is the contest
            if opponents is None or row.versus in opponents:
                reverse = [o.value for o in rows if (o.source, o.setting, o.model, o.versus) ==
                           (row.source, row.setting, row.versus, method)]
                out.append(Contest(row.source, row.setting, row.metric, method, row.versus, row.value,
                                   reverse[0] if reverse else 100.0 - row.value, row.value - 50.0))
            continue
        for other in rows:
            if (other.source, other.setting, other.metric) != (row.source, row.setting, row.metric) or \
                    other.model == method or other.versus is not None:
                continue
            if opponents is not None and other.model not in opponents:
                continue
            sign = 1.0 if row.higher_is_better else -1.0
            out.append(Contest(row.source, row.setting, row.metric, method, other.model, row.value, other.value,
                               sign * (row.value - other.value)))
    if not out:
        raise ValueError(f"{method!r} appears in no table of {paper}; its models are "
                         f"{sorted({r.model for r in rows})}.")
    return out


def not_won(paper: str, method: str, opponents: Iterable[str] | None = None) -> list[Contest]:
    """The comparisons ``method`` did not win (ties included): what a fair summary of the paper must also say."""
    return [c for c in contests(paper, method, opponents) if not c.won]


def evidence_table(paper: str | None = None, source: str | None = None) -> str:
    """The entries (of one paper, of one table) laid out as the papers print them, one block per table and setting.

    A score table has a row per model and a column per metric; a pairwise table has the row model's win rate
    against each column model. Spreads the paper prints in parentheses follow their value.
    """
    blocks: dict[tuple[str, str, str], list[Reported]] = {}
    for r in reported(paper, source):
        blocks.setdefault((r.paper, r.source, r.setting), []).append(r)
    lines = []
    for (name, table, setting), rows in blocks.items():
        lines.append(f"{name}, {table}: {setting}")
        metrics = list(dict.fromkeys(r.metric for r in rows))
        models = list(dict.fromkeys(r.model for r in rows))
        if rows[0].versus is not None:
            lines.append(f"  {metrics[0]} (row against column)")
            columns = models
            cell: dict[tuple[str, str | None], Reported | float] = {(r.model, r.versus): r.value for r in rows}
        else:
            columns, cell = metrics, {(r.model, r.metric): r for r in rows}
        lines.append("  " + " " * 26 + "".join(f"{c:>21s}" for c in columns))
        for model in models:
            values = []
            for column in columns:
                entry = cell.get((model, column))
                if entry is None:
                    values.append("-" if model == column else "")
                elif isinstance(entry, Reported):
                    spread = "" if entry.spread is None else f" ({entry.spread:g})"
                    values.append(f"{entry.value:g}{spread}")
                else:
                    values.append(f"{entry:g}")
            lines.append(f"  {model:26s}" + "".join(f"{v:>21s}" for v in values))
    return "\n".join(lines)
