"""`tokens` (black box, any model): greedy coordinate search over discrete tokens.

n = `attack_tokens` adversarial slots are appended to the start prompt P (or n of P's tokens other than the
target word, `attack_positions: substitute`). Each step takes one slot, tries `attack_candidates` vocabulary
tokens there, scores each prompt by the judge's mean probability of the target on k images (the search
seeds), and keeps the best when it beats the current prompt. The final prompt is judged on the evaluation
seeds.
"""

from __future__ import annotations

import torch

from doco_lib import config
from doco_lib.prompt_tokens import padded_ids, word_ids
from doco_lib.studies.attacks.common import (
    EVAL_SEEDS,
    SEARCH_SEEDS,
    AttackSettings,
    Attempt,
    Judge,
    Target,
    decode,
    encode,
    generate_embedded,
    judge_final,
)


def original_images(settings: AttackSettings) -> int:
    """Images of the original model the attack needs per attempt: none."""
    return 0


def adversarial_slots(tokenizer, prompt_ids: list[int], target: str, vocabulary: torch.Tensor,
                      settings: AttackSettings, generator: torch.Generator) -> tuple[list[int], list[int]]:
    """(token ids, positions of the adversarial slots among them). `append`: `tokens` random vocabulary tokens
    after the prompt; `substitute`: `tokens` of the prompt's own tokens, never those that spell the target."""
    if settings.positions == "append":
        extra = vocabulary[torch.randint(len(vocabulary), (settings.tokens,), generator=generator)].tolist()
        return list(prompt_ids) + extra, list(range(len(prompt_ids), len(prompt_ids) + settings.tokens))
    target_ids = word_ids(tokenizer, target)
    protected = set()
    for start in range(len(prompt_ids) - len(target_ids) + 1):
        if prompt_ids[start:start + len(target_ids)] == target_ids:
            protected |= set(range(start, start + len(target_ids)))
    free = [i for i in range(len(prompt_ids)) if i not in protected]
    if not free:
        raise config.ParamsError(f"attack_positions: 'substitute' needs a start prompt with tokens besides the "
                                 f"target; {decode(tokenizer, prompt_ids)!r} has none.")
    order = torch.randperm(len(free), generator=generator)[:settings.tokens]
    return list(prompt_ids), sorted(free[i] for i in order.tolist())


def token_search(pipe, judge: Judge, start_prompt: str, target: str, vocabulary: torch.Tensor, attempt: int,
                 settings: AttackSettings, generator: torch.Generator) -> Attempt:
    """Greedy coordinate search over vocabulary tokens in the adversarial slots (black box)."""
    tokenizer, k = pipe.tokenizer, settings.images
    ids, slots = adversarial_slots(tokenizer, word_ids(tokenizer, start_prompt), target, vocabulary, settings,
                                   generator)
    search_seeds = settings.seeds(attempt, SEARCH_SEEDS)

    def images_of(candidates: list[list[int]], seeds: list[int]) -> torch.Tensor:
        embeddings = encode(pipe, torch.stack([padded_ids(tokenizer, c) for c in candidates]))
        return generate_embedded(pipe, embeddings.repeat_interleave(len(seeds), 0), seeds * len(candidates),
                                 settings.num_inference_steps, settings.guidance_scale)

    images = images_of([ids], search_seeds)
    score, found = judge.target_probability(images).mean().item(), judge.is_target(images).all().item()
    scores = [score]
    for step in range(settings.search_steps):
        if found:  # every search image is already the target: nothing left to improve
            break
        slot = slots[step % len(slots)]
        pool = vocabulary[vocabulary != ids[slot]]
        picks = pool[torch.randperm(len(pool), generator=generator)[:settings.candidates]].tolist()
        candidates = [ids[:slot] + [token] + ids[slot + 1:] for token in picks]
        images = images_of(candidates, search_seeds)
        probabilities = judge.target_probability(images).view(len(candidates), k).mean(1)
        best = int(probabilities.argmax())
        if probabilities[best].item() > score:
            ids, score = candidates[best], probabilities[best].item()
            found = judge.is_target(images.view(len(candidates), k, *images.shape[1:])[best]).all().item()
        scores.append(score)
    final = images_of([ids], settings.seeds(attempt, EVAL_SEEDS))
    rate, success = judge_final(judge, final, settings)
    return Attempt("tokens", attempt, start_prompt, decode(tokenizer, ids), rate, success, final, scores)


def run(pipe, judge: Judge, target: Target, attempt: int, settings: AttackSettings) -> Attempt:
    return token_search(pipe, judge, target.prompt, target.word, target.vocabulary, attempt, settings,
                        settings.generator(attempt))
