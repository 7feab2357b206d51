"""`ring_a_bell` (text encoder only, any model): Ring-A-Bell's concept vector and genetic prompt search.

Tsai et al., "Ring-A-Bell! How Reliable are Concept Removal Methods for Diffusion Models?", ICLR 2024. The
search reads the text encoder f alone, which the erasures leave as it was, so it is the same for every model;
only the judgement of its prompt sees the erased model.

1. Concept extraction: c = mean_i [f(P_i with the concept) − f(P_i without it)] on the full (L, D) hidden
   states, over the concept's prompt pairs (`AttackSettings.concept_pairs`: each anchor prompt and its target
   prompt, e.g. p and "nudity, p" for concept_kind nudity).
2. The target embedding f(P) + η c of the start prompt P (η = `attack_ring_a_bell_eta`; the authors' code and
   prompts: 3 for nudity, 5.5 for violence).
3. Prompt discovery: a genetic algorithm over prompts of K = `attack_ring_a_bell_tokens` candidate tokens
   (`Target.vocabulary`, without the target word's) minimises the mean squared distance ‖f(P̃) − f(P) − η c‖²
   (the authors' fitness). Each generation keeps the better half of its prompts unchanged (truncation
   selection with elitism); each kept prompt, with probability 0.5 (the authors' crossover rate), is cut at a
   random point and crossed with another kept prompt into two children; each child, with probability
   `attack_ring_a_bell_mutation` (the authors': 0.25), has one token replaced by a random candidate token.
   (The authors' code also mutates the kept prompts, which can lose the best one; here the best distance never
   rises.)

On SD 3, f is the conditioning its transformer reads (common.encode): both CLIP encoders' penultimate states
joined beside the T5 rows (zeros without T5; T5's states of the prompt's text with it) and the pooled projections
as the last rows; the distance is the mean over all of them, so rows that never change (zeros) only scale it.

The authors' budget is 200 prompts, 3000 generations, K = 16 (or 77); the toy defaults (see
doco_lib/config.py) are smaller so that an attempt takes seconds on a CPU. The best prompt is judged on the
evaluation seeds; `search_scores` is the best distance after each generation, from `loss_before` (the random
first generation's best) to `loss_after` (the found prompt's).
"""

from __future__ import annotations

import torch

from doco_lib.prompt_tokens import padded_ids, word_ids
from doco_lib.studies.attacks.common import (
    AttackSettings,
    Attempt,
    Judge,
    Target,
    decode,
    encode,
    judged_embedding,
    prompt_embedding,
)

CROSSOVER_RATE = 0.5  # Ring-A-Bell's


def original_images(settings: AttackSettings) -> int:
    """Images of the original model the attack needs per attempt: none."""
    return 0


def embed(pipe, prompts: list[str]) -> torch.Tensor:
    """(N, rows, width) conditionings (`common.encode`) of text prompts."""
    return encode(pipe, torch.stack([padded_ids(pipe.tokenizer, word_ids(pipe.tokenizer, p)) for p in prompts]),
                  prompts)


def concept_vector(pipe, pairs: tuple[tuple[str, str], ...]) -> torch.Tensor:
    """(1, rows, width): the mean of f(target prompt) − f(anchor prompt) over the concept's prompt pairs."""
    anchors, targets = zip(*pairs)
    return (embed(pipe, list(targets)) - embed(pipe, list(anchors))).mean(0, keepdim=True)


def distances(pipe, prompts: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N,) mean squared distance of the conditionings of token-id prompts (N, K) to `target` (1, rows, width)."""
    states = encode(pipe, torch.stack([padded_ids(pipe.tokenizer, p) for p in prompts.tolist()]))
    return (states - target.to(states.device)).pow(2).mean((1, 2)).cpu()


def crossover(parents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Two children of each parent that crosses (probability CROSSOVER_RATE) with a random other parent: the
    first tokens of one and the rest of the other, cut at a random point."""
    count, length = parents.shape
    crossing = torch.rand(count, generator=generator) < CROSSOVER_RATE
    first = parents[crossing]
    mates = parents[torch.randint(count, (count,), generator=generator)][crossing]
    head = torch.arange(length) < torch.randint(length, (len(first), 1), generator=generator)
    return torch.cat([torch.where(head, first, mates), torch.where(head, mates, first)])


def mutate(children: torch.Tensor, vocabulary: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Each child, with probability `rate`, with one random token replaced by a random vocabulary token."""
    count, length = children.shape
    hit = torch.rand(count, generator=generator) < rate
    positions = torch.randint(length, (count,), generator=generator)
    tokens = vocabulary[torch.randint(len(vocabulary), (count,), generator=generator)]
    children = children.clone()
    children[hit, positions[hit]] = tokens[hit]
    return children


def genetic_search(pipe, target: torch.Tensor, vocabulary: torch.Tensor, settings: AttackSettings,
                   generator: torch.Generator) -> tuple[list[int], list[float]]:
    """(the token ids of the prompt closest to `target` found, the best distance after each generation)."""
    population = vocabulary[torch.randint(len(vocabulary), (settings.ring_a_bell_population,
                                                            settings.ring_a_bell_tokens), generator=generator)]
    scores = []
    for generation in range(settings.ring_a_bell_generations):
        distance = distances(pipe, population, target)
        order = distance.argsort()
        parents = population[order[:settings.ring_a_bell_population // 2]]
        scores.append(distance[order[0]].item())
        if generation < settings.ring_a_bell_generations - 1:
            children = mutate(crossover(parents, generator), vocabulary, settings.ring_a_bell_mutation, generator)
            population = torch.cat([parents, children])
    return parents[0].tolist(), scores


def ring_a_bell(pipe, judge: Judge, start_prompt: str, vocabulary: torch.Tensor, attempt: int,
                settings: AttackSettings, generator: torch.Generator) -> Attempt:
    """Search a prompt whose text embedding is f(P) + η c, then generate with it on the erased model and judge."""
    target = prompt_embedding(pipe, start_prompt) + settings.ring_a_bell_eta * concept_vector(
        pipe, settings.concept_pairs)
    ids, scores = genetic_search(pipe, target, vocabulary, settings, generator)
    final, rate, success = judged_embedding(pipe, judge, encode(pipe, padded_ids(pipe.tokenizer, ids)[None]),
                                            attempt, settings)
    return Attempt("ring_a_bell", attempt, start_prompt, decode(pipe.tokenizer, ids), rate, success, final, scores,
                   loss_before=scores[0], loss_after=scores[-1])


def run(pipe, judge: Judge, target: Target, attempt: int, settings: AttackSettings) -> Attempt:
    return ring_a_bell(pipe, judge, target.prompt, target.vocabulary, attempt, settings, settings.generator(attempt))
