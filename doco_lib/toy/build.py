"""`doco toy build`: train the toy world from a seed, resumably.

Stages, each cached in the build folder and skipped when done:
  data → judge → tokenizer → pipeline CLIP → evaluation CLIP → VAE → latents/text cache → UNet → export.
`reuse_from` (a built toy world) keeps its judge, VAE and tokenizer and rebuilds only the text side: a
pipeline CLIP of another width or context and a UNet to match (`WIDE`, the SepME toy world).
Training stages checkpoint every few hundred steps (models, optimizer, step, RNG state, elapsed
time and the learning curve), written atomically, so a stopped build continues where it stopped and
ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from doco_lib.io import atomic_save_json, atomic_torch_save, load_torch_checkpoint
from doco_lib.toy import render
from doco_lib.toy.models import TEXT_HIDDEN, ToyJudge, clip_config, make_scheduler_config, make_unet, make_vae
from doco_lib.toy.quality import pipeline_quality
from doco_lib.toy.tokenizer import MODEL_MAX_LENGTH, build_clip_tokenizer


@dataclass(frozen=True)
class BuildConfig:
    seed: int = 0
    n_train: int = 60000
    n_heldout: int = 4000
    batch_size: int = 64
    judge_steps: int = 2000
    clip_steps: int = 1000
    clip_batch_size: int = 256
    vae_steps: int = 2000
    unet_steps: int = 12000
    unet_lr: float = 1e-3
    unet_warmup: int = 500
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    checkpoint_every: int = 250
    eval_every: int = 2000
    eval_samples: int = 8
    final_eval_samples: int = 32
    sample_steps: int = 25
    guidance: float = 5.0
    text_width: int = TEXT_HIDDEN
    context_length: int = MODEL_MAX_LENGTH  # token rows per prompt, SD's 77 by default
    zero_unseen_tokens: bool = False  # token-table rows no toy caption uses start (and so stay) zero
    reuse_from: str = ""  # a built toy world whose judge, VAE and tokenizer are kept


QUICK = BuildConfig(n_train=256, n_heldout=64, batch_size=8, judge_steps=3, clip_steps=3, clip_batch_size=16,
                    vae_steps=3, unet_steps=4, unet_warmup=1, checkpoint_every=2, eval_every=2, eval_samples=1,
                    final_eval_samples=1, sample_steps=2)

# The SepME toy world: SepME's increments must leave every token row of "" and of the concepts they are
# decoupled against unchanged, which needs a text encoder wider than those rows are many. SD v1 has 768
# dimensions for 77 rows a prompt (room for 9 prompts); the shipped toy encoder 32 for 77 (none). WIDE has
# 96 for 16 (room for 6; toy captions have at most 11 tokens). Only the text side and the UNet are new.
WIDE = dict(text_width=96, context_length=16, zero_unseen_tokens=True)
# How the shipped 'toy-wide' was trained (on a GPU a step costs the same at batch 64 or 128): the same 768k
# samples as the main world's 12,000 × 64.
WIDE_TRAINING = dict(batch_size=128, unet_steps=6000, unet_warmup=250)


def _log(message: str) -> None:
    print(f"[toy build {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _batch_images(images: np.ndarray, index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (N, H, W, 3) → float (B, 3, H, W) in [-1, 1]."""
    batch = torch.from_numpy(images[index.numpy()]).to(device).permute(0, 3, 1, 2).float()
    return batch / 127.5 - 1


def _blur(images: torch.Tensor) -> torch.Tensor:
    kernel = torch.tensor([1.0, 2.0, 1.0], device=images.device)
    kernel = (kernel[:, None] * kernel[None, :]) / 16
    kernel = kernel.expand(images.shape[1], 1, 3, 3)
    return F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=images.shape[1])


class ResumableTraining:
    """A training loop whose whole state lives in one atomically written checkpoint file."""

    def __init__(self, path: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer, seed: int):
        self.path = path
        self.modules = modules
        self.optimizer = optimizer
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0
        self.elapsed = 0.0
        self.curve: list[dict] = []
        if path.exists():
            state = load_torch_checkpoint(path)
            for name, module in modules.items():
                module.load_state_dict(state["modules"][name])
            optimizer.load_state_dict(state["optimizer"])
            self.generator.set_state(state["generator"])
            self.step, self.elapsed = state["step"], state["elapsed"]
            self.curve = json.loads(state["curve"])
            _log(f"{path.name}: resuming at step {self.step}")

    def save(self) -> None:
        atomic_torch_save({"modules": {n: m.state_dict() for n, m in self.modules.items()},
                           "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                           "step": self.step, "elapsed": self.elapsed, "curve": json.dumps(self.curve)}, self.path)

    def run(self, total_steps: int, step_fn: Callable[[torch.Generator], dict], checkpoint_every: int,
            evaluate: Callable[[], dict] | None = None, eval_every: int = 0, log_every: int = 100) -> None:
        started = time.time() - self.elapsed
        while self.step < total_steps:
            metrics = step_fn(self.generator)
            self.step += 1
            self.elapsed = time.time() - started
            if self.step % log_every == 0:
                _log(f"{self.path.stem} step {self.step}/{total_steps} " +
                     " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
            if evaluate and (self.step % eval_every == 0 or self.step == total_steps):
                result = evaluate()
                self.curve.append({"step": self.step, "minutes": round(self.elapsed / 60, 2), **result})
                _log(f"{self.path.stem} eval at step {self.step}: {result}")
                self.elapsed = time.time() - started
            if self.step % checkpoint_every == 0 or self.step == total_steps:
                self.save()


class ToyWorldBuilder:
    def __init__(self, cache: Path, config: BuildConfig, device: str = "cpu"):
        self.cache = Path(cache)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.device = torch.device(device)
        self.report: dict = {}
        report_path = self.cache / "report.json"
        if report_path.exists():
            self.report = json.loads(report_path.read_text())
        self.report["config"] = asdict(config)

    def _save_report(self) -> None:
        atomic_save_json(self.report, self.cache / "report.json")

    # ---------------------------------------------------------------- data
    def data(self) -> dict[str, np.ndarray]:
        path = self.cache / "data.npz"
        if not path.exists():
            _log(f"rendering {self.config.n_train} + {self.config.n_heldout} images")
            arrays = {}
            for split, n, seed in (("train", self.config.n_train, self.config.seed),
                                   ("heldout", self.config.n_heldout, self.config.seed + 10_000)):
                images, labels = render.render_dataset(n, seed)
                arrays.update({f"{split}_images": images, f"{split}_shape": labels.shape,
                               f"{split}_colour": labels.colour, f"{split}_style": labels.style,
                               f"{split}_synonym": labels.synonym})
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, **arrays)
            tmp.replace(path)
        with np.load(path) as loaded:
            return {k: loaded[k] for k in loaded.files}

    def labels(self, data, split: str) -> render.ToyLabels:
        return render.ToyLabels(shape=data[f"{split}_shape"], colour=data[f"{split}_colour"],
                                style=data[f"{split}_style"], synonym=data[f"{split}_synonym"])

    # ---------------------------------------------------------------- judge
    def judge(self, data) -> ToyJudge:
        done = Path(self.config.reuse_from) / "judge" if self.config.reuse_from else self.cache / "judge"
        if (done / "model.safetensors").exists():
            return ToyJudge.from_pretrained(done).to(self.device)
        cfg = self.config
        judge = ToyJudge().to(self.device)
        optimizer = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
        targets = {name: torch.from_numpy(data[f"train_{name}"]).long() for name in ("shape", "colour", "style")}
        n = len(data["train_images"])

        def step(gen: torch.Generator) -> dict:
            judge.train()
            index = torch.randint(0, n, (cfg.batch_size,), generator=gen)
            images = _batch_images(data["train_images"], index, self.device)
            # Robust to what generators produce: slight blur and noise, as VAE decodes and samples show.
            blur = (torch.rand(len(images), 1, 1, 1, generator=gen) < 0.5).to(self.device)
            images = torch.where(blur, _blur(images), images)
            images = images + torch.randn(images.shape, generator=gen).to(self.device) * 0.05
            logits = judge(images)
            loss = sum(F.cross_entropy(logits[k], targets[k][index].to(self.device)) for k in logits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return {"loss": loss.item()}

        training = ResumableTraining(self.cache / "judge.ckpt.pt", {"judge": judge}, optimizer, cfg.seed + 1)
        training.run(cfg.judge_steps, step, cfg.checkpoint_every)
        accuracy = self.judge_accuracy(judge, _batch_images(data["heldout_images"],
                                                            torch.arange(len(data["heldout_images"])), self.device),
                                        self.labels(data, "heldout"))
        self.report["judge_heldout_accuracy"] = accuracy
        self.report["judge_minutes"] = round(training.elapsed / 60, 2)
        _log(f"judge held-out accuracy {accuracy}")
        judge.save_pretrained(done)
        self._save_report()
        return judge.eval()

    @staticmethod
    def judge_accuracy(judge: ToyJudge, images: torch.Tensor, labels: render.ToyLabels) -> dict[str, float]:
        predicted = judge.predict(images)
        return {name: (predicted[name].cpu().numpy() == getattr(labels, name)).mean().item()
                for name in ("shape", "colour", "style")}

    # ---------------------------------------------------------------- tokenizer and CLIPs
    def tokenizer(self):
        from transformers import CLIPTokenizer

        length = self.config.context_length
        if self.config.reuse_from:
            return CLIPTokenizer.from_pretrained(Path(self.config.reuse_from) / "pipeline" / "tokenizer",
                                                 model_max_length=length)
        done = self.cache / "tokenizer"
        if not (done / "tokenizer_config.json").exists():
            build_clip_tokenizer(self.cache / "bpe", length).save_pretrained(done)
        return CLIPTokenizer.from_pretrained(done)

    def caption_table(self, tokenizer):
        """All captions, their token ids, and a lookup from (template, shape, colour, style, synonym)."""
        captions = render.all_captions()
        position = {c: i for i, c in enumerate(captions)}
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        return captions, ids, position

    def caption_indices(self, labels: render.ToyLabels, index: torch.Tensor, templates: torch.Tensor, position):
        return torch.tensor([position[render.caption(int(labels.shape[i]), int(labels.colour[i]), int(labels.style[i]),
                                                     bool(labels.synonym[i]), int(t))]
                             for i, t in zip(index.tolist(), templates.tolist())])

    @staticmethod
    def caption_matches(labels: render.ToyLabels, index: torch.Tensor, templates: torch.Tensor) -> torch.Tensor:
        """match[i, j] = caption j describes image i (every attribute it mentions agrees)."""
        attrs = {name: torch.from_numpy(getattr(labels, name))[index] for name in ("shape", "colour", "style")}
        match = torch.ones(len(index), len(index), dtype=torch.bool)
        for j, template in enumerate(templates.tolist()):
            for name in render.CAPTION_TEMPLATES[template][1]:
                match[:, j] &= attrs[name] == attrs[name][j]
        return match.float()

    def clip(self, data, tokenizer, name: str, seed: int, parity: int):
        """Train a CLIPModel contrastively on half of the training images (even or odd indices)."""
        from transformers import CLIPModel

        done = self.cache / name
        if (done / "config.json").exists():
            return CLIPModel.from_pretrained(done).to(self.device).eval()
        cfg = self.config
        torch.manual_seed(seed)
        model = CLIPModel(clip_config(cfg.text_width, cfg.context_length)).to(self.device)
        labels = self.labels(data, "train")
        pool = torch.arange(parity, len(data["train_images"]), 2)
        captions, ids, position = self.caption_table(tokenizer)
        if cfg.zero_unseen_tokens:  # rows no caption uses get no gradient, so zeros stay zeros (and compress)
            table = model.text_model.embeddings.token_embedding.weight
            with torch.no_grad():
                unseen = torch.ones(len(table), dtype=torch.bool)
                unseen[ids.unique()] = False
                table[unseen.to(table.device)] = 0
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)

        def step(gen: torch.Generator) -> dict:
            model.train()
            index = pool[torch.randint(0, len(pool), (cfg.clip_batch_size,), generator=gen)]
            templates = torch.randint(0, len(render.CAPTION_TEMPLATES), (len(index),), generator=gen)
            text_ids = ids[self.caption_indices(labels, index, templates, position)].to(self.device)
            images = _batch_images(data["train_images"], index, self.device)
            image_emb = F.normalize(_features(model.get_image_features(pixel_values=images)), dim=-1)
            text_emb = F.normalize(_features(model.get_text_features(input_ids=text_ids)), dim=-1)
            logits = model.logit_scale.exp().clamp(max=100) * image_emb @ text_emb.T
            match = self.caption_matches(labels, index, templates).to(self.device)
            loss = 0.5 * (_soft_cross_entropy(logits, match) + _soft_cross_entropy(logits.T, match.T))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return {"loss": loss.item()}

        training = ResumableTraining(self.cache / f"{name}.ckpt.pt", {"clip": model}, optimizer, seed)
        training.run(cfg.clip_steps, step, cfg.checkpoint_every)
        model.eval()
        self.report[f"{name}_retrieval_accuracy"] = self.clip_shape_accuracy(model, tokenizer, data)
        self.report[f"{name}_minutes"] = round(training.elapsed / 60, 2)
        _log(f"{name}: held-out zero-shot shape accuracy {self.report[f'{name}_retrieval_accuracy']:.3f}")
        model.save_pretrained(done)
        self._save_report()
        return model

    @torch.no_grad()
    def clip_shape_accuracy(self, model, tokenizer, data) -> float:
        prompts = [f"a photo of a {s}" for s in render.SHAPES]
        text_ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                             return_tensors="pt").input_ids.to(self.device)
        text = F.normalize(_features(model.get_text_features(input_ids=text_ids)), dim=-1)
        images = _batch_images(data["heldout_images"], torch.arange(len(data["heldout_images"])), self.device)
        image = F.normalize(_features(model.get_image_features(pixel_values=images)), dim=-1)
        predicted = (image @ text.T).argmax(1).cpu().numpy()
        return float((predicted == data["heldout_shape"]).mean())

    # ---------------------------------------------------------------- VAE
    def vae(self, data, judge: ToyJudge):
        from diffusers import AutoencoderKL

        done = Path(self.config.reuse_from) / "pipeline" / "vae" if self.config.reuse_from else self.cache / "vae"
        if (done / "config.json").exists():
            return AutoencoderKL.from_pretrained(done).to(self.device).eval()
        cfg = self.config
        torch.manual_seed(cfg.seed + 3)
        vae = make_vae().to(self.device)
        optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
        judge.requires_grad_(False)
        judge_layers = list(judge.features.children())[:3]
        n = len(data["train_images"])

        def judge_features(images):
            out, h = [], images
            for layer in judge_layers:
                h = layer(h)
                out.append(h)
            return out

        def step(gen: torch.Generator) -> dict:
            vae.train()
            index = torch.randint(0, n, (cfg.batch_size,), generator=gen)
            images = _batch_images(data["train_images"], index, self.device)
            posterior = vae.encode(images).latent_dist
            noise = torch.randn(posterior.mean.shape, generator=gen).to(self.device)
            reconstruction = vae.decode(posterior.mean + posterior.std * noise).sample
            # L1 for colours, judge features as the perceptual term (SD's VAE uses LPIPS for the same reason).
            rec_loss = (reconstruction - images).abs().mean()
            perceptual = sum(F.mse_loss(a, b) for a, b in zip(judge_features(reconstruction), judge_features(images)))
            loss = rec_loss + perceptual + 1e-6 * posterior.kl().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return {"l1": rec_loss.item(), "perceptual": perceptual.item()}

        judge.eval()
        training = ResumableTraining(self.cache / "vae.ckpt.pt", {"vae": vae}, optimizer, cfg.seed + 3)
        training.run(cfg.vae_steps, step, cfg.checkpoint_every)
        vae.eval()
        with torch.no_grad():
            sample = _batch_images(data["train_images"], torch.arange(min(n, 4096)), self.device)
            latents = torch.cat([vae.encode(c).latent_dist.sample() for c in sample.split(512)])
            vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
            heldout = _batch_images(data["heldout_images"], torch.arange(len(data["heldout_images"])), self.device)
            reconstructed = torch.cat([vae.decode(vae.encode(c).latent_dist.mode()).sample for c in heldout.split(512)])
        self.report["vae_scaling_factor"] = vae.config.scaling_factor
        self.report["vae_reconstruction_judge_accuracy"] = self.judge_accuracy(judge, reconstructed.clamp(-1, 1),
                                                                               self.labels(data, "heldout"))
        self.report["vae_minutes"] = round(training.elapsed / 60, 2)
        _log(f"VAE: judge accuracy on reconstructions {self.report['vae_reconstruction_judge_accuracy']}")
        vae.save_pretrained(done)
        self._save_report()
        return vae

    # ---------------------------------------------------------------- UNet
    @torch.no_grad()
    def latent_posteriors(self, data, vae) -> dict[str, torch.Tensor]:
        """The VAE's posterior (mean, std) of every training image, from which `training_batch` draws latents."""
        images = _batch_images(data["train_images"], torch.arange(len(data["train_images"])), self.device)
        posteriors = [vae.encode(c).latent_dist for c in images.split(512)]
        return {"latent_mean": torch.cat([p.mean for p in posteriors]).cpu(),
                "latent_std": torch.cat([p.std for p in posteriors]).cpu()}

    def judged_while_training(self, ema_pipeline: Callable[[], object], judge) -> Callable[[], dict]:
        """What `ResumableTraining` runs every `eval_every` steps: the pipeline of the EMA weights, judged."""
        cfg = self.config

        def evaluate() -> dict:
            quality = pipeline_quality(ema_pipeline(), judge, cfg.eval_samples, cfg.sample_steps, cfg.guidance,
                                       seed=10_000)
            return {attribute: round(q["mean"], 4) for attribute, q in quality.items()}
        return evaluate

    @torch.no_grad()
    def encoded(self, data, vae, text_encoder, tokenizer):
        path = self.cache / "encoded.pt"
        if path.exists():
            return load_torch_checkpoint(path)
        posteriors = self.latent_posteriors(data, vae)
        captions, ids, _ = self.caption_table(tokenizer)
        empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                          return_tensors="pt").input_ids
        all_ids = torch.cat([ids, empty]).to(self.device)
        text = torch.cat([text_encoder(c).last_hidden_state for c in all_ids.split(256)])
        encoded = {**posteriors, "text": text.cpu()}
        atomic_torch_save(encoded, path)
        return encoded

    def training_batch(self, gen: torch.Generator, encoded: dict, labels: render.ToyLabels, position: dict,
                       scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A denoiser's training batch: caption indices (`caption_dropout` of them the empty prompt's, the last
        index), scaled latents drawn from the images' posteriors, and noise like them."""
        cfg = self.config
        index = torch.randint(0, len(encoded["latent_mean"]), (cfg.batch_size,), generator=gen)
        templates = torch.randint(0, len(render.CAPTION_TEMPLATES), (len(index),), generator=gen)
        caption = self.caption_indices(labels, index, templates, position)
        drop = torch.rand(len(index), generator=gen) < cfg.caption_dropout
        caption = torch.where(drop, torch.full_like(caption, len(position)), caption)
        mean, std = encoded["latent_mean"][index], encoded["latent_std"][index]
        latents = (mean + std * torch.randn(mean.shape, generator=gen)).to(self.device) * scaling
        return caption, latents, torch.randn(latents.shape, generator=gen).to(self.device)

    def update(self, model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
               step: int) -> dict:
        """One step of a denoiser's training: the warmed-up learning rate, the clipped gradient, AdamW, the EMA."""
        cfg = self.config
        for group in optimizer.param_groups:
            group["lr"] = cfg.unet_lr * min(1.0, (step + 1) / cfg.unet_warmup)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
        return {"loss": loss.item()}

    def unet(self, data, vae, text_encoder, tokenizer, judge):
        from diffusers import DDPMScheduler, UNet2DConditionModel

        done = self.cache / "unet"
        if (done / "config.json").exists():
            return UNet2DConditionModel.from_pretrained(done).to(self.device).eval()
        cfg = self.config
        encoded = self.encoded(data, vae, text_encoder, tokenizer)
        labels = self.labels(data, "train")
        _, _, position = self.caption_table(tokenizer)
        scaling = vae.config.scaling_factor
        noise_scheduler = DDPMScheduler(**make_scheduler_config())
        torch.manual_seed(cfg.seed + 4)
        unet = make_unet(cfg.text_width).to(self.device)
        ema = copy.deepcopy(unet).requires_grad_(False)
        optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=1e-2)
        alphas_cumprod = noise_scheduler.alphas_cumprod.to(self.device)

        def step(gen: torch.Generator) -> dict:
            unet.train()
            caption, latents, noise = self.training_batch(gen, encoded, labels, position, scaling)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(caption),),
                                      generator=gen).to(self.device)
            a = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
            noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
            prediction = unet(noisy, timesteps, encoder_hidden_states=encoded["text"][caption].to(self.device)).sample
            return self.update(unet, ema, optimizer, F.mse_loss(prediction, noise), training.step)

        evaluate = self.judged_while_training(lambda: assemble_pipeline(ema, vae, text_encoder, tokenizer), judge)
        training = ResumableTraining(self.cache / "unet.ckpt.pt", {"unet": unet, "ema": ema}, optimizer, cfg.seed + 4)
        training.run(cfg.unet_steps, step, cfg.checkpoint_every, evaluate, cfg.eval_every)
        self.report["unet_curve"] = training.curve
        self.report["unet_minutes"] = round(training.elapsed / 60, 2)
        ema.save_pretrained(done)
        self._save_report()
        return UNet2DConditionModel.from_pretrained(done).to(self.device).eval()

    # ---------------------------------------------------------------- all
    def record_final_quality(self, pipe, judge) -> None:
        """The built pipeline's judged prompt accuracy (`final_eval_samples` a prompt) and sampling settings, in the
        report."""
        cfg = self.config
        quality = pipeline_quality(pipe, judge, cfg.final_eval_samples, cfg.sample_steps, cfg.guidance, seed=0)
        self.report["final_quality"] = quality
        self.report["sampling_defaults"] = {"steps": cfg.sample_steps, "guidance": cfg.guidance}
        _log("final quality: " + json.dumps({k: round(v["mean"], 3) for k, v in quality.items()}))
        self._save_report()

    def run(self, out_dir: Path) -> dict:
        from transformers import CLIPImageProcessor

        torch.manual_seed(self.config.seed)
        data = self.data()
        judge = self.judge(data)
        tokenizer = self.tokenizer()
        pipeline_clip = self.clip(data, tokenizer, "pipeline_clip", self.config.seed + 2, parity=0)
        eval_clip = None if self.config.reuse_from else self.clip(data, tokenizer, "eval_clip", self.config.seed + 102,
                                                                    parity=1)
        vae = self.vae(data, judge)
        text_encoder_model = _text_encoder_from_clip(pipeline_clip).to(self.device).eval()
        unet = self.unet(data, vae, text_encoder_model, tokenizer, judge)

        pipe = assemble_pipeline(unet, vae, text_encoder_model, tokenizer)
        self.record_final_quality(pipe, judge)

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.config.reuse_from:  # only the new pipeline; judge and evaluation CLIP stay the reused world's
            pipe.save_pretrained(out_dir, safe_serialization=True)
            atomic_save_json(self.report, out_dir / "build_report.json")
            return self.report
        pipe.save_pretrained(out_dir / "pipeline", safe_serialization=True)
        judge.save_pretrained(out_dir / "judge")
        eval_clip.save_pretrained(out_dir / "eval_clip")
        tokenizer.save_pretrained(out_dir / "eval_clip")  # a complete CLIP folder, loadable by CLIPProcessor
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                           image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(out_dir / "eval_clip")
        atomic_save_json(self.report, out_dir / "build_report.json")
        return self.report


def _features(output) -> torch.Tensor:
    """`get_*_features` returns a tensor in older transformers and a model output with `pooler_output` in newer."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _soft_cross_entropy(logits: torch.Tensor, match: torch.Tensor) -> torch.Tensor:
    """Contrastive loss where every matching caption counts as a positive, spread evenly."""
    targets = match / match.sum(1, keepdim=True)
    return -(targets * logits.log_softmax(1)).sum(1).mean()


def _text_encoder_from_clip(clip_model):
    """The text tower of a CLIPModel as a standalone `CLIPTextModel`, as SD pipelines expect."""
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel(clip_model.config.text_config)
    getattr(text_encoder, "text_model", text_encoder).load_state_dict(clip_model.text_model.state_dict())
    return text_encoder


def assemble_pipeline(unet, vae, text_encoder, tokenizer):
    """A diffusers `StableDiffusionPipeline` from in-memory toy components (no safety checker)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**make_scheduler_config(sampler=True)), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_toy_world(out_dir: Path, cache: Path, seed: int = 0, quick: bool = False, device: str = "cpu",
                    wide_from: Path | None = None, **overrides) -> dict:
    """The toy world into `out_dir` (pipeline/, judge/, eval_clip/); with `wide_from` (a built toy world),
    the SepME toy world's pipeline alone, with that world's judge, VAE and tokenizer."""
    if wide_from is not None:
        overrides = {**WIDE, **({} if quick else WIDE_TRAINING), "reuse_from": str(wide_from), **overrides}
    config = replace(QUICK if quick else BuildConfig(), seed=seed, **overrides)
    if device == "cpu":
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    return ToyWorldBuilder(cache, config, device).run(out_dir)


if __name__ == "__main__":  # pragma: no cover - convenience for `python -m doco_lib.toy.build`
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--wide-from", type=Path)
    args = parser.parse_args()
    build_toy_world(args.out, args.cache, args.seed, args.quick, args.device, args.wide_from)
