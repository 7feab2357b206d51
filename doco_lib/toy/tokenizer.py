"""The real CLIP BPE tokenizer, built offline from the vocabulary that registry wheels ship.

OpenAI's `bpe_simple_vocab_16e6.txt.gz` is inside the `clip-anytorch` and `open-clip-torch` wheels.
Converting it to `vocab.json`/`merges.txt` gives the exact tokenizer of Stable Diffusion v1
(49,408 tokens), so toy prompts tokenize as real ones do and related-concept search runs over the
same vocabulary as in the paper.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

CLIP_VOCAB_SIZE = 49408
MODEL_MAX_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-printable-character table used by byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def find_bpe_vocabulary() -> Path:
    """Locate `bpe_simple_vocab_16e6.txt.gz` in an installed package, or explain how to get it."""
    for module, relative in (("clip", "bpe_simple_vocab_16e6.txt.gz"), ("open_clip", "bpe_simple_vocab_16e6.txt.gz")):
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.origin is not None:
            candidate = Path(spec.origin).parent / relative
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        "The CLIP BPE vocabulary bpe_simple_vocab_16e6.txt.gz was not found. Install the package that ships it "
        "(`pip install clip-anytorch` or `pip install open-clip-torch`); it is only needed to rebuild the toy world.")


def write_clip_tokenizer_files(bpe_gz: Path, out_dir: Path) -> tuple[Path, Path]:
    """Convert the gzipped BPE merges into `vocab.json` and `merges.txt` in `out_dir`."""
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    base = list(_bytes_to_unicode().values())
    vocab = base + [token + "</w>" for token in base] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise ValueError(f"{bpe_gz}: expected {CLIP_VOCAB_SIZE} tokens after conversion, got {len(vocab)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = out_dir / "vocab.json", out_dir / "merges.txt"
    vocab_path.write_text(json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False))
    merges_path.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    return vocab_path, merges_path


def build_clip_tokenizer(work_dir: Path, model_max_length: int = MODEL_MAX_LENGTH):
    """A `transformers.CLIPTokenizer` equal to Stable Diffusion v1's, built without the hub (its context,
    `model_max_length` token rows per prompt, can be shortened for a toy world)."""
    from transformers import CLIPTokenizer

    vocab_path, merges_path = write_clip_tokenizer_files(find_bpe_vocabulary(), work_dir)
    vocab = json.loads(vocab_path.read_text())
    merges = [tuple(line.split()) for line in merges_path.read_text(encoding="utf-8").strip().split("\n")[1:]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length, bos_token=BOS_TOKEN,
                         eos_token=EOS_TOKEN, pad_token=EOS_TOKEN, unk_token=EOS_TOKEN)
