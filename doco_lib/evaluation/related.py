"""Related concepts: vocabulary words whose text embedding is closest to the target's.

The paper picks Mickey, SpongeBob and Pikachu as Snoopy's related concepts this way. Each candidate is
embedded in the same prompt ("a photo of a {word}") by the pipeline's text encoder (the pooled, EOS-position
output), and ranked by cosine similarity to the target's embedding.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

WORD = re.compile(r"^[a-z]{3,}</w>$")


def vocabulary_words(tokenizer, limit: int | None = None) -> list[str]:
    """Whole-word tokens of the tokenizer's vocabulary (alphabetic, ≥ 3 letters), in id order."""
    vocab = tokenizer.get_vocab()
    words = [token[:-4] for token, _ in sorted(vocab.items(), key=lambda item: item[1]) if WORD.match(token)]
    return words[:limit] if limit else words


@torch.no_grad()
def pooled_embeddings(pipe, prompts: list[str], batch_size: int = 256) -> torch.Tensor:
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    out = []
    for start in range(0, len(prompts), batch_size):
        # Padded to the batch's longest prompt, not to 77 tokens: the causal text encoder's output at the end token
        # does not see the padding after it, and short prompts cost a tenth of the work.
        ids = tokenizer(prompts[start:start + batch_size], padding=True, max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(encoder.device)
        out.append(encoder(ids).pooler_output.float().cpu())
    return F.normalize(torch.cat(out), dim=-1)


def rank_related(pipe, target: str, candidates: list[str] | None = None, top_k: int = 10,
                 template: str = "a photo of a {}") -> list[tuple[str, float]]:
    """The `top_k` candidates (default: the whole vocabulary) most similar to `target`, with cosines."""
    candidates = [w for w in (candidates or vocabulary_words(pipe.tokenizer)) if w.lower() != target.lower()]
    target_embedding = pooled_embeddings(pipe, [template.format(target)])[0]
    similarity = pooled_embeddings(pipe, [template.format(w) for w in candidates]) @ target_embedding
    order = similarity.argsort(descending=True)[:top_k]
    return [(candidates[i], similarity[i].item()) for i in order.tolist()]
