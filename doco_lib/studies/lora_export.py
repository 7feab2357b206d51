"""Does the exported LoRA erase what the full weights erase? (`doco toy lora-export`, the results journal's
`lora_export` artefact.)

Per seed: DoCo (cp) trained with the params' settings (`ablation.train_grid`, so a finished run is reused), its
weight change exported as a LoRA at `energy` of each layer's change energy (`doco export-lora`), then the original
model, the full erased weights and the base model with the LoRA loaded by `load_lora_weights` judged on the same
prompt sets and seeds (`export.judged_comparison`).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from doco_lib.errors import ParamsError
from doco_lib.export import DIFFUSERS_FILE, check_energy, export_from_folders, judged_comparison
from doco_lib.studies import ablation

VARIANT = "DoCo (cp)"


def lora_export_study(params: dict, seeds: list[int], samples: int, energy: float = 0.99) -> pd.DataFrame:
    """One row per seed, model (original | full weights | LoRA) and prompt set: the judged rate (0–1), with the
    export's size (LoRA layers, mean rank, the diffusers file's KiB) on every row of its seed."""
    check_energy(energy, "--energy")
    if samples < 1:
        raise ParamsError(f"--samples: {samples} images per prompt set; expected at least 1.")
    ablation.check_toy_study(params, [VARIANT], "--variant", "the LoRA export study",
                             "judge an SD LoRA with notebook 04")
    runs = ablation.train_grid(params, [VARIANT], seeds)
    parts = []
    for seed, unet in zip(runs["seed"], runs["unet"]):
        lora_dir = Path(unet).parent / "lora"
        report = export_from_folders(unet, params["model"], lora_dir, energy, "both")
        table = judged_comparison(params["model"], unet, lora_dir, params["target"], samples,
                                  params["num_inference_steps"], params["guidance_scale"], seed, params["device"])
        rates = table.drop(columns="LoRA − full (pts)").reset_index(names="prompt set")
        rows = rates.melt(id_vars="prompt set", var_name="model", value_name="rate")
        parts.append(rows.assign(seed=seed, samples=samples, rate=rows["rate"] / 100, energy=energy,
                                 lora_layers=report["layers"], rank_mean=round(report["rank_mean"], 2),
                                 diffusers_kib=round(report["files"][DIFFUSERS_FILE] / 1024, 1)))
    columns = ["seed", "model", "prompt set", "samples", "rate", "energy", "lora_layers", "rank_mean", "diffusers_kib"]
    return pd.concat(parts, ignore_index=True)[columns]

