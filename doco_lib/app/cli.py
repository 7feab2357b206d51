"""The `doco` command line."""

from __future__ import annotations

import argparse
import errno
import shlex
import sys
import time
from pathlib import Path

import pandas as pd

from doco_lib import config, costs
from doco_lib.app import journal
from doco_lib.app.batch import Manifest, run_batch, run_concept, write_report
from doco_lib.app.notebooks import run_notebooks
from doco_lib.config import check_value, load_params, parse_overrides, run_dir, write_resolved
from doco_lib.errors import DocoError, ParamsError
from doco_lib.evaluation import tables
from doco_lib.export import FORMATS, export_from_folders, judged_comparison, record_judged
from doco_lib.figures import save_images
from doco_lib.io import atomic_write_text, run_lock
from doco_lib.methods.harness import is_main_process, process_device, wait_for_everyone
from doco_lib.methods.sepme import compose_to_folder
from doco_lib.models import is_toy, load_judge, load_pipeline
from doco_lib.sampling import generate
from doco_lib.studies import (
    attack_study,
    damage_matrix,
    method_comparison,
    multi_concept,
    robustness,
    runs,
    sepme_study,
    styles_attributes,
    versions,
)
from doco_lib.studies.lora_export import lora_export_study
from doco_lib.studies.retain_modes import judged_rows, retain_mode_study
from doco_lib.studies.toy_world_quality import quality_rows
from doco_lib.toy import TOY_PIPELINES, TOY_WEIGHTS
from doco_lib.toy.build import build_toy_world
from doco_lib.toy.mmdit import build_toy_mmdit


def _cmd_toy_build(args) -> None:
    if args.wide and args.mmdit:
        raise config.ParamsError("--wide and --mmdit build different worlds; pass one of them.")
    world = "_wide" if args.wide else "_mmdit" if args.mmdit else ""
    cache = args.cache or Path.home() / ".cache" / "doco_lab" / f"toy_build{world}_seed{args.seed}"
    if args.mmdit:
        report = build_toy_mmdit(args.out or TOY_WEIGHTS / "pipeline_mmdit", cache, TOY_WEIGHTS, seed=args.seed,
                                 quick=args.quick, device=args.device)
    else:
        out = args.out or (TOY_WEIGHTS / "pipeline_wide" if args.wide else TOY_WEIGHTS)
        report = build_toy_world(out, cache, seed=args.seed, quick=args.quick, device=args.device,
                                 wide_from=TOY_WEIGHTS if args.wide else None)
    print({k: round(v["mean"], 3) for k, v in report["final_quality"].items()})


def _cmd_toy_erasure(args) -> None:
    params = load_params(args.params)
    if args.record and args.record not in journal.RENDERERS:
        raise ParamsError(f"--record: {args.record!r} is no artefact of docs/results; expected one of "
                          f"{', '.join(journal.RENDERERS)}.")
    started, parts = time.time(), []
    for seed in args.seeds or [params["seed"]]:
        run = config.seeded_run(params, seed) if args.seeds else params
        table, _ = retain_mode_study(run, args.retain_modes, args.samples)
        parts.append(table.assign(seed=seed))
        print(f"seed {seed}:\n{table.round(3).to_string(index=False)}")
    table = pd.concat(parts, ignore_index=True)
    path = run_dir(params).parent / f"{params['run_name']}_retain_modes.csv"
    atomic_write_text(table.to_csv(index=False), path)
    print(f"written to {path}")
    if args.record:
        samples = args.samples or params["eval_samples"]
        journal.record(args.record, judged_rows(table, samples), "doco " + shlex.join(map(str, args.argv)), started)
        print(f"artefact docs/results/{args.record}.csv recorded; `doco results` updates docs/results.md")


def _report_study(args, artefact: str, rows: pd.DataFrame, written: list[Path], started: float) -> None:
    """Print a study's rows as the results journal renders them and, with --record, record them as `artefact`."""
    print(journal.RENDERERS[artefact](rows), f"\nwritten to {', '.join(map(str, written))}", sep="\n")
    if args.record:
        journal.record(artefact, rows, "doco " + shlex.join(map(str, args.argv)), started)
        print(f"artefact docs/results/{artefact}.csv recorded; `doco results` updates docs/results.md")


def _write_rows(rows: pd.DataFrame, path: Path) -> list[Path]:
    atomic_write_text(rows.to_csv(index=False), path)
    return [path]


def _cmd_toy_lora_export(args) -> None:
    params = load_params(args.params, parse_overrides(args.set))
    started = time.time()
    rows = lora_export_study(params, args.seeds, args.samples, args.energy)
    _report_study(args, "lora_export", rows, _write_rows(rows, run_dir(params) / "lora_export.csv"), started)


def _cmd_toy_quality(args) -> None:
    params = load_params(args.params, parse_overrides(args.set))
    started = time.time()
    rows = quality_rows(args.models, args.seeds, args.samples, params["num_inference_steps"],
                        params["guidance_scale"], params["device"])
    _report_study(args, "toy_world", rows, _write_rows(rows, run_dir(params) / "toy_world_quality.csv"), started)


def _cmd_toy_attacks(args) -> None:
    """The attack study: `attack_variants` trained per seed as in notebook 05, every attack on each (notebook 07).
    Each (seed, model) is a chunk under <run>/attacks/chunks/, reused by the next call: `--shard K/N` runs one of N
    shards (a process each, side by side), a last call without it combines them and writes the tables; --record
    records them as the part named by the seeds of the world's artefacts (`attacks` and `relearning`; on toy-mmdit
    `attacks_toy_mmdit` and `relearning_toy_mmdit`)."""
    params = load_params(args.params, parse_overrides(args.set))
    seeds = args.seeds or params["attack_model_seeds"]
    if args.shard and args.record:
        raise ParamsError("--record with --shard: a shard measures some models only; record with a last call "
                          "without --shard, which reuses every chunk the shards measured.")
    artefacts = _world_artefacts(params, ["attacks", "relearning"]) if args.record else []
    shard, shards = args.shard or (1, 1)
    variants, original = attack_study.shard_variants(params["attack_variants"], shard, shards)
    started = time.time()
    models = attack_study.train_models(params, variants, seeds, params["attack_unets"] if original else [])
    out = run_dir(params) / "attacks"
    write_resolved(params, out)
    study = attack_study.attack_study(params, models, store=out / "chunks", original=original, seeds=seeds)
    if args.shard:
        print(f"shard {shard}/{shards}: {len(study.attempts)} attempts under {out / 'chunks'}; a call without "
              "--shard combines the shards")
        return
    written = list(attack_study.write_study(study, out).values())
    print(journal.RENDERERS["attacks"](study.rows), journal.RENDERERS["relearning"](study.relearning),
          f"written to {', '.join(map(str, written))}", sep="\n\n")
    if args.record:
        _record_parts(args, dict(zip(artefacts, (study.rows, study.relearning))), seeds,
                      attack_study.study_identity(params), started)


def _world_artefacts(params: dict, studies: list[str]) -> list[str]:
    """The artefacts `studies` are recorded as on the params' toy world (`versions.artefact_name`), refused before
    any run for a world that has none in docs/results.md."""
    def recorded_on(model: str) -> list[str] | None:
        names = [versions.artefact_name(study, {"model": model}) for study in studies]
        return names if all(name in journal.RENDERERS for name in names) else None

    if recorded_on(params["model"]) is None:
        worlds = [world for world in journal.WORLDS if recorded_on(world)]
        raise ParamsError(f"model: {params['model']!r} has no artefact {' or '.join(studies)} in docs/results.md "
                          f"(worlds with them: {', '.join(worlds)}); run without --record.")
    return recorded_on(params["model"])


def _record_parts(args, artefacts: dict[str, pd.DataFrame], seeds: list[int], identity: str, started: float) -> None:
    """Record each artefact's rows as its part named by `seeds` (a study recorded seed by seed)."""
    part = "seeds_" + "_".join(map(str, sorted(seeds)))
    for name, rows in artefacts.items():
        wrote = journal.record(name, rows, "doco " + shlex.join(map(str, args.argv)), started, part=part,
                               identity=identity)
        print(f"docs/results/{name}/{part}.csv " + ("recorded" if wrote else "unchanged: the rows already recorded"))
    print("`doco results` updates docs/results.md")


def _seeded_study(toy, name: str, summary: str, params: str, seeds_key: str, artefacts: str, func):
    """A `doco toy` study recorded seed by seed: --params, --set, --seeds (default: the params' `seeds_key`) and
    --record (the seeds' part of `artefacts`)."""
    study = toy.add_parser(name, help=summary)
    study.add_argument("--params", default=params)
    study.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a params key "
                       "(eval_samples: judged images per prompt set and seed)")
    study.add_argument("--seeds", type=int, nargs="+", help=f"training seeds (default: {seeds_key})")
    study.add_argument("--record", action="store_true", help=f"write the rows as the seeds' part of the world's "
                       f"artefacts in docs/results ({artefacts})")
    study.set_defaults(func=func)
    return study


def _shard(text: str) -> tuple[int, int]:
    try:
        shard, shards = (int(n) for n in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected K/N, e.g. 1/2") from None
    return shard, shards


def _cmd_toy_methods(args) -> None:
    """Notebook 05's method comparison, per seed: `ablation_variants` trained (or reused) and judged, their cost
    records, and (unless --no-sweep) the target judged across sampling settings; --record records the seeds' part of
    the world's artefacts (`methods`, `method_costs`, `sampling_sweep`; `methods_toy_mmdit`, …:
    `versions.artefact_name`)."""
    params = load_params(args.params, parse_overrides(args.set))
    seeds = args.seeds or params["ablation_seeds"]
    studies = ["methods", "method_costs"] + ([] if args.no_sweep else ["sampling_sweep"])
    artefacts = _world_artefacts(params, studies) if args.record else []
    started = time.time()
    measured = method_comparison.study_rows(params, params["ablation_variants"], seeds,
                                            args.samples or params["eval_samples"], sweep=not args.no_sweep)
    written = [path for study, rows in measured.items() for path in
               _write_rows(rows, run_dir(params) / ("method_comparison.csv" if study == "methods" else f"{study}.csv"))]
    print(*(journal.WORLD_STUDIES[study](rows) for study, rows in measured.items()),
          f"written to {', '.join(map(str, written))}", sep="\n\n")
    if args.record:
        _record_parts(args, dict(zip(artefacts, measured.values())), seeds, method_comparison.study_identity(params),
                      started)


def _cmd_toy_damage_matrix(args) -> None:
    """Notebook 09's collateral-damage matrix, per seed: `damage_variants` erase each of `damage_shapes` (runs
    trained or reused), every shape judged after each; --record records the seeds' part of artefact
    `damage_matrix`."""
    params = load_params(args.params, parse_overrides(args.set))
    seeds = args.seeds or [params["damage_seed"]]
    artefacts = _world_artefacts(params, ["damage_matrix"]) if args.record else []
    started = time.time()
    rows = damage_matrix.matrix_rows(params, params["damage_variants"], params["damage_shapes"], seeds)
    written = _write_rows(rows, run_dir(params) / "damage_matrix" / "matrix_rows.csv")
    print(journal.damage_matrix_table(rows), f"\nwritten to {', '.join(map(str, written))}", sep="\n")
    if args.record:
        _record_parts(args, dict(zip(artefacts, [rows])), seeds, damage_matrix.study_identity(params), started)


def _cmd_toy_multi_concept(args) -> None:
    """Notebook 05's multi-concept erasure, per seed: `sequential_stages` erased one after another and all at once
    (runs trained or reused), each judged; --record records the seeds' part of artefact `multi_concept`."""
    params = load_params(args.params, parse_overrides(args.set))
    seeds = args.seeds or params["multi_concept_seeds"]
    artefacts = _world_artefacts(params, ["multi_concept"]) if args.record else []
    started = time.time()
    rows = multi_concept.multi_concept_rows(params, seeds)
    written = _write_rows(rows, run_dir(params) / "multi_concept.csv")
    print(journal.multi_concept_table(rows), f"\nwritten to {', '.join(map(str, written))}", sep="\n")
    if args.record:
        _record_parts(args, dict(zip(artefacts, [rows])), seeds, multi_concept.study_identity(params), started)


def _cmd_toy_styles_attributes(args) -> None:
    """Notebook 10's toy Table 2 and Figure 6, per seed: the style and attribute runs trained (or reused) and
    measured; --record records the seeds' part of artefacts `styles`, `implicit_attribute` and `attribute_colours`."""
    params = load_params(args.params, parse_overrides(args.set))
    seeds = args.seeds or params["study_seeds"]
    artefacts = _world_artefacts(params, list(styles_attributes.ARTEFACTS)) if args.record else []
    started = time.time()
    studies = styles_attributes.study_rows(params, seeds)
    written = [path for name, rows in studies.items() for path in _write_rows(rows, run_dir(params) / f"{name}.csv")]
    print(*(journal.RENDERERS[name](rows) for name, rows in studies.items()),
          f"written to {', '.join(map(str, written))}", sep="\n\n")
    if args.record:
        _record_parts(args, dict(zip(artefacts, studies.values())), seeds, styles_attributes.study_identity(params),
                      started)


def _cmd_toy_sepme(args) -> None:
    params = load_params(args.params, parse_overrides(args.set))
    started = time.time()
    rows = sepme_study.subset_rates_over_seeds(params, args.seeds, args.samples or params["eval_samples"])
    _report_study(args, "sepme", rows, _write_rows(rows, run_dir(params) / "sepme_subset_rates.csv"), started)


def _cmd_results(args) -> None:
    differing = journal.sync(check=args.check)
    if args.check and differing:
        raise DocoError(f"docs/results.md: the tables of {', '.join(differing)} differ from their artefacts in "
                        "docs/results/; run `doco results` to regenerate them.")
    print("docs/results.md " + ("matches its artefacts" if args.check else
                                f"regenerated ({', '.join(differing) or 'nothing changed'})"))
    if args.figures:
        print("drawn: " + ", ".join(map(str, journal.draw_figures())))


def _cmd_sample(args) -> None:
    # Sampling defaults per model: the toy world's settings, or Stable Diffusion's own (50 steps, guidance 7.5).
    toy = is_toy(args.model)
    args.steps = args.steps if args.steps is not None else 25 if toy else 50
    args.guidance = args.guidance if args.guidance is not None else 5.0 if toy else 7.5
    for key, value in (("model", args.model), ("seed", args.seed), ("num_inference_steps", args.steps),
                       ("guidance_scale", args.guidance), ("device", args.device)):
        check_value(key, value)
    if args.n < 1:
        raise ParamsError(f"-n: {args.n} images asked for; expected at least 1.")
    if args.unet is not None and not (Path(args.unet) / "config.json").is_file():
        raise ParamsError(f"--unet: {args.unet!r} is not a diffusers UNet folder (expected config.json and "
                          "diffusion_pytorch_model.safetensors inside).")
    pipe = load_pipeline(args.model, args.device, unet=args.unet, trust_pickle=args.trust_pickle)
    images = generate(pipe, [args.prompt] * args.n, [args.seed + i for i in range(args.n)], args.steps, args.guidance)
    paths = save_images(images, Path(args.out))
    print(f"wrote {len(paths)} images and grid.png to {args.out}")


def _cmd_demo(args) -> None:
    for path in run_notebooks(args.params, tuple(args.notebooks or ()), parse_overrides(args.set)):
        print(f"executed {path}")


def _cmd_run(args) -> None:
    """One concept of a batch: its notebooks in order, recorded in the batch manifest."""
    params_file = Path(args.params)
    manifest = Manifest(Path(args.output_root) / args.run_id / "manifest.json")
    ok = run_concept(params_file, args.run_id, Path(args.output_root), manifest,
                     tuple(args.notebooks or config.BATCH_NOTEBOOKS), args.force, args.device,
                     lambda: manifest.save_concept(params_file.stem), parse_overrides(args.set))
    if not ok:
        raise SystemExit(f"doco: error: {params_file.stem}: {manifest.concept(params_file.stem).get('error')}")


def _cmd_batch(args) -> None:
    failures = run_batch(args.params, args.run_id, Path(args.output_root), args.jobs, args.force, args.device,
                         tuple(args.notebooks or config.BATCH_NOTEBOOKS), parse_overrides(args.set))
    manifest = Path(args.output_root) / args.run_id / "manifest.json"
    if failures:
        raise SystemExit("doco: batch finished with failures:\n" + "\n".join(f"  {line}" for line in failures) +
                         f"\nmanifest: {manifest}")
    print(f"all concepts done; manifest: {manifest}")


def _cmd_report(args) -> None:
    print(f"report: {write_report(Path(args.run_folder))}")


def _cmd_eval(args) -> None:
    params = load_params(args.params)
    runs.evaluated_models(params)  # fail on a missing model before generating
    out = runs.evaluation_dir(params)
    write_resolved(params, run_dir(params))
    judge = load_judge(params["device"]) if is_toy(params["model"]) else None
    results, timing = runs.run_evaluation(params, judge=judge)
    table = tables.paper_table(results[results.metric.isin(tables.METRICS)], set(params["erased_concepts"]))
    paths = tables.write_tables(table, out)
    print(table.round(2).to_string())
    print(f"{timing['seconds']:.1f} s, {timing['images_generated']} images generated; tables: {paths['md']}")


def _cmd_train(args) -> None:
    """Data preparation (if not cached yet), training of `method` and export, without the notebooks.

    Under torchrun or `accelerate launch` every process trains (data-parallel, on its own device); the main
    process alone locks the run folder and writes to it (params, anchor images, checkpoints, exports), the
    others wait for it where they need what it wrote."""
    import contextlib

    import torch.distributed

    params = load_params(args.params, parse_overrides(args.set))
    if params["method"] == "sepme":  # one increment, outside the harness (`runs.train_sepme`)
        with run_lock(run_dir(params)):
            write_resolved(params, run_dir(params))
            paths = runs.train_sepme(params, progress=not args.quiet)
        for name, path in paths.items():
            print(f"{name}: {path}")
        return
    process_device(params["device"])  # joins the process group of a launch: which process is the main one
    main = is_main_process()
    with run_lock(run_dir(params)) if main else contextlib.nullcontext():
        if main:
            write_resolved(params, run_dir(params))
        pipe = runs.starting_pipeline(params)
        if main:
            with costs.phase("anchors", run_dir(params)):
                runs.prepare_anchors(params, pipe)
        wait_for_everyone()  # the anchor latents are complete
        trainer = runs.make_trainer(params, pipe)
        trainer.run(progress=not args.quiet)
        paths = trainer.export(base_model=params["model"])
        wait_for_everyone()  # the exports are complete
    if main:
        for name, path in paths.items():
            print(f"{name}: {path}")
    if torch.distributed.is_initialized():  # under a launch, even of one process (accelerate joins it then)
        torch.distributed.destroy_process_group()


def _cmd_attack(args) -> None:
    """Attacks (doco_lib/studies/attacks) on the base model and each erased UNet: attack success rates."""
    overrides = parse_overrides(args.set) | {key: value for key, value in (("attack_attempts", args.attempts),
                                                                          ("attacks", args.attack)) if value is not None}
    params = load_params(args.params, overrides)
    robustness.check_unets(args.unet)  # before any generation
    out = Path(args.out) if args.out else run_dir(params) / "attack"
    write_resolved(params, out)
    results = robustness.attack_models(params, {"original": None, **robustness.label_unets(args.unet)})
    table, paths = robustness.write_results(results, out)
    print(table.round(1).to_string(index=False))
    print(f"tables: {paths['asr.md']}, {paths['asr.csv']}; plot: {paths['asr.png']}")


def _cmd_compose(args) -> None:
    """SepME: the base UNet or transformer with the chosen concepts' increments added, the others left out (restored)."""
    out = compose_to_folder(args.base, Path(args.increments), args.erase, Path(args.out), device=args.device)
    print(f"wrote the denoiser with {args.erase} erased to {out} (use it with doco sample --unet {out})")


def _cmd_export_lora(args) -> None:
    """An erased UNet's weight change as a LoRA (diffusers and/or kohya), judged against the full weights."""
    if args.judge and args.samples < 1:
        raise ParamsError(f"--samples: {args.samples} images per prompt set; expected at least 1.")
    report = export_from_folders(args.unet, args.model, args.out, args.energy, args.format)
    print(f"{report['layers']} layers, rank {report['rank_min']}-{report['rank_max']} (mean {report['rank_mean']:.1f}) "
          f"at {100 * args.energy:g}% of each layer's change energy; "
          + ", ".join(f"{name} {size / 1024:.1f} KiB" for name, size in report["files"].items()))
    if report["left_out"]:
        print(f"left out (no LoRA form): {len(report['left_out'])} tensors, "
              f"{100 * report['left_out_energy_share']:.3f}% of the change's energy")
    if args.judge:
        if "target" not in report:
            raise ParamsError(f"--judge: no erasure.json beside {args.unet} names the erased concept.")
        table = judged_comparison(args.model, args.unet, args.out, report["target"], args.samples, seed=args.seed,
                                  device=args.device)
        record_judged(Path(args.out), table, args.samples)
        print(table.round(1).to_string())
    print(f"written to {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="doco", description="DoCo lab: concept erasure in diffusion models.")
    commands = parser.add_subparsers(dest="command", required=True)

    toy = commands.add_parser("toy", help="the embedded toy world").add_subparsers(dest="toy_command", required=True)
    build = toy.add_parser("build", help="train the toy world from a seed (resumable)")
    build.add_argument("--out", type=Path, help="where to write the built weights (default: the package's)")
    build.add_argument("--cache", type=Path, help="checkpoint folder (default: ~/.cache/doco_lab/toy_build_seedS)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--quick", action="store_true", help="a few steps per stage: checks the code, not quality")
    build.add_argument("--device", default="cpu")
    build.add_argument("--wide", action="store_true", help="the SepME toy world's pipeline ('toy-wide'): a text "
                       "encoder 96 wide for 16 token rows, on the shipped world's judge, VAE and tokenizer")
    build.add_argument("--mmdit", action="store_true", help="the toy MMDiT world's pipeline ('toy-mmdit'): an SD 3-style "
                       "transformer trained by flow matching, on the shipped world's judge, VAE and text encoder")
    build.set_defaults(func=_cmd_toy_build)
    study = toy.add_parser("erasure", help="train DoCo per retain mode and judge the erasure (toy Table 3)")
    study.add_argument("--params", default="params/toy_world.yaml")
    study.add_argument("--retain-modes", nargs="+", default=["none", "l2", "cp"], choices=["none", "l2", "cp", "rgd"])
    study.add_argument("--samples", type=int, help="images per prompt set (default: eval_samples)")
    study.add_argument("--seeds", type=int, nargs="+", help="one study per seed (runs <run_name>_seed<S>; default: "
                       "the params' seed)")
    study.add_argument("--record", metavar="NAME", help="write the judged rates as artefact NAME of docs/results "
                       "(retain_modes)")
    study.set_defaults(func=_cmd_toy_erasure)

    lora = toy.add_parser("lora-export", help="train DoCo (cp) per seed, export each as a LoRA and judge it against "
                          "the full weights")
    lora.add_argument("--params", default="params/toy_world.yaml")
    lora.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a params key")
    lora.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    lora.add_argument("--samples", type=int, default=64, help="judged images per prompt set, model and seed")
    lora.add_argument("--energy", type=float, default=0.99, help="share of each layer's change energy kept")
    lora.add_argument("--record", action="store_true", help="write the rows as artefact lora_export of docs/results")
    lora.set_defaults(func=_cmd_toy_lora_export)

    quality = toy.add_parser("quality", help="how often the judge names the prompted shape, colour and style of a "
                             "toy model's samples")
    quality.add_argument("--params", default="params/toy_world.yaml", help="sampling steps, guidance and device")
    quality.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a params key")
    quality.add_argument("--models", nargs="+", default=["toy", "toy-wide", "toy-mmdit"], choices=list(TOY_PIPELINES))
    quality.add_argument("--seeds", type=int, nargs="+", default=[0, 1000, 2000],
                         help="base seeds, at least --samples apart (image i uses seed + i)")
    quality.add_argument("--samples", type=int, default=64, help="judged images per prompted value, model and seed")
    quality.add_argument("--record", action="store_true", help="write the rows as artefact toy_world of docs/results")
    quality.set_defaults(func=_cmd_toy_quality)

    attack = _seeded_study(toy, "attacks", "train attack_variants per seed as notebook 05 does and run every attack "
                           "of attacks on each (notebook 07's study): ASR with intervals, cost, controls",
                           "params/toy_attacks.yaml", "attack_model_seeds",
                           "attacks and relearning; toy-mmdit: attacks_toy_mmdit and relearning_toy_mmdit",
                           _cmd_toy_attacks)
    attack.add_argument("--shard", type=_shard, metavar="K/N", help="train and attack shard K of N of the models only "
                        "(round robin; run the N side by side, then once without --shard to combine)")
    methods = _seeded_study(toy, "methods", "notebook 05's method comparison per seed: ablation_variants trained (or "
                            "reused) and judged, each shape's rate and UA / IRA / CRA, their costs and the sampling "
                            "sweep", "params/toy_methods.yaml", "ablation_seeds",
                            "methods, method_costs, sampling_sweep; on toy-mmdit each with _toy_mmdit", _cmd_toy_methods)
    methods.add_argument("--samples", type=int, help="judged images per prompt set and seed (default: eval_samples)")
    methods.add_argument("--no-sweep", action="store_true", help="judge at the params' sampling settings only, "
                         "without the sweep over sweep_guidance_scales and sweep_steps (and its artefact)")
    _seeded_study(toy, "damage-matrix", "notebook 09's collateral-damage matrix per seed: damage_variants erase each "
                  "of damage_shapes in turn, every shape judged after each", "params/toy_damage_matrix.yaml",
                  "damage_seed", "damage_matrix", _cmd_toy_damage_matrix)
    _seeded_study(toy, "multi-concept", "notebook 05's multi-concept erasure per seed: sequential_stages erased one "
                  "after another and all at once, each judged", "params/toy_methods.yaml", "multi_concept_seeds",
                  "multi_concept", _cmd_toy_multi_concept)
    _seeded_study(toy, "styles-attributes", "notebook 10's toy Table 2 (styles) and Figure 6 (an implicit attribute) "
                  "per seed: the runs trained (or reused) and measured", "params/toy_styles_attributes.yaml",
                  "study_seeds", "styles, implicit_attribute and attribute_colours", _cmd_toy_styles_attributes)

    sepme_seeds = toy.add_parser("sepme", help="SepME's increments trained per seed, every subset of them judged "
                                 "(notebook 08's table over seeds)")
    sepme_seeds.add_argument("--params", default="params/toy_sepme.yaml")
    sepme_seeds.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a params key")
    sepme_seeds.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    sepme_seeds.add_argument("--samples", type=int, help="judged images per prompt set (default: eval_samples)")
    sepme_seeds.add_argument("--record", action="store_true", help="write the rows as artefact sepme of docs/results")
    sepme_seeds.set_defaults(func=_cmd_toy_sepme)

    results = commands.add_parser("results", help="regenerate docs/results.md's tables from their artefacts in "
                                  "docs/results/")
    results.add_argument("--check", action="store_true", help="change nothing; fail when a table differs")
    results.add_argument("--figures", action="store_true", help="also draw the figures drawn from artefacts (the "
                         "attack study's, the damage matrix) into docs/figures/")
    results.set_defaults(func=_cmd_results)

    sample = commands.add_parser("sample", help="write N images for a prompt from a diffusers SD pipeline")
    sample.add_argument("--model", default="toy", help="'toy', a pipeline folder or a hub id")
    sample.add_argument("--unet", help="an erased UNet folder to use instead of the pipeline's")
    sample.add_argument("--prompt", required=True)
    sample.add_argument("-n", type=int, default=4)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--steps", type=int, help="denoising steps (default: 25 in a toy world, else 50)")
    sample.add_argument("--guidance", type=float, help="guidance scale (default: 5 in a toy world, else 7.5)")
    sample.add_argument("--device", default="auto")
    sample.add_argument("--out", required=True)
    sample.add_argument("--trust-pickle", action="store_true",
                        help="also load pickle weights (.bin/.ckpt): only for files from a source you trust")
    sample.set_defaults(func=_cmd_sample)

    train = commands.add_parser("train", help="prepare anchor data and train (DoCo or a baseline) from a params file")
    train.add_argument("--params", required=True)
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a key of the params file, VALUE read as YAML (e.g. batch_size=2); repeatable")
    train.set_defaults(func=_cmd_train)

    for name, helptext in (("batch", "run the numbered notebooks for each concept (params files, folders, globs)"),
                           ("run", "run the numbered notebooks for one concept of a batch")):
        sub = commands.add_parser(name, help=helptext)
        if name == "batch":
            sub.add_argument("params", nargs="+", help="params files, folders of them, or globs")
            sub.add_argument("--jobs", type=int, default=1, help="concepts at once (one GPU each when there are GPUs)")
        else:
            sub.add_argument("--params", required=True)
        sub.add_argument("--run-id", default=time.strftime("batch-%Y%m%d-%H%M%S"))
        sub.add_argument("--output-root", default="outputs")
        sub.add_argument("--notebooks", nargs="+", help="only these notebooks, in order")
        sub.add_argument("--force", action="store_true", help="rerun notebooks that are already done")
        sub.add_argument("--device", help="override the params files' device")
        sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a key of every params file, VALUE read as YAML; repeatable")
        sub.set_defaults(func=_cmd_batch if name == "batch" else _cmd_run)

    report = commands.add_parser("report", help="summarise a batch: statuses, durations, every concept's tables")
    report.add_argument("run_folder", help="the batch's folder, outputs/<run_id>; writes report.md there")
    report.set_defaults(func=_cmd_report)

    evaluate = commands.add_parser("eval", help="evaluate the base and erased models (CS, CA, FID) into tables")
    evaluate.add_argument("--params", required=True)
    evaluate.set_defaults(func=_cmd_eval)

    adversarial = commands.add_parser("attack", help="attacks on the base and erased models: "
                                      "attack success rate (ASR) table and plot")
    adversarial.add_argument("--params", required=True, help="the run's params file (model, target, attack_* budget)")
    adversarial.add_argument("--unet", action="append", default=[],
                             help="an erased UNet folder, or an SD 3 transformer folder (repeat for several)")
    adversarial.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a params key")
    adversarial.add_argument("--attempts", type=int, help="attempts per model and attack (default: attack_attempts)")
    adversarial.add_argument("--attack", "--kinds", nargs="+", metavar="NAME",
                             help=f"attacks, any of {', '.join(config.ATTACKS)} (default: the params' attacks)")
    adversarial.add_argument("--out", help="folder for asr.csv, asr.md, asr.png, attempts.csv (default: <run>/attack)")
    adversarial.set_defaults(func=_cmd_attack)

    composer = commands.add_parser("compose", help="SepME: a UNet or SD 3.x / FLUX.1 transformer with chosen concepts "
                                   "erased, from per-concept increments (concepts left out stay restored)")
    composer.add_argument("--base", required=True,
                          help="the increments' base model: 'toy', a pipeline folder or a hub id")
    composer.add_argument("--increments", required=True,
                          help="folder of SepME increments, one *.safetensors per concept")
    composer.add_argument("--erase", required=True, help="concepts to erase, comma-separated (e.g. 'van gogh,picasso')")
    composer.add_argument("--out", required=True, help="where to write the composed diffusers UNet or transformer "
                                                        "folder")
    composer.add_argument("--device", default="cpu", help="where to add the increments (default: cpu)")
    composer.set_defaults(func=_cmd_compose)

    lora = commands.add_parser("export-lora", help="an erased UNet's weight change as a LoRA (truncated SVD per "
                               "layer): diffusers/PEFT and kohya (A1111, ComfyUI) files, report and model card")
    lora.add_argument("--unet", required=True, help="the erased UNet folder (e.g. outputs/toy_world/doco/unet)")
    lora.add_argument("--model", required=True, help="its base model: 'toy', a pipeline folder or a hub id")
    lora.add_argument("--out", required=True, help="the LoRA folder to write")
    lora.add_argument("--energy", type=float, default=0.99,
                      help="share of each layer's change energy (sum of squared singular values) to keep")
    lora.add_argument("--format", choices=FORMATS, default="both")
    lora.add_argument("--judge", action="store_true", help="toy world: judge the LoRA's erasure against the full "
                      "weights on every toy shape (slow: 3 models x 9 prompt sets)")
    lora.add_argument("--samples", type=int, default=64, help="images per prompt set for --judge")
    lora.add_argument("--seed", type=int, default=0)
    lora.add_argument("--device", default="cpu")
    lora.set_defaults(func=_cmd_export_lora)

    demo = commands.add_parser("demo", help="run the numbered notebooks for one params file (default: the toy world "
                               "end to end, notebooks 00-04; 01-04 on a real model)")
    demo.add_argument("--params", default="params/toy_world.yaml")
    demo.add_argument("--notebooks", nargs="+", help="only these notebooks (names without .ipynb), in order")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a key of the params file, VALUE read as YAML (e.g. multi_concept_seeds=[0,1,2]); "
                           "repeatable")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from papermill.exceptions import PapermillExecutionError

    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what the run records as its command
    try:
        args.func(args)
    except DocoError as error:
        print(f"doco: error: {error}", file=sys.stderr)
        return error.exit_status
    except FileNotFoundError as error:
        print(f"doco: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"doco: error: {error.filename}: {error.strerror}; free some disk space or fix the folder's permissions, "
              "then rerun: it resumes, and files already written were left intact", file=sys.stderr)
        return 2
    except PapermillExecutionError as error:
        print(f"doco: error: notebook cell {error.exec_count} raised {error.ename}: {error.evalue} "
              "(the executed notebook under outputs/ shows the cell and the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
