"""From validated params to the objects the notebooks work with; one place, so notebooks stay short."""

from __future__ import annotations

from pathlib import Path

from doco_lib import config, export
from doco_lib.anchors import (
    MANIFEST,
    AnchorLatents,
    cache_is_complete,
    load_anchor_latents,
    prepare_anchor_latents,
    vae_scaling,
)
from doco_lib.concepts import ConceptSpec, read_preservation_file, read_prompt_file
from doco_lib.evaluation.cache import model_caches
from doco_lib.evaluation.nudity import read_i2p_csv
from doco_lib.evaluation.runner import EvaluatedModel, evaluate
from doco_lib.io import atomic_directory, ignore_temporaries
from doco_lib.methods import sepme
from doco_lib.methods.baselines import TRAINERS
from doco_lib.methods.discriminator import check_discriminator_fits
from doco_lib.methods.harness import (
    DTYPES,
    DocoTrainer,
    ErasureTrainer,
    TrainingConfig,
    check_weight_dtype,
    launched_processes,
    process_device,
    resolve_precision,
)
from doco_lib.methods.rgd_prompts import load_slots, prompt_pairs
from doco_lib.models import (
    base_denoiser_class,
    denoiser,
    denoiser_kind,
    is_toy,
    latent_shape,
    load_pipeline,
    toy_weights_dir,
)
from doco_lib.sampling import sampling_settings
from doco_lib.studies import sepme_study


def starting_pipeline(params: dict):
    """The model a run starts from: the base model, or an erased UNet on it (`base_unet`, sequential erasure), on
    this process's device (under torchrun or `accelerate launch`, each process its own), in `weight_dtype` (what
    the run trains is made float32 by the trainer)."""
    device = process_device(params["device"])
    check_weight_dtype(params["weight_dtype"], resolve_precision(params["mixed_precision"], device))  # before loading
    return load_pipeline(params["model"], str(device), dtype=DTYPES[params["weight_dtype"]],
                         unet=params.get("base_unet") or None)


def train_sepme(params: dict, progress: bool = True) -> dict[str, Path]:
    """`method: sepme` through `doco train`: the target's SepME increment on the params' model, decoupled against ""
    and the other `sepme_concepts`' name prompts (notebook 08's training, on the model's own images of the target),
    composed onto the base denoiser as `<run>/sepme/unet`, which notebook 04 evaluates as any method's, beside
    `increments/` (`doco compose` erases and restores from them) and the cost record. Reused while its settings
    are unchanged."""
    target = params["target"]  # one of sepme_concepts (`config`)
    if launched_processes() > 1:
        raise config.ParamsError("method: sepme trains on one process; run doco train without torchrun or "
                                 "accelerate launch.")
    run = {**params, "sepme_model": params["model"]}
    pipe = load_pipeline(params["model"], params["device"], dtype=DTYPES["float32"])  # the increment trains
    summary = sepme_study.train_increments(run, pipe, progress=progress, concepts=[target]).iloc[0]
    increments = training_dir(params) / "increments"
    unet = sepme.compose_to_folder(params["model"], increments, [target], training_dir(params) / "unet",
                                   params["device"])
    increment = sepme_study.increment_path(run, target)
    sepme_study.write_cost_record(summary, increment, unet, denoiser(pipe))
    return {"unet": unet, "increment": increment}


def concept(params: dict) -> tuple[ConceptSpec, list[str]]:
    spec = ConceptSpec(params["concept_kind"], params["anchor"], params["target"])
    return spec, read_prompt_file(params["anchor_prompts_file"], spec)


def anchor_dir(params: dict) -> Path:
    return config.run_dir(params) / "anchor_latents"


def training_dir(params: dict) -> Path:
    return config.run_dir(params) / params.get("method", "doco")


def rgd_pairs(params: dict) -> list[tuple[str, str]]:
    """RGD's (forget, retain) training prompt twins from the slots file."""
    return prompt_pairs(load_slots(params["rgd_slots_file"]), "train", params["rgd_prompts"], params["seed"])


def preservation_dir(params: dict) -> Path:
    return config.run_dir(params) / "preservation_latents"


def _generate(params: dict, pipe, prompts: list[str], directory: Path, n_images: int | None = None) -> AnchorLatents:
    """The original model's images for `prompts`, VAE-encoded, in `directory`. They are generated once per
    output root into `latent_cache/<key>/`, the key hashing everything that determines them (model, prompts,
    count, seed, steps, guidance, sampler and `sampling_settings`), and hard-linked into the run: the runs of an ablation grid or a
    retain-mode study share one seed's anchor images instead of generating them again.

    A run that starts from an erased UNet (`base_unet`, a sequential stage) still gets the original model's
    images: drawn by the previous stage, they would carry its damage (pentagon anchors it draws as squares,
    say) into this stage's anchors and retaining loss, compounding from stage to stage."""
    import hashlib
    import json

    n_images = n_images or params["n_anchor_images"]
    steps = params["anchor_steps"] or params["num_inference_steps"]
    sampling = sampling_settings(params["device"], params["anchor_shard_size"], params["anchor_sampler"],
                                 kind=denoiser_kind(denoiser(pipe)))
    determined_by = [params["model"], "", prompts, n_images, params["seed"],  # "": no base UNet, as before
                     steps, params["guidance_scale"], params["anchor_shard_size"], sampling]
    key = hashlib.sha256(json.dumps(determined_by).encode()).hexdigest()[:20]
    shared = Path(params["output_root"]) / "latent_cache" / key
    if params.get("base_unet") and not cache_is_complete(shared):
        pipe = load_pipeline(params["model"], params["device"])  # the original model draws them
    prepare_anchor_latents(pipe, prompts, n_images, shared, model=params["model"], seed=params["seed"],
                           steps=steps, guidance=params["guidance_scale"], shard_size=params["anchor_shard_size"],
                           sampler=params["anchor_sampler"], sampling=sampling)
    manifest = Path(directory) / MANIFEST
    if not (manifest.is_file() and manifest.read_bytes() == (shared / MANIFEST).read_bytes()
            and cache_is_complete(directory)):
        _link_copy(shared, Path(directory))
    return load_anchor_latents(directory, *vae_scaling(pipe.vae))


def _link_copy(source: Path, destination: Path) -> None:
    """Make `destination` a copy of `source` of hard links (no extra disk; plain copies where links fail),
    replaced as a whole, so it is always complete. Writers' temporaries are left out: another process sharing the
    cache may still be writing its shards' preview images, whose temporaries vanish when renamed."""
    import os
    import shutil


    def link_or_copy(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    with atomic_directory(destination) as tmp:
        shutil.copytree(source, tmp, copy_function=link_or_copy, dirs_exist_ok=True, ignore=ignore_temporaries)


def prepare_anchors(params: dict, pipe) -> AnchorLatents:
    """Images of the original model for the anchor prompts (RGD: the retain prompts, plus the forget set)."""
    if params.get("method") == "rgd":
        pairs = rgd_pairs(params)
        _generate(params, pipe, [f for f, _ in pairs], config.run_dir(params) / "forget_latents")
        return _generate(params, pipe, [r for _, r in pairs], anchor_dir(params))
    spec, prompts = concept(params)
    if params["preservation_prompts_file"]:
        _generate(params, pipe, read_preservation_file(params["preservation_prompts_file"], spec),
                  preservation_dir(params), params["n_preservation_images"])
    return _generate(params, pipe, prompts, anchor_dir(params))


def load_anchors(params: dict, pipe) -> AnchorLatents:
    return load_anchor_latents(anchor_dir(params), *vae_scaling(pipe.vae))


def training_config(params: dict, latent_size: int) -> TrainingConfig:
    """The fidelity preset overridden by the params; checks D fits the latent size before any training."""
    cfg = TrainingConfig.from_params(params)
    try:
        check_discriminator_fits(cfg.disc_layers, cfg.disc_final_stride, latent_size)
    except ValueError as error:
        raise config.ParamsError(f"disc_layers: {error}") from None
    return cfg


def concept_of_several(params: dict, target: str, anchor: str, prompt_file: str) -> tuple[dict, ConceptSpec, list[str]]:
    """One of the concepts of a multi-concept run: the params with its target, anchor and anchor prompts
    (validated), its spec and its anchor prompts."""
    stage = config.validate({**params, "target": target, "anchor": anchor, "anchor_prompts_file": prompt_file},
                            source=f"concept {target!r}")
    return (stage, *concept(stage))


def check_can_rehearse(params: dict) -> None:
    """Rehearsal retains erased concepts through the retaining loss, which only some methods have."""
    if not ((params["method"] == "doco" and params["retain_mode"] != "none")
            or (params["method"] == "conabl" and params["conabl_retain"])):
        raise config.ParamsError(f"sequential_keep_erased: the earlier targets are retained through the retaining "
                                 f"loss, which method {params['method']!r} (retain_mode {params['retain_mode']!r}, "
                                 f"conabl_retain {params['conabl_retain']}) does not train; use DoCo with retain_mode "
                                 "l2, cp or rgd, or ConAbl with conabl_retain, or set sequential_keep_erased: false.")


def rehearsal_latents(params: dict, pipe, erased: list[tuple[str, str, str]]) -> AnchorLatents:
    """Concepts erased before a run, each (target, anchor, anchor prompt file): the original model's images of
    the anchor prompts (the same images their own run used), each captioned with its target prompt."""
    caches = []
    for target, anchor, prompt_file in erased:
        stage, spec, prompts = concept_of_several(params, target, anchor, prompt_file)
        cache = _generate(stage, pipe, prompts, anchor_dir(params).with_name(f"rehearsal_latents_{spec.target}"))
        captions = dict(spec.prompt_pairs(sorted(set(cache.prompts))))
        caches.append(AnchorLatents(cache.latent_mean, cache.latent_std, [captions[p] for p in cache.prompts],
                                    cache.seeds, cache.scaling_factor, cache.shift_factor))
    return AnchorLatents.concatenate(caches)


def make_trainer(params: dict, pipe, rehearse: list[tuple[str, str, str]] | None = None) -> ErasureTrainer:
    """The trainer of `params['method']` over the cached anchor latents, writing to `<run>/<method>/`; it
    resumes from the checkpoint there when one exists. `rehearse`: concepts erased before this run, (target,
    anchor, anchor prompt file) each, whose target prompts over their anchors' images join the retaining batch."""
    if params["method"] == "sepme":
        raise config.ParamsError("method: sepme has no trainer of the harness; train it with `doco train --params "
                                 "...` (`train_sepme`).")
    spec, _ = concept(params)
    cfg = training_config(params, latent_shape(denoiser(pipe))[1])
    if cfg.method == "rgd":
        pairs = rgd_pairs(params)
        forget = load_anchor_latents(config.run_dir(params) / "forget_latents", *vae_scaling(pipe.vae))
        return TRAINERS["rgd"](pipe, load_anchors(params, pipe), spec, cfg, training_dir(params), device=pipe.device,
                               target_prompts={r: f for f, r in pairs}, forget=forget)
    trainer_class = DocoTrainer if cfg.method == "doco" else TRAINERS[cfg.method]
    preservation = None
    if params["preservation_prompts_file"]:
        preservation = load_anchor_latents(preservation_dir(params), *vae_scaling(pipe.vae))
    rehearsal = None
    if rehearse:
        check_can_rehearse(params)
        rehearsal = rehearsal_latents(params, pipe, rehearse)
    return trainer_class(pipe, load_anchors(params, pipe), spec, cfg, training_dir(params), device=pipe.device,
                         preservation=preservation, rehearsal=rehearsal)


def make_multi_concept_trainer(params: dict, concepts: list[tuple[str, str, str]], pipe) -> ErasureTrainer:
    """Several concepts erased at once: each (target, anchor, anchor prompt file) gets its own anchor images
    (`<run>/anchor_latents_<target>/`), they are pooled, and every anchor prompt is paired with its own
    concept's target prompt, so each batch mixes the concepts, each in proportion to its images. DoCo, ConAbl
    or ESD. The params' preservation prompts (checked against every target) join the retaining batch as in a
    single-concept run."""
    if params["method"] == "rgd":
        raise config.ParamsError("method: rgd brings its own forget/retain prompt twins; erase several concepts with "
                                 "it through its slots file instead.")
    if params["method"] in ("uce", "spm"):  # they erase the spec's target word, one concept per run here
        raise config.ParamsError(f"method: {params['method']} erases one concept per run in this harness; erase "
                                 "several sequentially (each run's base_unet the previous run's UNet).")
    stages, pairs = [], {}
    for target, anchor, prompt_file in concepts:  # every concept checked before any image is generated
        stage, spec, prompts = concept_of_several(params, target, anchor, prompt_file)
        for anchor_prompt, target_prompt in spec.prompt_pairs(prompts):
            if pairs.setdefault(anchor_prompt, target_prompt) != target_prompt:
                raise config.ParamsError(f"anchor prompt {anchor_prompt!r} is paired with two targets "
                                         f"({pairs[anchor_prompt]!r} and {target_prompt!r}); give the concepts "
                                         "disjoint anchor prompts.")
        stages.append((stage, spec, prompts))
    cfg = training_config(params, latent_shape(denoiser(pipe))[1])
    pool = AnchorLatents.concatenate([_generate(stage, pipe, prompts, anchor_dir(params).with_name(
        f"anchor_latents_{spec.target}")) for stage, spec, prompts in stages])
    preservation = None
    if params["preservation_prompts_file"]:  # validated above against every concept's target
        preservation = _generate(params, pipe, read_prompt_file(params["preservation_prompts_file"]),
                                 preservation_dir(params), params["n_preservation_images"])
    trainer_class = DocoTrainer if cfg.method == "doco" else TRAINERS[cfg.method]
    return trainer_class(pipe, pool, stages[0][1], cfg, training_dir(params), device=pipe.device,
                         target_prompts=pairs, preservation=preservation)


def evaluation_dir(params: dict) -> Path:
    return config.run_dir(params) / "evaluation"


def base_label(model: str) -> str:
    """The base model's row in the results tables: 'toy base', 'FLUX.1 base', or 'SD base' (SD v1, 2.x, XL, 3.x)."""
    if is_toy(model):
        return "toy base"
    return "FLUX.1 base" if base_denoiser_class(model)[1].__name__ == "FluxTransformer2DModel" else "SD base"


def evaluated_models(params: dict) -> list:
    """The base model first, then each erased UNet (default: this run's DoCo result).

    Also checks, before anything is generated, that the concepts and the I2P CSV are usable."""
    missing = [c for c in params["erased_concepts"] if c not in params["eval_concepts"]]
    if missing:
        raise config.ParamsError(f"erased_concepts: {missing} are not in eval_concepts {params['eval_concepts']}; "
                                 "every erased concept must be measured.")
    if (params["n_templates"] or 80) * params["images_per_template"] < 2:
        raise config.ParamsError(f"n_templates × images_per_template: {params['n_templates']} × "
                                 f"{params['images_per_template']} images per concept; FID needs at least 2.")
    if params["target"] not in params["eval_concepts"]:
        raise config.ParamsError(f"eval_concepts: the target {params['target']!r} is missing from "
                                 f"{params['eval_concepts']}.")
    if params["i2p_csv"]:
        try:
            read_i2p_csv(params["i2p_csv"], limit=1)
        except ValueError as error:
            raise config.ParamsError(f"i2p_csv: {error}") from None

    unets = params["eval_models"] or [str(training_dir(params) / "unet")]
    for unet in unets:
        if not (Path(unet) / "config.json").is_file():
            raise config.ParamsError(f"eval_models: {unet!r} is not a trained UNet folder (no config.json); run "
                                     "notebook 03 first or list existing erased models.")
    base = EvaluatedModel(base_label(params["model"]))
    names = {"doco": "DoCo", "esd": "ESD", "conabl": "ConAbl", "uce": "UCE", "spm": "SPM"}
    labels = [f"{names[Path(u).parent.name]} ({Path(u).parent.parent.name})" if Path(u).parent.name in names
              else Path(u).name for u in unets]
    erased = [EvaluatedModel(label if labels.count(label) == 1 else str(u), u, list(params["erased_concepts"]))
              for label, u in zip(labels, unets)]
    return [base] + erased


def image_cache_dir(params: dict) -> Path:
    """Evaluation images, cached per model under the output root: the runs of a batch (one output root) share
    the base model's images instead of generating them once per concept."""
    return Path(params["output_root"]) / "image_cache"


def image_caches(params: dict, models: list) -> dict:
    """An `ImageCache` per evaluated model (label → cache), each loading its pipeline only when it must generate."""
    return model_caches(image_cache_dir(params), params["model"], models, params["device"],
                        params["sample_batch_size"] or None, params["eval_sampler"], params["compile_sampling"])


def run_evaluation(params: dict, judge=None):
    """`evaluate` the base model and `evaluated_models`; each erased model's measured table also goes into the
    model card beside its UNet folder (`record_in_model_cards`)."""
    clip = str(toy_weights_dir() / "eval_clip") if params["clip_model"] == "toy" else params["clip_model"]
    models = evaluated_models(params)
    results, timing = evaluate(params["model"], models, list(params["eval_concepts"]),
                               cache_dir=image_cache_dir(params), clip_model=clip,
                               template_set=params["eval_templates"], n_templates=params["n_templates"],
                               images_per_template=params["images_per_template"],
                               steps=params["num_inference_steps"], guidance=params["guidance_scale"],
                               seed=params["seed"], device=params["device"],
                               clip_score_definition=params["clip_score_definition"],
                               fid_features=params["fid_features"], judge=judge,
                               sample_batch_size=params["sample_batch_size"] or None,
                               sampler=params["eval_sampler"], compile_sampling=params["compile_sampling"])
    record_in_model_cards(params, results, models)
    return results, timing


def record_in_model_cards(params: dict, results, models: list) -> None:
    """For each erased model exported with a model card (`erasure.json` beside its UNet folder): its measured
    values beside the base model's, one row per concept and metric, rewritten into the card."""
    base = models[0].label
    for model in models[1:]:
        erasure_dir = Path(model.unet).parent
        if not (erasure_dir / "erasure.json").is_file():
            continue
        rows = results[results.model.isin([base, model.label])]
        table = rows.pivot_table(index=["concept", "metric"], columns="model", values="value", sort=False)
        settings = (f"{params['eval_templates']} templates ({params['n_templates'] or 'all'}), "
                    f"{params['images_per_template']} images per template, seed {params['seed']}, "
                    f"{params['num_inference_steps']} steps, guidance {params['guidance_scale']}")
        export.record_evaluation(erasure_dir, f"Measured by notebook 04 (`doco eval`): {settings}.\n\n"
                                 + table[[base, model.label]].reset_index().to_markdown(index=False, floatfmt=".2f"))
