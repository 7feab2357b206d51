"""The DoCo paper's published numbers (Tables 1 and 2, single-concept erasure), typed in as data, so that
SD runs can show them as reference rows labelled "paper: …". Metrics as the paper reports them (CS, CA in
%, FID against the original model's images); '-' in the paper is None here."""

from __future__ import annotations

import pandas as pd

_TABLE1_CONCEPTS = ("Snoopy", "Mickey", "SpongeBob", "Pikachu")
# Table 1, SD v1.4 and "Erasing Snoopy": CS, CA, FID per concept.
_TABLE1 = {
    "SD v1.4": (74.29, 93.01, None, 72.07, 93.25, None, 72.80, 90.38, None, 72.48, 94.76, None),
    "ESD": (45.12, 15.62, 179.04, 52.79, 30.62, 141.35, 56.15, 38.62, 132.60, 64.76, 73.12, 71.70),
    "ConAbl": (63.47, 74.87, 88.79, 69.23, 83.37, 51.77, 70.12, 86.37, 58.08, 70.14, 83.62, 61.97),
    "SPM": (55.15, 40.25, 110.22, 71.63, 92.12, 26.45, 72.53, 81.00, 31.22, 72.27, 94.75, 18.53),
    "DoCo": (49.29, 36.00, 209.92, 69.86, 84.00, 48.17, 70.52, 82.00, 56.55, 70.75, 86.75, 52.27),
}
_TABLE2_CONCEPTS = ("Van Gogh", "Picasso", "Rembrandt", "Andy Warhol", "Caravaggio")
# Table 2, SD v1.4 and "Erasing Van Gogh": CS, FID per style.
_TABLE2 = {
    "SD v1.4": (74.31, None, 69.67, None, 72.46, None, 69.09, None, 72.60, None),
    "ESD": (50.64, 195.76, 63.48, 94.88, 65.10, 93.35, 61.63, 124.43, 65.18, 90.54),
    "ConAbl": (54.60, 180.47, 62.83, 95.93, 65.96, 87.54, 65.46, 101.18, 64.54, 91.22),
    "SPM": (51.80, 198.65, 68.96, 35.39, 70.53, 56.12, 70.45, 60.71, 72.06, 62.20),
    "DoCo": (49.58, 223.88, 65.67, 73.65, 71.06, 63.58, 65.82, 107.00, 69.97, 83.39),
}
PAPER_TABLES = {"Snoopy": (_TABLE1_CONCEPTS, ("CS", "CA", "FID"), _TABLE1),
                "Van Gogh": (_TABLE2_CONCEPTS, ("CS", "FID"), _TABLE2)}


def reference_rows(erased: str, concepts: list[str] | None = None) -> pd.DataFrame:
    """Long-form rows (model, concept, metric, value) of the paper's table for erasing `erased`;
    empty when the paper has no such table. `concepts` keeps only those columns."""
    if erased not in PAPER_TABLES:
        return pd.DataFrame(columns=["model", "concept", "metric", "value"])
    names, metrics, rows = PAPER_TABLES[erased]
    records = []
    for method, values in rows.items():
        for i, value in enumerate(values):
            concept, metric = names[i // len(metrics)], metrics[i % len(metrics)]
            if concepts is None or concept in concepts:
                records.append({"model": f"paper: {method}", "concept": concept, "metric": metric, "value": value})
    return pd.DataFrame(records)
