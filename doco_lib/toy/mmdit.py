"""The toy MMDiT world ('toy-mmdit', `doco toy build --mmdit`): an SD 3-style transformer trained by flow matching.

The toy world's judge, VAE, tokenizer and text encoder are kept, so erasure on a transformer is measured next to
the UNet's on the same data, prompts and judge. The pipeline is a plain `StableDiffusion3Pipeline`:

- `SD3Transformer2DModel` (`MMDIT`): 8×8×4 latents in 1×1 patches (64 image tokens), joint attention blocks with
  SD 3.5's RMS-normed queries and keys;
- the toy CLIP text encoder as both of SD 3's CLIP encoders (`CLIPTextModelWithProjection`, identity projection)
  and no T5, as `StableDiffusion3Pipeline` allows: a prompt is 16 CLIP rows (toy captions have at most 11 tokens;
  the encoder is causal, so these rows equal the first 16 of a 77-row encoding) beside 16 zero rows where T5's
  would be, and the pooled embedding is the two encoders' joined;
- `FlowMatchEulerDiscreteScheduler` without a resolution shift (8×8 latents are far below SD 3's 128×128);
- trained on the rectified-flow path x_σ = (1 − σ) z₀ + σ ε to predict v = ε − z₀, σ logit-normal as SD 3 trains.

Files equal to the toy world's (VAE weights, vocabulary) and the second encoder and tokenizer are relative
symbolic links, so the world costs the repository its transformer and text encoder alone.
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from doco_lib.io import atomic_save_json, atomic_torch_save, load_torch_checkpoint
from doco_lib.sampling import text_call_kwargs
from doco_lib.toy.build import QUICK, BuildConfig, ResumableTraining, ToyWorldBuilder
from doco_lib.toy.models import LATENT_CHANNELS, LATENT_SIZE, TEXT_HIDDEN

MMDIT = dict(sample_size=LATENT_SIZE, patch_size=1, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
             num_layers=4, attention_head_dim=16, num_attention_heads=6, joint_attention_dim=2 * TEXT_HIDDEN,
             caption_projection_dim=96, pooled_projection_dim=2 * TEXT_HIDDEN, pos_embed_max_size=LATENT_SIZE,
             qk_norm="rms_norm")
CONTEXT_LENGTH = 16
# How the shipped 'toy-mmdit' was trained; the other settings are BuildConfig's.
MMDIT_TRAINING = dict(context_length=CONTEXT_LENGTH, unet_steps=16000, unet_lr=6e-4, unet_warmup=500)
# Weights ship in float16, as SD 3.5's do; training and sampling upcast them. Training starts from the rounded
# text encoder, so what ships is exactly what the transformer learned to read.
SHIPPED_DTYPE = torch.float16


def make_transformer():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(**MMDIT)


def make_flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def text_encoder_with_projection(text_encoder):
    """The toy `CLIPTextModel` as the `CLIPTextModelWithProjection` SD 3 reads (an identity projection: its pooled
    embedding is the final-normed end-of-text row), rounded to `SHIPPED_DTYPE` and back."""
    from transformers import CLIPTextModelWithProjection

    config = copy.deepcopy(text_encoder.config)
    config.projection_dim = config.hidden_size
    encoder = CLIPTextModelWithProjection(config)
    # transformers 5's CLIPTextModel holds the text tower's modules itself; older ones under `text_model`
    encoder.text_model.load_state_dict(getattr(text_encoder, "text_model", text_encoder).state_dict())
    with torch.no_grad():
        encoder.text_projection.weight.copy_(torch.eye(config.hidden_size))
    return encoder.to(SHIPPED_DTYPE).float().eval()


def assemble_mmdit_pipeline(transformer, vae, text_encoder, tokenizer):
    """A diffusers `StableDiffusion3Pipeline` from in-memory toy components; `text_encoder` serves as both CLIPs.
    The VAE is copied with SD 3's `shift_factor` (0: the toy latents are scaled, not shifted)."""
    from diffusers import StableDiffusion3Pipeline

    if vae.config.get("shift_factor") is None:
        vae = copy.deepcopy(vae)
        vae.register_to_config(shift_factor=0.0)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=make_flow_scheduler(), vae=vae,
                                    text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder,
                                    tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def link_duplicates(folder: Path, shared: Path) -> list[Path]:
    """Replace every file under `folder` whose bytes equal a file under `shared` or an earlier file of `folder`
    by a relative symbolic link to it; the links made."""
    seen: dict[str, Path] = {}
    for path in sorted(p for p in shared.rglob("*") if p.is_file() and not p.is_symlink()):
        seen.setdefault(hashlib.sha256(path.read_bytes()).hexdigest(), path)
    linked = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        original = seen.setdefault(digest, path)
        if original != path:
            path.unlink()
            path.symlink_to(os.path.relpath(original, path.parent))
            linked.append(path)
    return linked


class MMDiTBuilder(ToyWorldBuilder):
    """The toy MMDiT world's stages on a built toy world (`config.reuse_from`): its judge, VAE, tokenizer (at
    `CONTEXT_LENGTH`) and pipeline text encoder, then the transformer."""

    def text_encoder(self):
        from transformers import CLIPTextModel

        source = CLIPTextModel.from_pretrained(Path(self.config.reuse_from) / "pipeline" / "text_encoder")
        return text_encoder_with_projection(source).to(self.device)

    @torch.no_grad()
    def mmdit_encoded(self, data, pipe):
        """Latent posteriors of the training images, and every caption's (and "")'s conditioning as `pipe`
        computes it when it samples."""
        path = self.cache / "mmdit_encoded.pt"
        if path.exists():
            return load_torch_checkpoint(path)
        posteriors = self.latent_posteriors(data, pipe.vae)
        tokenizer = pipe.tokenizer
        captions = [*self.caption_table(tokenizer)[0], ""]
        states, pooled = [], []
        for start in range(0, len(captions), 256):
            chunk = captions[start:start + 256]
            embeds, _, pooled_embeds, _ = pipe.encode_prompt(chunk, chunk, chunk, device=self.device,
                                                             do_classifier_free_guidance=False,
                                                             **text_call_kwargs(pipe))
            states.append(embeds.cpu())
            pooled.append(pooled_embeds.cpu())
        encoded = {**posteriors, "states": torch.cat(states), "pooled": torch.cat(pooled)}
        atomic_torch_save(encoded, path)
        return encoded

    def transformer(self, data, vae, text_encoder, tokenizer, judge):
        from diffusers import SD3Transformer2DModel

        done = self.cache / "transformer"
        if (done / "config.json").exists():
            return SD3Transformer2DModel.from_pretrained(done).to(self.device).eval()
        cfg = self.config
        torch.manual_seed(cfg.seed + 5)
        transformer = make_transformer().to(self.device)
        ema = copy.deepcopy(transformer).requires_grad_(False)
        encoded = self.mmdit_encoded(data, assemble_mmdit_pipeline(ema, vae, text_encoder, tokenizer))
        labels = self.labels(data, "train")
        _, _, position = self.caption_table(tokenizer)
        scaling = vae.config.scaling_factor
        optimizer = torch.optim.AdamW(transformer.parameters(), lr=cfg.unet_lr, weight_decay=1e-2)

        def step(gen: torch.Generator) -> dict:
            transformer.train()
            caption, latents, noise = self.training_batch(gen, encoded, labels, position, scaling)
            sigma = torch.sigmoid(torch.randn(len(caption), generator=gen)).to(self.device)  # logit-normal(0, 1)
            noisy = (1 - sigma.view(-1, 1, 1, 1)) * latents + sigma.view(-1, 1, 1, 1) * noise
            prediction = transformer(hidden_states=noisy, timestep=sigma * 1000,
                                     encoder_hidden_states=encoded["states"][caption].to(self.device),
                                     pooled_projections=encoded["pooled"][caption].to(self.device)).sample
            return self.update(transformer, ema, optimizer, F.mse_loss(prediction, noise - latents), training.step)

        evaluate = self.judged_while_training(lambda: assemble_mmdit_pipeline(ema, vae, text_encoder, tokenizer),
                                              judge)
        training = ResumableTraining(self.cache / "transformer.ckpt.pt", {"transformer": transformer, "ema": ema},
                                     optimizer, cfg.seed + 5)
        training.run(cfg.unet_steps, step, cfg.checkpoint_every, evaluate, cfg.eval_every)
        self.report["transformer_curve"] = training.curve
        self.report["transformer_minutes"] = round(training.elapsed / 60, 2)
        ema.to(SHIPPED_DTYPE).save_pretrained(done)
        self._save_report()
        return SD3Transformer2DModel.from_pretrained(done).float().to(self.device).eval()

    def run(self, out_dir: Path) -> dict:
        torch.manual_seed(self.config.seed)
        data = self.data()
        judge = self.judge(data)
        tokenizer = self.tokenizer()
        vae = self.vae(data, judge)
        text_encoder = self.text_encoder()
        transformer = self.transformer(data, vae, text_encoder, tokenizer, judge)
        pipe = assemble_mmdit_pipeline(transformer, vae, text_encoder, tokenizer)
        self.record_final_quality(pipe, judge)
        pipe.transformer.to(SHIPPED_DTYPE)
        pipe.text_encoder.to(SHIPPED_DTYPE)  # both encoders: rounded already, so this loses nothing
        # Written beside `out_dir` and moved there whole: saving over the links of an earlier build would write
        # through them into the toy world's files.
        out_dir = Path(out_dir)
        staging = out_dir.with_name(out_dir.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        pipe.save_pretrained(staging, safe_serialization=True)
        toy = Path(self.config.reuse_from) / "pipeline"
        # The toy world's vocabulary file as it ships (the padding and truncation saved in it are reset by every
        # call; tokenizer_config.json holds the 16 rows), so that it links to it.
        for name in ("tokenizer", "tokenizer_2"):
            shutil.copyfile(toy / "tokenizer" / "tokenizer.json", staging / name / "tokenizer.json")
        link_duplicates(staging, toy)
        atomic_save_json(self.report, staging / "build_report.json")
        shutil.rmtree(out_dir, ignore_errors=True)
        staging.rename(out_dir)
        return self.report


def build_toy_mmdit(out_dir: Path, cache: Path, reuse_from: Path, seed: int = 0, quick: bool = False,
                    device: str = "cpu", **overrides) -> dict:
    """The toy MMDiT world's pipeline into `out_dir`, on the built toy world `reuse_from`."""
    settings = {**MMDIT_TRAINING, **({"unet_steps": QUICK.unet_steps, "unet_warmup": 1} if quick else {})}
    config = replace(QUICK if quick else BuildConfig(), seed=seed, reuse_from=str(reuse_from),
                     **{**settings, **overrides})
    if device == "cpu":
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    return MMDiTBuilder(cache, config, device).run(out_dir)
