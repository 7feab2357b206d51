"""CLIP score and CLIP accuracy.

CLIP score (CS), by default as torchmetrics' `CLIPScore` defines it: 100 · max(cos(E_image, E_text), 0),
averaged over (image, prompt) pairs. Repos in this field differ, so the definition is an option:
`torchmetrics` (default), `logits` (100 · cos, unclamped: HF `logits_per_image`, used by MACE) and
`hessel` (2.5 · max(cos, 0), Hessel et al., used by SPM). Numbers are comparable only within one.

CLIP accuracy (CA): the fraction of images CLIP scores closer to the target prompt than to the anchor
prompt (binary; SPM's error rate is 1 − CA).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

DEFINITIONS = {"torchmetrics": (100.0, True), "logits": (100.0, False), "hessel": (2.5, True)}


@dataclass
class ClipScorer:
    """CS and CA with one CLIP model. Images are preprocessed on the model's device (transformers' torchvision
    image processor); each distinct text is embedded once per scorer, however many images and models share it."""

    model: object  # transformers.CLIPModel
    processor: object  # transformers.CLIPProcessor
    _text_cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_pretrained(cls, path: str, device: str = "cpu") -> "ClipScorer":
        from transformers import CLIPModel, CLIPProcessor

        try:
            model = CLIPModel.from_pretrained(path, use_safetensors=True).to(device).eval()
            processor = CLIPProcessor.from_pretrained(path)
        except OSError as error:
            raise FileNotFoundError(f"CLIP model {path!r} could not be loaded ({error}); pass a local folder with "
                                    "a CLIPModel, its tokenizer and processor (offline, hub ids work only when "
                                    "cached).") from None
        return cls(model, processor)

    @property
    def device(self):
        return self.model.device

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Unit-norm embeddings of images in [0, 1], shape (N, 3, H, W), through the model's processor."""
        out = []
        for chunk in images.split(batch_size):
            pixels = self.processor(images=list((chunk.clamp(0, 1) * 255).to(self.device)), return_tensors="pt",
                                    device=self.device)["pixel_values"]
            out.append(_features(self.model.get_image_features(pixel_values=pixels.to(self.device))))
        return F.normalize(torch.cat(out).float(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Unit-norm embeddings of `texts`, one row per text; texts not embedded before are embedded in batches,
        each padded to its own longest text (CLIP's causal mask makes the padding change nothing)."""
        new = [text for text in dict.fromkeys(texts) if text not in self._text_cache]
        for start in range(0, len(new), batch_size):
            chunk = new[start:start + batch_size]
            tokens = self.processor(text=chunk, return_tensors="pt", padding=True, truncation=True)
            embedded = _features(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                              attention_mask=tokens["attention_mask"].to(self.device)))
            self._text_cache.update(zip(chunk, F.normalize(embedded.float(), dim=-1)))
        return torch.stack([self._text_cache[text] for text in texts])

    def clip_score(self, images: torch.Tensor, texts: list[str], definition: str = "torchmetrics") -> float:
        """Mean CLIP score of each image with its own text."""
        return self._clip_score(self.image_embeddings(images), texts, definition)

    def clip_accuracy(self, images: torch.Tensor, target_texts: list[str], anchor_texts: list[str]) -> float:
        """Fraction of images closer (cosine) to their target text than to their anchor text."""
        return self._clip_accuracy(self.image_embeddings(images), target_texts, anchor_texts)

    def scores(self, images: torch.Tensor, texts: list[str], anchor_texts: list[str],
               definition: str = "torchmetrics") -> tuple[float, float]:
        """(CLIP score, CLIP accuracy) of the same images, embedding them once."""
        embeddings = self.image_embeddings(images)
        return self._clip_score(embeddings, texts, definition), self._clip_accuracy(embeddings, texts, anchor_texts)

    def _clip_score(self, image: torch.Tensor, texts: list[str], definition: str) -> float:
        if definition not in DEFINITIONS:
            raise ValueError(f"clip_score_definition {definition!r} is not one of {list(DEFINITIONS)}")
        if len(image) != len(texts):
            raise ValueError(f"got {len(image)} images but {len(texts)} texts; expected one text per image")
        cos = (image * self.text_embeddings(texts)).sum(-1)
        weight, clamp = DEFINITIONS[definition]
        scores = weight * (cos.clamp(min=0) if clamp else cos)
        return scores.mean().item()

    def _clip_accuracy(self, image: torch.Tensor, target_texts: list[str], anchor_texts: list[str]) -> float:
        to_target = (image * self.text_embeddings(target_texts)).sum(-1)
        to_anchor = (image * self.text_embeddings(anchor_texts)).sum(-1)
        return (to_target > to_anchor).float().mean().item()


def _features(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output
