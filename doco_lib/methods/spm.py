"""SPM: one-dimensional adapters that erase a concept, applied at the strength the prompt calls for.

Lyu, Yang, Hong, Chen, Qian, Lin, "One-dimensional Adapter to Rule Them All: Concepts, Diffusion Models and
Erasing Applications", CVPR 2024. Reference code: github.com/Con6924/SPM @3dd762e; what it does is in
shared/methods/spm_uce.md (file:line there). We follow the code; where it departs from what it evidently
means, the code's behaviour is the default and the other a switch.

Adapters. Every `Linear` and `Conv2d` inside each `Transformer2DModel` of the UNet (SD v1.4: proj_in, the
q/k/v/out projections of attn1 and attn2, ff.net.0.proj, ff.net.2, proj_out; 16 blocks × 12 = 192 modules,
423,936 parameters at rank 1) gets a low-rank branch,

    y = W x + m · (α / r) · U (D x),        D: r × in (a conv keeps W's kernel), U: out × r (1×1 for convs),

with r = `spm_rank` = 1 ("one-dimensional"), α = `spm_alpha` = 1, U = 0 at the start (D Kaiming-uniform), so
the adapted UNet starts as the original. The UNet stays frozen; only U and D train. The adapters are forward
hooks: attaching or removing them never touches the UNet's weights. SPM's code has no MMDiT (SD 3.x, FLUX.1); on
one the adapters go on every block's attention and feed-forward Linears (`adapted_modules`), x_t comes from the
flow's Euler steps and the anchors draw the context and the pooled embedding apart, as for SDXL.

Training, one iteration, c the erased concept's embedding (its bare word, e.g. "star", as in the code; with
`spm_prompts: target_prompts`, for each latent one of the harness's target prompts, "a red star on …"), ∅ that of "":
  1. x_t: fresh noise denoised for k ∈ [1, K) of K = `spm_denoising_steps` DDIM steps, with the adapters on,
     classifier-free guidance `spm_start_guidance` (the code: 3) towards c; t = the k·N/K-th of N DDIM
     timesteps at full resolution (N = 1000 training steps), as the code indexes it.
  2. Erasing loss (ESD's negative guidance, original model ε = adapters off):
        L_e = ‖ε_SPM(x_t, c) − [ε(x_t, ∅) − g (ε(x_t, c) − ε(x_t, ∅))]‖²,   g = `spm_guidance` (the code: 1).
  3. Latent anchoring: n = `spm_anchors` random embeddings a_i, Gaussian over all 77 × d entries, unit
     norm, each kept with probability 1 − cos(a_i, c) and scaled by U(0.8, 1.2)·‖c‖ (c: the bare word's, always);
        L_a = ‖ε_SPM(x_t, a) − ε(x_t, a)‖²,   L = L_e + λ_a L_a,   λ_a = `spm_anchor_strength` (1000).
     The code interleaves [∅, a_1, ∅, a_2, …] and its noise prediction keeps the second half only, so for
     n = 4 the anchors that reach the loss are ∅, a_3, ∅, a_4 (`spm_anchor_batch: official`, the default);
     `intended` anchors a_1 … a_n. SDXL (the code's train_spm_xl.py): the hidden states and the pooled
     embedding of each a_i are drawn so apart, each against c's own; the time ids are c's.
  4. Adam on U and D (the code: AdamW8bit, batch 1, lr 1e-4, 3000 iterations) with the code's learning-rate
     schedule, cosine with hard restarts after a linear warm-up (`spm_lr_warmup`, `spm_lr_cycles`; 0 cycles:
     constant after the warm-up, our addition). The code's random 256–448 px training resolutions are not
     reproduced: x_t has the UNet's own latent size.

Facilitated transport (inference). For a prompt p and the erased prompts e,
    s(p) = max_e max( cos(E(p), E(e)), |T(p) ∩ T(e)| / |T(e)| ),
E the hidden states the UNet cross-attends to, flattened (77·d; SDXL: both encoders'), T the set of token ids
without BOS/EOS/padding; no threshold. The code multiplies *both* factors U and D by s, so the branch scales by s² (`scaling="squared"`,
the default); "linear" scales it by s.

Storage. The adapter is its own safetensors file (`spm.safetensors`, kilobytes to 1.7 MB on SD) in the code's
format: `lora_unet_<module path with _>.lora_down.weight` (an MMDiT's: `lora_transformer_…`), `.lora_up.weight`,
`.alpha`, with metadata prompts, rank, alpha (plus ours: base model, target, settings). `SpmTrainer.export` also writes the UNet with
the adapter merged at full strength (W + (α/r) U D): what notebooks 04/05 evaluate is SPM *without*
facilitated transport; `generate_with_transport` samples with it.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from doco_lib import costs, export
from doco_lib.errors import CorruptFileError
from doco_lib.io import atomic_directory, atomic_save_json, atomic_write_bytes
from doco_lib.methods.harness import ErasureTrainer
from doco_lib.methods.prediction import denoising_scheduler
from doco_lib.models import (
    append_rows,
    denoiser_kind,
    denoiser_output,
    encode_prompts,
    latent_shape,
    pack_conditioning,
    text_encoders,
    transformer_inputs,
    unet_inputs,
)
from doco_lib.sampling import generate

ADAPTER_FILE = "spm.safetensors"
PREFIXES = {"unet": "lora_unet", "mmdit": "lora_transformer"}  # kohya's names for a UNet's and an MMDiT's modules
TRANSPORT_SCALINGS = ("squared", "linear")


def adapted_modules(denoiser) -> dict[str, torch.nn.Module]:
    """Every Linear and Conv2d inside a Transformer2DModel, by module path (SD v1.4: 192). The code matches the
    class names exactly; subclasses count here (a diffusers version with LoRACompatibleLinear matched none).
    An MMDiT (SD 3.x, FLUX.1; SPM's code has none): the attention and feed-forward Linears of every block, both
    streams (`transformer_blocks`, FLUX.1's `single_transformer_blocks`), the analogue of a UNet's transformer
    blocks; the blocks' AdaLN modulations, which read the timestep and not the text, are left as they are."""
    found = {}
    if denoiser_kind(denoiser) == "mmdit":
        for name, module in denoiser.named_modules():
            if (name.startswith(("transformer_blocks.", "single_transformer_blocks.")) and ".norm" not in name
                    and isinstance(module, torch.nn.Linear)):
                found[name] = module
        return found
    for name, block in denoiser.named_modules():
        if type(block).__name__ == "Transformer2DModel":
            for child, module in block.named_modules():
                if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                    found[f"{name}.{child}"] = module
    return found


def adapter_key(module_path: str, prefix: str = PREFIXES["unet"]) -> str:
    """The code's (and kohya's) name of a module's adapter: 'lora_unet_' (an MMDiT's: 'lora_transformer_') + the
    path with '_' for '.'."""
    return f"{prefix}_{module_path.replace('.', '_')}"


class SpmLayer(torch.nn.Module):
    """The low-rank branch of one module: (α / r) · U (D x)."""

    def __init__(self, module: torch.nn.Module, rank: int, alpha: float):
        super().__init__()
        if isinstance(module, torch.nn.Conv2d):
            rank = min(rank, module.in_channels, module.out_channels)
            self.lora_down = torch.nn.Conv2d(module.in_channels, rank, module.kernel_size, module.stride,
                                             module.padding, bias=False)
            self.lora_up = torch.nn.Conv2d(rank, module.out_channels, 1, bias=False)
        else:
            self.lora_down = torch.nn.Linear(module.in_features, rank, bias=False)
            self.lora_up = torch.nn.Linear(rank, module.out_features, bias=False)
        self.scale = alpha / rank
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        torch.nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.lora_up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_up(self.lora_down(x)) * self.scale

    def weight_delta(self) -> torch.Tensor:
        """(α / r) · U D as a weight of the adapted module's shape."""
        up, down = self.lora_up.weight, self.lora_down.weight
        if down.dim() == 2:
            return up @ down * self.scale
        return torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down) * self.scale


class SpmNetwork(torch.nn.Module):
    """The adapters of one UNet; `multiplier` m scales every branch. `attach` hooks them into the UNet's forward
    pass, `detach` removes them; the UNet's weights are never changed (`merged` changes them, and restores them)."""

    def __init__(self, unet, rank: int = 1, alpha: float = 1.0):
        super().__init__()
        self.rank, self.alpha, self.multiplier = rank, alpha, 1.0
        self.targets = {}  # adapter key → adapted module (not registered: the UNet owns it)
        for path, module in adapted_modules(unet).items():
            key = adapter_key(path, PREFIXES[denoiser_kind(unet)])
            self.targets[key] = module
            self.add_module(key, SpmLayer(module, rank, alpha).to(module.weight.device, module.weight.dtype))
        self._hooks = []

    def layers(self) -> dict[str, SpmLayer]:
        return dict(self.named_children())

    def attach(self) -> "SpmNetwork":
        if not self._hooks:
            for key, layer in self.layers().items():
                self._hooks.append(self.targets[key].register_forward_hook(self._hook(layer)))
        return self

    def detach(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _hook(self, layer: SpmLayer):
        def add_branch(module, inputs, output):
            if self.multiplier == 0:
                return None  # the module's own output, untouched
            return output + layer(inputs[0]) * self.multiplier
        return add_branch

    @contextlib.contextmanager
    def strength(self, multiplier: float):
        """Run the block with the branches scaled by `multiplier` (0: the original UNet)."""
        saved, self.multiplier = self.multiplier, multiplier
        try:
            yield
        finally:
            self.multiplier = saved

    @contextlib.contextmanager
    def merged(self, multiplier: float = 1.0):
        """The branches added into the UNet's weights (W + m (α/r) U D) for the block, hooks silenced; the original
        weights come back bit for bit (copies, not a subtraction)."""
        saved = {key: module.weight.detach().clone() for key, module in self.targets.items()}
        try:
            with torch.no_grad():
                for key, layer in self.layers().items():
                    weight = self.targets[key].weight
                    weight.add_((layer.weight_delta() * multiplier).to(weight.dtype))
            with self.strength(0.0):
                yield
        finally:
            with torch.no_grad():
                for key, module in self.targets.items():
                    module.weight.copy_(saved[key])

    def save(self, path: Path, metadata: dict[str, str]) -> None:
        """The adapter alone, in the code's format, atomically; metadata adds rank and alpha as the code does."""
        from safetensors.torch import save

        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write_bytes(save(tensors, metadata={**metadata, "rank": str(self.rank), "alpha": str(self.alpha)}),
                           Path(path))

    @classmethod
    def from_file(cls, path: str | Path, unet) -> "SpmNetwork":
        """An adapter file (ours or the code's) for `unet`, not yet attached; each key must match a layer."""
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        downs = [v for k, v in tensors.items() if k.endswith(".lora_down.weight")]
        alphas = [v for k, v in tensors.items() if k.endswith(".alpha")]
        if not downs:
            raise CorruptFileError(f"{path}: no '*.lora_down.weight' tensors; not an SPM adapter file.")
        network = cls(unet, rank=max(d.shape[0] for d in downs), alpha=float(alphas[0]) if alphas else 1.0)
        mine = network.state_dict()
        foreign = sorted(k for k, v in tensors.items() if k not in mine or v.shape != mine[k].shape)
        if foreign:
            raise CorruptFileError(f"{path}: {len(foreign)} adapter tensors fit no layer of this UNet (first: "
                                   f"{foreign[0]!r}); was it trained for another base model?")
        network.load_state_dict({**mine, **tensors})
        return network


def read_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


# ---------------------------------------------------------------------------------------------- transport
@torch.no_grad()
def transport_strength(pipe, prompt: str, erased: list[str]) -> float:
    """s(p) of the module docstring: the prompt's largest similarity to an erased prompt, by flattened text
    embedding (cosine) or by shared tokens (the share of the erased prompt's tokens the prompt contains)."""
    tokenizer = pipe.tokenizer
    ids = tokenizer([prompt, *erased], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    # The hidden states the UNet cross-attends to (SDXL: both encoders'; its pooled embedding and time ids left out),
    # or an MMDiT's context (its pooled embedding left out).
    conditioning = encode_prompts(pipe, [prompt, *erased])
    transformer = getattr(pipe, "transformer", None)
    hidden = (unet_inputs(pipe.unet, conditioning)["encoder_hidden_states"] if transformer is None
              else transformer_inputs(transformer, conditioning)[0]).flatten(1)
    cosine = F.cosine_similarity(hidden[:1], hidden[1:], dim=-1).cpu()
    special = set(tokenizer.convert_tokens_to_ids(list(tokenizer.special_tokens_map.values())))
    words = set(ids[0].tolist()) - special
    shared = [len(words & (set(row.tolist()) - special)) / max(1, len(set(row.tolist()) - special)) for row in ids[1:]]
    return max(max(c, s) for c, s in zip(cosine.tolist(), shared))


def transport_multiplier(strength: float, scaling: str = "squared") -> float:
    """The branch's multiplier for similarity s: s² as the code applies it (both factors × s), or s."""
    if scaling not in TRANSPORT_SCALINGS:
        raise ValueError(f"scaling {scaling!r} is not one of {TRANSPORT_SCALINGS}")
    return strength ** 2 if scaling == "squared" else strength


def generate_with_transport(pipe, network: SpmNetwork, prompts: list[str], seeds: list[int], steps: int,
                            guidance: float, erased: list[str], scaling: str = "squared",
                            batch_size: int | None = None) -> torch.Tensor:
    """`sampling.generate` with facilitated transport: each distinct prompt is sampled with the (attached)
    adapter at its own multiplier, for both branches of classifier-free guidance, as the code does."""
    images: list[torch.Tensor | None] = [None] * len(prompts)
    for prompt in dict.fromkeys(prompts):
        index = [i for i, p in enumerate(prompts) if p == prompt]
        with network.strength(transport_multiplier(transport_strength(pipe, prompt, erased), scaling)):
            drawn = generate(pipe, [prompt] * len(index), [seeds[i] for i in index], steps, guidance, batch_size)
        for i, image in zip(index, drawn):
            images[i] = image
    return torch.stack(images)


# ---------------------------------------------------------------------------------------------- training
def cosine_restarts_factor(step: int, warmup: int, total: int, cycles: int) -> float:
    """The learning-rate factor at `step` of the code's `cosine_with_restarts` (diffusers' hard restarts after a
    linear warm-up); 0 cycles: 1 after the warm-up."""
    if step < warmup:
        return step / max(1, warmup)
    if cycles == 0:
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0))))


class SpmTrainer(ErasureTrainer):
    """SPM in the harness (module docstring): the UNet frozen, its adapters trained; checkpoints, resume and the
    training log as for every method. `export` writes the adapter file and the UNet with it merged."""

    method = "spm"

    def __init__(self, pipe, *args, **kwargs):
        super().__init__(pipe, *args, **kwargs)
        self.erased = [self.spec.target]
        self.concept = self._encode(pipe, self.erased)  # (1, 77, d): the code trains on the bare word
        if self.device.type != "cpu":
            for encoder in text_encoders(pipe):
                encoder.to("cpu")

    def build_extra(self) -> None:
        cfg = self.config
        for p in self.params.values():  # the UNet stays as it is: SPM trains its adapters only
            p.requires_grad_(False)
        self.network = SpmNetwork(self.unet, cfg.spm_rank, cfg.spm_alpha).to(self.device).attach()
        self.params = dict(self.network.named_parameters())
        self.original = {name: p.detach().to("cpu", copy=True) for name, p in self.params.items()}
        self.loss_timesteps = self._scheduler(self.scheduler_config["num_train_timesteps"]).timesteps

    def _scheduler(self, steps: int):
        """The sampling scheduler of `steps` steps: DDIM, or a flow's Euler scheduler (shifted as its pipeline)."""
        return denoising_scheduler(self.scheduler_config, steps, (latent_shape(self.unet)[1] // 2) ** 2)

    @torch.no_grad()
    def _noised_by_sampling(self, c: torch.Tensor, empty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t: noise denoised for k of K DDIM steps (a flow's Euler steps) by the adapted UNet, guided towards c; t
        as the code indexes."""
        cfg = self.config
        scheduler = self._scheduler(cfg.spm_denoising_steps)
        k = int(torch.randint(1, cfg.spm_denoising_steps, (1,), generator=self.generator))
        channels, size = latent_shape(self.unet)
        latents = torch.randn((len(c), channels, size, size), generator=self.generator)
        latents = latents.to(self.device) * getattr(scheduler, "init_noise_sigma", 1.0)  # a flow's: unit noise
        for timestep in scheduler.timesteps[:k]:
            with self.accelerator.autocast():
                eps_empty, eps_c = denoiser_output(self.unet, torch.cat([latents, latents]), timestep,
                                               torch.cat([empty, c])).float().chunk(2)
            latents = scheduler.step(eps_empty + cfg.spm_start_guidance * (eps_c - eps_empty), timestep,
                                     latents).prev_sample
        index = int(k * len(self.loss_timesteps) / cfg.spm_denoising_steps)
        return latents, self.loss_timesteps[index].to(self.device).repeat(len(c))

    def _random_anchor(self, c: torch.Tensor) -> torch.Tensor:
        """One anchor for the embedding c (module docstring, step 3): random, kept with probability 1 − cos."""
        while True:
            noise = torch.randn(c.shape, generator=self.generator)
            noise = noise / noise.flatten().norm()
            similarity = F.cosine_similarity(c.flatten(), noise.flatten(), dim=0)
            if torch.rand((), generator=self.generator) < 1 - similarity:
                break
        return (torch.rand((), generator=self.generator) * 0.4 + 0.8) * noise * c.flatten().norm()

    def _anchors(self) -> torch.Tensor:
        """The anchor embeddings that reach the loss (module docstring, step 3), on the CPU. SDXL, as the code's
        train_spm_xl.py (sample_xl): the hidden states and the pooled embedding are drawn each against the
        concept's own, the time ids are the concept's; an MMDiT's context and pooled embedding likewise."""
        cfg = self.config
        c = self.concept[:1].cpu()
        if denoiser_kind(self.unet) == "mmdit":
            hidden, pooled = transformer_inputs(self.unet, c)
            drawn = [append_rows(self._random_anchor(hidden), self._random_anchor(pooled))[0]
                     for _ in range(cfg.spm_anchors)]
        elif self.unet.config.addition_embed_type is None:
            drawn = [self._random_anchor(c[0]) for _ in range(cfg.spm_anchors)]
        else:
            inputs = unet_inputs(self.unet, c)
            hidden, pooled = inputs["encoder_hidden_states"], inputs["added_cond_kwargs"]["text_embeds"]
            drawn = [pack_conditioning(self._random_anchor(hidden), self._random_anchor(pooled),
                                       inputs["added_cond_kwargs"]["time_ids"])[0] for _ in range(cfg.spm_anchors)]
        if cfg.spm_anchor_batch == "intended":
            return torch.stack(drawn)
        empty = self.empty_embedding[0].cpu()
        interleaved = [row for anchor in drawn for row in (empty, anchor)]
        return torch.stack(interleaved[cfg.spm_anchors:])  # the half the code's noise prediction keeps

    def train_step(self) -> dict:
        cfg = self.config
        n = cfg.batch_size
        c, empty = self.concept.expand(n, -1, -1), self.empty_embedding.expand(n, -1, -1)
        if cfg.spm_prompts == "target_prompts":
            c = self.target_embeddings[torch.randint(len(self.target_embeddings), (n,), generator=self.generator)]
        x_t, t = self._noised_by_sampling(c, empty)
        anchors = self._anchors().to(self.device).repeat_interleave(n, dim=0)
        x_a, t_a = x_t.repeat(len(anchors) // n, 1, 1, 1), t.repeat(len(anchors) // n)
        with torch.no_grad(), self.network.strength(0.0), self.accelerator.autocast():
            eps_c, eps_empty, eps_anchor = denoiser_output(self.unet, torch.cat([x_t, x_t, x_a]), torch.cat([t, t, t_a]),
                                                       torch.cat([c, empty, anchors])).float().split([n, n, len(anchors)])
            erased_target = eps_empty - cfg.spm_guidance * (eps_c - eps_empty)
        with self.accelerator.autocast():
            prediction = denoiser_output(self.unet, torch.cat([x_t, x_a]), torch.cat([t, t_a]),
                                     torch.cat([c, anchors])).float()
        erase_loss = F.mse_loss(prediction[:n], erased_target)
        anchor_loss = F.mse_loss(prediction[n:], eps_anchor)
        lr = cfg.lr * cosine_restarts_factor(self.step, cfg.spm_lr_warmup, cfg.iterations, cfg.spm_lr_cycles)
        for group in self.opt_g.param_groups:
            group["lr"] = lr
        return self.descend(erase_loss + cfg.spm_anchor_strength * anchor_loss,
                            {"g_loss": erase_loss.item(), "retain_loss": anchor_loss.item(), "lr": lr}, "spm")

    def export(self, base_model: str) -> dict[str, Path]:
        """The adapter (`spm.safetensors`), and the UNet with it merged at full strength (no transport), for the
        evaluation of UNet folders; `erasure.json`, the cost record and the model card as every method. No
        `delta.safetensors`: the merged change spans whole matrices (about 1 GB on SD v1.4), the adapter is its
        rank-r form."""
        unet_dir, adapter_path = self.run_dir / "unet", self.run_dir / ADAPTER_FILE
        paths = {"unet": unet_dir, "adapter": adapter_path}
        if self.accelerator.is_main_process:
            metadata = {"method": self.method, "base_model": base_model, "trainable": "spm adapters",
                        "target": self.spec.target, "anchor": self.spec.anchor, "kind": self.spec.kind,
                        "prompts": ",".join(self.erased), "config": json.dumps(asdict(self.config))}
            self.network.save(adapter_path, metadata)
            with self.network.merged(1.0), atomic_directory(unet_dir) as tmp:
                self.unet.save_pretrained(tmp, safe_serialization=True)
            atomic_save_json({**metadata, "adapter": ADAPTER_FILE}, self.run_dir / "erasure.json")
            self.tracking.finish(costs.write_training_record(self, paths))
            export.write_model_card(self.run_dir)
        return paths
