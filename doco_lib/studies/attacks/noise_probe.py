"""`noise_probe` (no optimisation): sampling the start prompt from initial noise scaled up.

An erasure fine-tuned on the sampler's usual trajectories may not hold off them. The probe draws the start
prompt P from initial latents s · σ_init · ε (σ_init: the scheduler's `init_noise_sigma`, 1 for SD 3's flow,
whose pipeline starts from the noise itself; s = 1 is plain sampling) for each s of `attack_noise_scales`, scores
each by the judge's mean probability of the target on the search seeds, and judges the best s on the evaluation
seeds. No gradient, no prompt change: a cheap check that the erasure is not a property of the noise level the
model usually sees.
"""

from __future__ import annotations

from doco_lib.studies.attacks.common import (
    EVAL_SEEDS,
    SEARCH_SEEDS,
    AttackSettings,
    Attempt,
    Judge,
    Target,
    generate_embedded,
    judge_final,
    prompt_embedding,
)


def original_images(settings: AttackSettings) -> int:
    """Images of the original model the probe needs per attempt: none."""
    return 0


def noise_probe(pipe, judge: Judge, start_prompt: str, attempt: int, settings: AttackSettings) -> Attempt:
    """The best scale of `settings.noise_scales` on the search seeds, judged on the evaluation seeds."""
    embedding = prompt_embedding(pipe, start_prompt)

    def images_of(scale: float, seeds: list[int]):
        return generate_embedded(pipe, embedding.expand(len(seeds), -1, -1), seeds, settings.num_inference_steps,
                                 settings.guidance_scale, noise_scale=scale)

    search = settings.seeds(attempt, SEARCH_SEEDS)
    scores = [judge.target_probability(images_of(scale, search)).mean().item() for scale in settings.noise_scales]
    best = settings.noise_scales[max(range(len(scores)), key=scores.__getitem__)]
    final = images_of(best, settings.seeds(attempt, EVAL_SEEDS))
    rate, success = judge_final(judge, final, settings)
    return Attempt("noise_probe", attempt, start_prompt, f"{start_prompt} [noise ×{best:g}]", rate, success, final,
                   scores)


def run(pipe, judge: Judge, target: Target, attempt: int, settings: AttackSettings) -> Attempt:
    return noise_probe(pipe, judge, target.prompt, attempt, settings)
