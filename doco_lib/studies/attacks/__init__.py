"""The attacks on an erased model, one module each, behind one interface.

Every module of `ATTACKS` has `run(pipe, judge, target, attempt, settings) -> Attempt` (common.py: the
erased pipeline, the judge of its model family, the attempt's `Target`, its index, the `AttackSettings`)
and `original_images(settings) -> int`, how many images of the original model per attempt it reads from
`target.latents`. `doco attack --attack NAME ...` and the params key `attacks` choose among them by name:

* `tokens`: greedy search over discrete tokens appended to (or substituted in) the prompt; black box.
* `unlearndiff`: UnlearnDiffAtk, soft prefix tokens optimised so the erased model denoises the original
  model's images of the target; white box.
* `noise_probe`: the prompt sampled from initial noise scaled up; no optimisation.
* `completion`: the original model's images of the target, noised part way and completed by the erased
  model (img2img); no optimisation.
* `textual_inversion`: Circumventing Concept Erasure (CCE), one new word's input embedding learnt on the
  original model's images of the target against the erased model, "a photo of a <x>" judged; white box.
* `relearning`: a copy of the erased UNet fine-tuned on a few original images of the target (the start
  prompt, the denoising loss), the start prompt judged after each of `attack_relearn_steps`; white box,
  weights. Run on the original model too, its curve is the reference.
* `ring_a_bell`: Ring-A-Bell, a genetic search for a prompt whose text embedding is the start prompt's plus
  the concept's direction (from the concept's prompt pairs); the text encoder only.
* `gcg`: MMA-Diffusion's greedy coordinate gradient search for a prompt, the target's words forbidden, whose
  text embedding is the start prompt's; the text encoder only.

`none` (common.no_attack) is the start prompt itself, the erasure's own result; the study always runs it.

Model families (common.py's docstring says what each reads): SD v1 and 2.x (a UNet, one CLIP encoder) and SD 3.x
(`StableDiffusion3Pipeline`: an MMDiT transformer, two CLIP encoders, T5 or none, a rectified flow), e.g.
toy-mmdit. On SD 3 the white-box objectives are the flow-matching loss, completion noises along the flow and
integrates with the pipeline's Euler scheduler, relearning fine-tunes a copy of the transformer, and the
text-encoder searches compare the conditioning (ring_a_bell) or pooled embedding (gcg) the transformer reads.
Refused before any work (`common.check_pipeline`): SDXL, FLUX.1, and the soft-token attacks (unlearndiff,
textual_inversion) on an SD 3 pipeline with T5.
"""

from __future__ import annotations

from doco_lib import config
from doco_lib.studies.attacks import (
    completion,
    gcg,
    noise_probe,
    relearning,
    ring_a_bell,
    textual_inversion,
    tokens,
    unlearndiff,
)
from doco_lib.studies.attacks.common import AttackSettings, Attempt, Judge, Target, check_pipeline

ATTACKS = {"tokens": tokens, "unlearndiff": unlearndiff, "noise_probe": noise_probe, "completion": completion,
           "textual_inversion": textual_inversion, "relearning": relearning, "ring_a_bell": ring_a_bell, "gcg": gcg}


def run(name: str, pipe, judge: Judge, target: Target, attempt: int, settings: AttackSettings) -> Attempt:
    """Attack `name` of `ATTACKS` on `pipe` (the erased model) for one attempt."""
    if name not in ATTACKS:
        raise config.ParamsError(f"attacks: unknown attack {name!r}; choose from {list(ATTACKS)}.")
    check_pipeline(pipe, [name])
    return ATTACKS[name].run(pipe, judge, target, attempt, settings)


def original_images(names: list[str], settings: AttackSettings) -> int:
    """Images of the original model per attempt that the attacks `names` read (0: none)."""
    return max([ATTACKS[name].original_images(settings) for name in names], default=0)
