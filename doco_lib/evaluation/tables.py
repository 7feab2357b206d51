"""Results tables in the paper's layout: rows are methods, column groups are concepts × (CS, CA, FID).

For an erased concept lower CS/CA is better (↓) and higher FID is (↑: the images moved away from the
original model's); for every other concept the reverse. Written as CSV, Markdown and LaTeX.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from doco_lib.io import atomic_write_text

METRICS = ("CS", "CA", "FID")


def arrow(metric: str, erased: bool) -> str:
    lower_is_better = (metric in ("CS", "CA")) == erased
    return "↓" if lower_is_better else "↑"


def paper_table(results: pd.DataFrame, erased_concepts: set[str]) -> pd.DataFrame:
    """`results` has columns model, concept, metric, value → wide table with (concept, metric + arrow) columns."""
    wide = results.pivot_table(index="model", columns=["concept", "metric"], values="value", sort=False)
    wide.columns = pd.MultiIndex.from_tuples(
        [(c, f"{m} {arrow(m, c in erased_concepts)}") for c, m in wide.columns], names=["concept", "metric"])
    order = list(dict.fromkeys(results["model"]))
    return wide.reindex(order)


def highlight(table: pd.DataFrame):
    """A pandas Styler with the best value of each column in bold and the second underlined."""
    def mark(column: pd.Series):
        ascending = column.name[1].endswith("↓")
        ranked = column.dropna().sort_values(ascending=ascending)
        styles = pd.Series("", index=column.index)
        if len(ranked) > 0:
            styles[ranked.index[0]] = "font-weight: bold"
        if len(ranked) > 1:
            styles[ranked.index[1]] = "text-decoration: underline"
        return styles
    return table.style.apply(mark).format("{:.2f}", na_rep="–")


def write_tables(table: pd.DataFrame, directory: Path, stem: str = "results", caption: str = "") -> dict[str, Path]:
    directory = Path(directory)
    paths = {"csv": directory / f"{stem}.csv", "md": directory / f"{stem}.md", "tex": directory / f"{stem}.tex"}
    atomic_write_text(table.to_csv(float_format="%.4f"), paths["csv"])
    flat = table.copy()
    flat.columns = [f"{c} {m}" for c, m in table.columns]
    atomic_write_text((caption + "\n\n" if caption else "") + flat.to_markdown(floatfmt=".2f") + "\n", paths["md"])
    atomic_write_text(table.to_latex(float_format="%.2f", na_rep="--", caption=caption or None,
                                     multicolumn_format="c"), paths["tex"])
    return paths
