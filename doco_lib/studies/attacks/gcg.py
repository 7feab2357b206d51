"""`gcg` (text encoder only, any model): MMA-Diffusion's greedy coordinate gradient search on the text encoder.

Yang et al., "MMA-Diffusion: MultiModal Attack on Diffusion Models", CVPR 2024, its text-modal attack (the
search of GCG, Zou et al. 2023, on a text-to-image model's text encoder). n = `attack_gcg_tokens` tokens x,
random vocabulary tokens at first, are optimised so that their pooled text embedding τ(x) (the encoder's final
hidden state at EOS, as MMA-Diffusion's code takes it) points where the start prompt P's does:

    min_x 1 − cos(τ(x), τ(P)).

Each of `attack_gcg_steps` steps takes the gradient of that loss with respect to the one-hot matrix of x (n ×
candidate tokens), ranks per position the `attack_gcg_topk` tokens whose swap lowers the linearised loss most,
evaluates `attack_gcg_candidates` prompts that each swap one token (positions spread evenly, tokens drawn from
their position's top k), and moves x to the best of them; the best x seen is the attack's prompt. The search
reads the text encoder alone, which the erasures leave as it was; only the judgement of its prompt sees the
erased model.

On SD 3, τ is the pooled conditioning its transformer reads: the two CLIP encoders' pooled projections joined
(common.pooled_embedding), the one-hot matrix entering both encoders' input embeddings; the found prompt is judged
with its full conditioning (and T5's states of its text, where the pipeline has T5).

Sensitive-word filter: MMA-Diffusion removes from the vocabulary every token that contains a word of its NSFW
list; here the candidate tokens lose the tokens of the target's words (their sub-word pieces too) and every
token whose text contains one of those words ("stars", "starry" for "star").

MMA-Diffusion's code searches 20 tokens for 1000 steps, top 256, 512 candidates a step; the toy defaults (see
doco_lib/config.py) are smaller so that an attempt takes seconds on a CPU. The best prompt is judged on the
evaluation seeds; `search_scores` is the best loss after each step, from `loss_before` (the random start's)
to `loss_after` (the found prompt's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from doco_lib.prompt_tokens import padded_ids, word_ids
from doco_lib.studies.attacks.common import (
    AttackSettings,
    Attempt,
    Judge,
    Target,
    clip_encoders,
    decode,
    encode,
    judged_embedding,
    pooled_embedding,
)


def original_images(settings: AttackSettings) -> int:
    """Images of the original model the attack needs per attempt: none."""
    return 0


def forbidden_tokens(tokenizer, target: str) -> set[int]:
    """The tokens of the target's words, and every token whose text contains one of them."""
    words = target.lower().split()
    pieces = {i for word in words for i in word_ids(tokenizer, word)}
    return pieces | {i for token, i in tokenizer.get_vocab().items()
                     if any(word in token.removesuffix("</w>") for word in words)}


def losses(pipe, prompts: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N,) 1 − cos(τ(prompt), target) of token-id prompts (N, n)."""
    with torch.no_grad():
        embedded = pooled_embedding(pipe, torch.stack([padded_ids(pipe.tokenizer, p) for p in prompts.tolist()]))
    return (1 - F.cosine_similarity(embedded, target.to(embedded.device))).cpu()


def token_gradient(pipe, prompt: torch.Tensor, vocabulary: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(n, V): the gradient of the loss with respect to the one-hot matrix of `prompt` over `vocabulary`."""
    encoders = clip_encoders(pipe)
    device = encoders[0].device
    tables = [encoder.get_input_embeddings().weight[vocabulary.to(encoder.device)].detach().float()
              for encoder in encoders]
    one_hot = (vocabulary[None] == prompt[:, None]).float().to(device).requires_grad_()
    ids = padded_ids(pipe.tokenizer, prompt.tolist())[None]
    embedded = pooled_embedding(pipe, ids, range(1, 1 + len(prompt)),  # after BOS
                                [one_hot.to(table.device) @ table for table in tables])
    loss = (1 - F.cosine_similarity(embedded, target.to(embedded.device))).sum()
    return torch.autograd.grad(loss, one_hot)[0].cpu()


def coordinate_search(pipe, target: torch.Tensor, vocabulary: torch.Tensor, settings: AttackSettings,
                      generator: torch.Generator) -> tuple[list[int], list[float]]:
    """(the token ids of the best prompt found, the best loss after each step)."""
    n, count = settings.gcg_tokens, settings.gcg_candidates
    topk = min(settings.gcg_topk, len(vocabulary))
    prompt = vocabulary[torch.randint(len(vocabulary), (n,), generator=generator)]
    best, scores = prompt, [losses(pipe, prompt[None], target).item()]
    positions = torch.arange(count) * n // count  # spread evenly over the prompt
    for _ in range(settings.gcg_steps):
        top = (-token_gradient(pipe, prompt, vocabulary, target)).topk(topk, dim=1).indices
        candidates = prompt.repeat(count, 1)
        candidates[torch.arange(count), positions] = vocabulary[
            top[positions, torch.randint(topk, (count,), generator=generator)]]
        loss = losses(pipe, candidates, target)
        prompt = candidates[loss.argmin()]
        if loss.min().item() < scores[-1]:
            best = prompt
        scores.append(min(scores[-1], loss.min().item()))
    return best.tolist(), scores


def gcg(pipe, judge: Judge, start_prompt: str, word: str, vocabulary: torch.Tensor, attempt: int,
        settings: AttackSettings, generator: torch.Generator) -> Attempt:
    """Search a prompt without the target's words whose pooled text embedding is the start prompt's, then
    generate with it on the erased model and judge."""
    tokenizer = pipe.tokenizer
    allowed = vocabulary[~torch.isin(vocabulary, torch.tensor(sorted(forbidden_tokens(tokenizer, word))))]
    with torch.no_grad():
        target = pooled_embedding(pipe, padded_ids(tokenizer, word_ids(tokenizer, start_prompt))[None])
    ids, scores = coordinate_search(pipe, target, allowed, settings, generator)
    final, rate, success = judged_embedding(pipe, judge, encode(pipe, padded_ids(tokenizer, ids)[None]), attempt,
                                            settings)
    return Attempt("gcg", attempt, start_prompt, decode(tokenizer, ids), rate, success, final, scores,
                   loss_before=scores[0], loss_after=scores[-1])


def run(pipe, judge: Judge, target: Target, attempt: int, settings: AttackSettings) -> Attempt:
    return gcg(pipe, judge, target.prompt, target.word, target.vocabulary, attempt, settings,
               settings.generator(attempt))
