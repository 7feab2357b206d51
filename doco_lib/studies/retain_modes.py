"""The toy version of the paper's Table 3: DoCo trained once per retain mode (none | l2 | cp), every model
judged on the same prompt sets and seeds (`doco toy erasure`)."""

from __future__ import annotations

from pathlib import Path

from doco_lib import config
from doco_lib.models import load_judge, load_pipeline
from doco_lib.studies import runs
from doco_lib.toy.erasure import cached_judged_rates, erasure_table, prompt_sets


def retain_mode_study(params: dict, retain_modes: list[str], samples: int | None = None):
    """Train DoCo once per retain mode (runs `<run_name>_<mode>`), then judge every model on the same
    prompt sets and seeds: the toy version of the paper's Table 3. Returns (table, erased UNet folders)."""

    base = load_pipeline(params["model"], params["device"])
    judge = load_judge(params["device"])
    words = [params["target"], params["anchor"]] + [w for w in params["related_concepts"]
                                                   if w not in (params["target"], params["anchor"])]
    sets = prompt_sets(params["target"], words, samples or params["eval_samples"], params["seed"])
    steps, guidance, seed = params["num_inference_steps"], params["guidance_scale"], params["seed"]
    before = cached_judged_rates(base, judge, sets, steps, guidance, seed,
                                 config.run_dir(params).with_name("original_judged_rates.json"))
    after, unets = {}, {}
    for mode in retain_modes:
        run = config.validate({**params, "run_name": f"{params['run_name']}_{mode}", "retain_mode": mode})
        pipe = runs.starting_pipeline(run)
        runs.prepare_anchors(run, pipe)
        trainer = runs.make_trainer(run, pipe)
        trainer.run(progress=False)
        unets[mode] = trainer.export(base_model=run["model"])["unet"]
        erased = load_pipeline(run["model"], run["device"], unet=str(unets[mode]))
        after[f"DoCo ({mode})"] = cached_judged_rates(erased, judge, sets, steps, guidance, seed,
                                                     Path(unets[mode]).parent / "judged_rates.json")
    return erasure_table(before, after), unets


def judged_rows(table, samples: int):
    """`doco toy erasure`'s table (with a `seed` column) as one row per seed, model and prompt set: the rows of
    the journal's artefact."""
    models = [c for c in table.columns if c not in ("prompt set", "seed") and not c.endswith("Δ (pts)")]
    rows = table.melt(id_vars=["seed", "prompt set"], value_vars=models, var_name="model", value_name="rate")
    return rows.assign(samples=samples)[["seed", "model", "prompt set", "samples", "rate"]]
