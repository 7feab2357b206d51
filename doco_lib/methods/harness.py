"""The training harness shared by every erasure method, and DoCo itself.

`ErasureTrainer` holds what all methods share (see its docstring); `DocoTrainer` adds DoCo: a
discriminator warm-up, then alternating discriminator and UNet (generator) updates. One DoCo iteration, on a batch of cached anchor latents z0 with noise ε and timesteps t:
  1. x_t = √ᾱ_t z0 + √(1−ᾱ_t) ε (a flow's (1−σ) z0 + σ ε); the trained UNet predicts for the target prompt c* ("fake") and, in the
     same forward pass, for the anchor prompt c. "Real" is the anchor prediction of the trained UNet
     (paper) or of a frozen copy of the original UNet (authors' code). D sees predictions as ε or x0 and L_r
     regresses onto ε, v or a flow's ε − z0, as the `prediction_type` says (`doco_lib.methods.prediction`).
  2. After the warm-up: L_u = the generator term of eq. 8 (D should call the target prediction
     "anchor"), L_r = the diffusion loss on the anchor prediction; their gradients G_u, G_r are combined
     by `retain_mode` (none | l2 | cp, eq. 9) and applied by Adam.
  3. D is updated to tell real from fake (BCE with logits, eq. 8), on detached predictions.
The denoiser trained is the pipeline's UNet (SD v1, 2.x, SDXL) or its MMDiT transformer (SD 3.x, FLUX.1:
`models.denoiser`, every method); `self.unet` names either, and every call goes
through `models.denoiser_output`, so no method needs to know which family it trains.
All randomness comes from one generator saved in the checkpoint, so a resumed run equals an
uninterrupted one.

Several processes (torchrun or `accelerate launch`, one per GPU; on the CPU with gloo) train data-parallel:
each draws its own batches of `batch_size` from its own generator (rank 0's is the single-process one), the
gradients of L_u and L_r, and D's, are averaged over the processes before each update, and D's BatchNorm
statistics span all processes' batches in each of its passes (`SyncedBatchNorm2d`), so N processes at batch B
take the steps one process at batch N·B takes on the same samples (tested), and every process holds the same
weights and running statistics; the main process alone writes checkpoints (with every process's generator), the
log and the exports.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed
import torch.nn.functional as F

from doco_lib import costs, export, tracking
from doco_lib.anchors import AnchorLatents
from doco_lib.concepts import ConceptSpec
from doco_lib.config import SCHEMA, ParamsError
from doco_lib.errors import TrainingDiverged, TrainingDoesNotFit
from doco_lib.io import (
    atomic_directory,
    atomic_save_json,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_text,
    load_torch_checkpoint,
)
from doco_lib.methods.adversarial_prompts import AdversarialPrompts
from doco_lib.methods.discriminator import GANLoss, NLayerDiscriminator
from doco_lib.methods.prediction import Parameterization
from doco_lib.methods.registry import FIDELITY_PRESETS, METHODS, OPTIMIZERS, TRAINABLE, TRAINABLE_PARAMETERS
from doco_lib.methods.split_gradients import SplitLinearGradients, bias_free_linears
from doco_lib.methods.surgery import concept_preserving_gradient, restricted_gradient
from doco_lib.models import (
    denoiser,
    denoiser_family,
    denoiser_kind,
    denoiser_output,
    encode_prompts,
    half_dtype,
    latent_shape,
    output_with_weights,
    pick_device,
    text_encoders,
    unconditional_conditioning,
)


def _schema_default(key: str):
    """The params schema's default of `key`, or the `paper` preset's where the schema leaves it to the preset;
    lists as tuples (a dataclass default must not be mutable)."""
    default = SCHEMA[key].default
    default = FIDELITY_PRESETS["paper"][key] if default is None and key in FIDELITY_PRESETS["paper"] else default
    return tuple(default) if isinstance(default, list) else default


@dataclass(frozen=True)
class TrainingConfig:
    """Settings of one erasure run; `method` picks DoCo or a baseline, the rest of the harness is shared. Each
    default is the params schema's (`doco_lib.config.SCHEMA`), where that is null the `paper` preset's."""

    method: str = _schema_default("method")
    iterations: int = _schema_default("iterations")
    warmup_iterations: int = _schema_default("warmup_iterations")
    batch_size: int = _schema_default("batch_size")
    lr: float = _schema_default("lr")
    disc_lr: float = _schema_default("disc_lr")
    retain_mode: str = _schema_default("retain_mode")
    retain_weight: float = _schema_default("retain_weight")
    surgery_lambda: float = _schema_default("surgery_lambda")
    surgery_scope: str = _schema_default("surgery_scope")
    projection: str = _schema_default("projection")
    add_retain_grad: bool = _schema_default("add_retain_grad")
    disc_input: str = _schema_default("disc_input")
    disc_real_source: str = _schema_default("disc_real_source")
    disc_layers: int = _schema_default("disc_layers")
    disc_channels: int = _schema_default("disc_channels")
    disc_norm: str = _schema_default("disc_norm")
    disc_final_stride: int = _schema_default("disc_final_stride")
    disc_beta1: float = _schema_default("disc_beta1")
    gan_mode: str = _schema_default("gan_mode")
    max_grad_norm: float = _schema_default("max_grad_norm")
    trainable: str = _schema_default("trainable")
    checkpoint_every: int = _schema_default("checkpoint_every")
    seed: int = _schema_default("seed")
    mixed_precision: str = _schema_default("mixed_precision")
    gradient_accumulation_steps: int = _schema_default("gradient_accumulation_steps")
    gradient_checkpointing: bool | str = _schema_default("gradient_checkpointing")  # true | false | "auto"
    heldout_fraction: float = 0.1
    adv_prompt_every: int = _schema_default("adv_prompt_every")  # adversarial prompts (adversarial_prompts.py)
    adv_prompt_tokens: int = _schema_default("adv_prompt_tokens")
    adv_prompt_steps: int = _schema_default("adv_prompt_steps")
    adv_prompt_lr: float = _schema_default("adv_prompt_lr")
    adv_prompt_fraction: float = _schema_default("adv_prompt_fraction")
    esd_eta: float = _schema_default("esd_eta")
    esd_steps: int = _schema_default("esd_steps")
    esd_start_guidance: float = _schema_default("esd_start_guidance")
    conabl_variant: str = _schema_default("conabl_variant")
    conabl_retain: bool = _schema_default("conabl_retain")
    rgd_alpha: float = _schema_default("rgd_alpha")
    rgd_truncation: float = _schema_default("rgd_truncation")
    uce_code_version: int = _schema_default("uce_code_version")  # UCE (doco_lib/methods/uce.py)
    uce_lambda: float = _schema_default("uce_lambda")
    uce_erase_scale: float = _schema_default("uce_erase_scale")
    uce_preserve_scale: float | None = _schema_default("uce_preserve_scale")
    uce_preserve: tuple[str, ...] = _schema_default("uce_preserve")
    spm_rank: int = _schema_default("spm_rank")  # SPM (doco_lib/methods/spm.py)
    spm_alpha: float = _schema_default("spm_alpha")
    spm_guidance: float = _schema_default("spm_guidance")
    spm_anchor_strength: float = _schema_default("spm_anchor_strength")
    spm_anchors: int = _schema_default("spm_anchors")
    spm_anchor_batch: str = _schema_default("spm_anchor_batch")
    spm_prompts: str = _schema_default("spm_prompts")
    spm_denoising_steps: int = _schema_default("spm_denoising_steps")
    spm_start_guidance: float = _schema_default("spm_start_guidance")
    spm_lr_warmup: int = _schema_default("spm_lr_warmup")
    spm_lr_cycles: int = _schema_default("spm_lr_cycles")
    optimizer: str = _schema_default("optimizer")
    frozen_dtype: str = _schema_default("frozen_dtype")
    weight_dtype: str = _schema_default("weight_dtype")
    attention: str = _schema_default("attention")
    compile_unet: bool = _schema_default("compile_unet")
    export_lora: bool = _schema_default("export_lora")
    lora_energy: float = _schema_default("lora_energy")
    tracker: str = _schema_default("tracker")  # experiment tracking (doco_lib/tracking.py)
    tracker_project: str = _schema_default("tracker_project")
    tracker_sample_every: int = _schema_default("tracker_sample_every")
    num_inference_steps: int = _schema_default("num_inference_steps")  # the tracker's sample grids
    guidance_scale: float = _schema_default("guidance_scale")

    @classmethod
    def from_params(cls, params: dict) -> "TrainingConfig":
        """Preset values of `params['fidelity']`, overridden by every key the params set (not None)."""
        values = dict(FIDELITY_PRESETS[params.get("fidelity", "paper")])
        names = {f.name for f in fields(cls)}
        values.update({k: v for k, v in params.items() if k in names and v is not None})
        return cls(**{k: v for k, v in values.items() if k in names})

    def training_identity(self) -> dict:
        """Everything that shapes this method's trajectory; `iterations` may grow on resume, the rest may not.
        Keys of methods the run does not read (`spm_*` in a DoCo run) are left out, so changing them does not
        refuse a resume; DoCo with `retain_mode: rgd` reads RGD's `rgd_*`."""
        read = {self.method, "rgd"} if self.retain_mode == "rgd" else {self.method}
        other_methods = tuple(f"{name}_" for name in METHODS if name not in read)
        not_trajectory = ("iterations", "checkpoint_every", "attention", "compile_unet", "export_lora", "lora_energy",
                          "tracker", "tracker_project", "tracker_sample_every", "num_inference_steps", "guidance_scale")
        return {key: value for key, value in asdict(self).items()
                if key not in not_trajectory and not key.startswith(other_methods)}


def parameters_matching(model, include: str, exclude: str | None) -> dict[str, torch.nn.Parameter]:
    """The parameters of `model` whose names match the regular expression `include` and not `exclude` (None: none
    excluded), as the registry's tables give them."""
    import re

    return {name: p for name, p in model.named_parameters()
            if re.search(include, name) and not (exclude and re.search(exclude, name))}


def select_trainable(unet, mode: str) -> dict[str, torch.nn.Parameter]:
    """Parameters of the denoiser `unet` to fine-tune: cross-attention K/V (DoCo and ConAbl code), all
    cross-attention (ESD-x), everything but cross-attention (ESD-u), or the full UNet; on an MMDiT (SD 3.x,
    FLUX.1) their analogues, as `registry.TRAINABLE_PARAMETERS` lists them."""
    if mode not in TRAINABLE:
        raise ValueError(f"trainable {mode!r} is not one of {TRAINABLE}")
    selected = parameters_matching(unet, *TRAINABLE_PARAMETERS[denoiser_kind(unet)][mode])
    if not selected:
        raise ValueError(f"trainable={mode!r} selects no parameter of this {type(unet).__name__}")
    return selected


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    """Adam for the UNet: torch's default (multi-tensor `foreach` where supported), its fused kernel, or
    bitsandbytes' 8-bit Adam (optimizer state in 8 bits: about 3/4 less optimizer memory)."""
    if name == "adam_8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise ImportError("optimizer: adam_8bit needs bitsandbytes (pip install bitsandbytes); or use adam "
                              "or adam_fused.") from None
        return bitsandbytes.optim.Adam8bit(params, lr=lr)
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r} is not one of {OPTIMIZERS}")
    return torch.optim.Adam(params, lr=lr, fused=True if name == "adam_fused" else None)


def frozen_dtype(name: str, device: torch.device, kind: str = "unet") -> torch.dtype:
    """dtype of the frozen original denoiser of `kind` (inference only): half precision on GPUs (`half_dtype`)
    unless told otherwise."""
    if name == "auto":
        return half_dtype(kind) if device.type == "cuda" else torch.float32
    return DTYPES[name]


def check_weight_dtype(weight_dtype: str, mixed_precision: str) -> None:
    """Half-precision weights (`weight_dtype`) run only under autocast: refuse them without mixed precision
    (`mixed_precision` as `resolve_precision` resolved it: `auto` is none on the CPU)."""
    if weight_dtype != "float32" and mixed_precision == "no":
        raise ParamsError(f"weight_dtype: {weight_dtype} needs mixed precision, and this run has none (mixed_precision "
                          "no, or auto on the CPU); set mixed_precision: bf16 or fp16, or weight_dtype: float32.")


def resolve_precision(name: str, device: torch.device) -> str:
    """accelerate's mixed precision for `mixed_precision: name` on `device`: `auto` is bf16 on GPUs with native
    bfloat16 (compute capability 8.0 and up), fp16 on older GPUs (V100, T4), none elsewhere."""
    if device.type != "cuda":
        return "no" if name == "auto" else name
    native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    if name == "auto":
        return "bf16" if native_bf16 else "fp16"
    if name == "bf16" and not native_bf16:
        raise ParamsError(f"mixed_precision: bf16 needs a GPU with native bfloat16 (compute capability 8.0 or more); "
                          f"{torch.cuda.get_device_name(device)} has none: use auto (fp16 here) or fp16.")
    return name


# The trained UNet's gradients come from torch.autograd.grad, outside accelerate's GradScaler (which only D's
# optimizer uses), so under fp16 the losses are scaled by a fixed power of two, divided out of the gradients
# exactly, to keep small gradients from underflowing in the half-precision backward pass.
FP16_LOSS_SCALE = 2.0 ** 10


def launched_processes() -> int:
    """How many processes this launch started: torchrun and `accelerate launch` set WORLD_SIZE in each."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_device(requested: str) -> torch.device:
    """The device this process trains on: `requested` ('auto': a GPU when there is one), or under a launch of
    several processes accelerate's choice for this one (cuda:LOCAL_RANK; the CPU with gloo when `requested`
    resolves to the CPU), which also joins the process group."""
    device = pick_device(requested)
    if launched_processes() == 1:
        return device
    from accelerate import PartialState

    return PartialState(cpu=device.type == "cpu").device


def is_main_process() -> bool:
    """Whether this process writes the run's files (the only process, or rank 0 of a launch)."""
    if launched_processes() == 1:
        return True
    from accelerate import PartialState

    return PartialState().is_main_process


def wait_for_everyone() -> None:
    """A barrier of all the launch's processes (nothing on a single process). Not accelerate's, which names the
    GPU of the process's local rank even to gloo on the CPU: a GPU the machine may not have."""
    if launched_processes() > 1:
        torch.distributed.barrier()




class ErasureTrainer:
    """The harness every method shares: trainable-parameter selection, cached text embeddings of the
    prompt pairs, anchor latents with a held-out split, Adam on the selected parameters, one seeded
    generator for all randomness, atomic checkpoints with resume, a training log, and export of the
    erased UNet and its weight delta. Subclasses define `train_step` and any extra state."""

    method = "base"

    def __init__(self, pipe, anchors: AnchorLatents, spec: ConceptSpec, config: TrainingConfig, run_dir: Path,
                 device: torch.device | str = "cpu", target_prompts: dict[str, str] | None = None,
                 preservation: AnchorLatents | None = None, rehearsal: AnchorLatents | None = None):
        """`target_prompts` maps each anchor prompt to its target prompt (default: the concept spec's rule).
        `preservation`: the original model's images of other concepts to keep; they join the retaining batch.
        `rehearsal`: concepts erased before this run, as the original model's images of their anchors captioned
        with their target prompts; they join the retaining batch too, which keeps those targets drawn as their
        anchors while this run erases its own (under eq. 9, this run's unlearning may not undo them)."""
        from accelerate import Accelerator

        self.config, self.spec, self.anchors = config, spec, anchors
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # accelerate's "cuda" (autocast, D's optimizer) is then this GPU
        self.mixed_precision = resolve_precision(config.mixed_precision, self.device)
        check_weight_dtype(config.weight_dtype, self.mixed_precision)
        if launched_processes() == 1:  # accelerate keeps one precision a process: a later trainer may want another
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state()
        self.accelerator = Accelerator(mixed_precision=self.mixed_precision, cpu=self.device.type == "cpu",
                                       **tracking.accelerator_arguments(config.tracker, self.run_dir))
        self.loss_scale = FP16_LOSS_SCALE if self.accelerator.scaler is not None else 1.0
        # The denoiser trained: a UNet, or the MMDiT transformer of SD 3.x or FLUX.1 (`models.denoiser`), held in
        # `weight_dtype`; the parameters it trains are made float32 below, once the frozen copy is taken.
        self.unet = denoiser(pipe).to(self.device)
        if self.unet.dtype != DTYPES[config.weight_dtype]:
            self.unet.to(DTYPES[config.weight_dtype])
        self.unet.requires_grad_(False)
        # "auto": off, until a GPU's memory check finds the largest iteration does not fit without it (`fit_memory`).
        self.gradient_checkpointing = config.gradient_checkpointing is True
        self.checkpointing_undecided = config.gradient_checkpointing == "auto" and self.device.type == "cuda"
        if self.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        if config.attention == "classic":  # diffusers' default is SDPA (torch's fused attention kernels)
            if denoiser_family(self.unet) != "unet":
                raise ParamsError("attention: classic is a UNet's attention processor; use sdpa with SD 3.x and "
                                  "FLUX.1.")
            from diffusers.models.attention_processor import AttnProcessor

            self.unet.set_attn_processor(AttnProcessor())
        self.params = self.trained_parameters()
        for p in self.params.values():
            p.requires_grad_(True)
        # The original denoiser (`original_output`), for methods that read it; the inner attack's reference is it.
        # Shared: only the trained parameters' starting values are kept, on the device (FLUX.1: 0.7 of 22 GiB).
        self.frozen_unet, self.starting_weights = None, None
        reads_original = self.needs_frozen_unet() or config.adv_prompt_every
        if reads_original and config.frozen_dtype == "shared":
            self.starting_weights = {name: p.detach().clone() for name, p in self.params.items()}
        elif reads_original:
            self.frozen_unet = copy.deepcopy(self.unet).requires_grad_(False).eval()
            dtype = frozen_dtype(config.frozen_dtype, self.device, denoiser_kind(self.unet))
            if dtype != self.frozen_unet.dtype:
                self.frozen_unet.to(dtype)
        self._train_in_float32(self.params)
        # The starting weights, for the exported delta only: on the CPU, the GPU's memory is for training.
        self.original = {name: p.detach().to("cpu", copy=True) for name, p in self.params.items()}
        if config.compile_unet:  # in place: parameter names, state dicts and save_pretrained are unchanged
            self.unet.compile()
            if self.frozen_unet is not None:
                self.frozen_unet.compile()
        self.scheduler_config = pipe.scheduler.config
        self.parameterization = Parameterization.of_scheduler(self.scheduler_config, self.device)
        self.alphas_cumprod = self.parameterization.alphas_cumprod

        # Text embeddings of every anchor prompt and its target prompt, computed once (the encoder is frozen).
        unique = sorted(set(anchors.prompts))
        self.prompt_index = torch.tensor([unique.index(p) for p in anchors.prompts])
        self.prompt_pairs = [(p, target_prompts[p]) for p in unique] if target_prompts else spec.prompt_pairs(unique)
        self.anchor_embeddings = self._encode(pipe, [a for a, _ in self.prompt_pairs])
        self.target_embeddings = self._encode(pipe, [t for _, t in self.prompt_pairs])
        self.empty_embedding = unconditional_conditioning(pipe)
        self.preservation, self.rehearsal = preservation, rehearsal
        # Each set joining the retaining batch: (images, index of each image's caption, caption embeddings).
        self.retained_sets = []
        for images in (preservation, rehearsal):
            if images is not None:
                captions = sorted(set(images.prompts))
                self.retained_sets.append((images, torch.tensor([captions.index(p) for p in images.prompts]),
                                           self._encode(pipe, captions)))
        # The inner attack of adversarial prompts runs the text encoder; it stays on the training device then.
        self.adv_prompts = AdversarialPrompts(pipe, [t for _, t in self.prompt_pairs], config.adv_prompt_tokens,
                                              config.seed, self.device) if config.adv_prompt_every else None
        if self.device.type != "cpu":  # the embeddings are cached: training needs no encoder on the GPU otherwise
            for encoder in text_encoders(pipe) if self.adv_prompts is None else []:
                encoder.to("cpu")
            pipe.vae.to("cpu")

        split = torch.randperm(len(anchors), generator=torch.Generator().manual_seed(config.seed))
        n_heldout = max(1, int(len(anchors) * config.heldout_fraction))
        self.heldout_index, self.train_index = split[:n_heldout], split[n_heldout:]

        torch.manual_seed(config.seed)
        self.build_extra()
        self._train_in_float32(self.params)  # again: build_extra may bring its own (SPM's adapters)
        self.opt_g = make_optimizer(config.optimizer, self.params.values(), config.lr)
        # Each process draws its own batches: rank 0 the single-process stream, the others streams hashed from
        # (seed, rank) (torch's CPU generator keeps only a seed's low 32 bits, so no offset by 2**32).
        rank = self.accelerator.process_index
        stream = config.seed + 1 if rank == 0 else int.from_bytes(
            hashlib.sha256(f"{config.seed}/{rank}".encode()).digest()[:4], "big")
        self.generator = torch.Generator().manual_seed(stream)
        self.step = 0
        self.history: list[dict] = []
        self.checkpoint_path = self.run_dir / "checkpoint.pt"
        self.loop_cost = costs.LoopCost()  # wall time and peak memory of the iterations, kept in the checkpoint
        if self.checkpoint_path.exists():
            self._load_checkpoint()
        self.tracking = tracking.RunTracking(self, pipe)

    @staticmethod
    def _train_in_float32(params: dict[str, torch.nn.Parameter]) -> None:
        """Make the trained parameters float32 whatever `weight_dtype` holds the rest in, as diffusers'
        `cast_training_params` does: Adam's steps (lr 4e-6 on weights of about 1e-2) lie below bfloat16's resolution
        near the weights and would round away."""
        for p in params.values():
            if p.dtype != torch.float32:
                p.data = p.data.float()

    @torch.no_grad()
    def original_output(self, x_t: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The starting denoiser's output for (x_t, t, c), without gradient (under the caller's autocast): the trained
        denoiser with its trained parameters' starting values swapped in for the call and in eval mode, as the copy
        is (`frozen_dtype: shared`), or the separate frozen copy in its dtype."""
        if self.frozen_unet is not None:
            dtype = self.frozen_unet.dtype
            return denoiser_output(self.frozen_unet, x_t.to(dtype), t, c.to(dtype))
        training = self.unet.training
        self.unet.eval()
        try:
            return output_with_weights(self.unet, self.starting_weights, x_t.to(self.unet.dtype), t,
                                       c.to(self.unet.dtype))
        finally:
            self.unet.train(training)

    def trained_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The parameters the method changes, by name: those `trainable` selects (`select_trainable`)."""
        return select_trainable(self.unet, self.config.trainable)

    def needs_frozen_unet(self) -> bool:
        return False

    def build_extra(self) -> None:
        """Modules and optimizers beyond the UNet's (DoCo's discriminator)."""

    def extra_state(self) -> dict:
        return {}

    def extra_exports(self) -> dict[str, dict[str, torch.Tensor]]:
        """Further safetensors files `export` writes, name → tensors (DoCo's discriminator)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def train_step(self) -> dict:
        raise NotImplementedError

    def _encode(self, pipe, prompts: list[str]) -> torch.Tensor:
        """The prompts' UNet conditioning (`doco_lib.models.encode_prompts`), encoded on the training device."""
        for encoder in text_encoders(pipe):
            encoder.to(self.device)
        return encode_prompts(pipe, prompts)

    # ---------------------------------------------------------------- one iteration
    def _sample_index(self) -> torch.Tensor:
        """A batch of training-split anchor indices, drawn with replacement from the run's generator."""
        return self.train_index[torch.randint(0, len(self.train_index), (self.config.batch_size,),
                                              generator=self.generator)]

    def _noised(self, z0: torch.Tensor, generator: torch.Generator):
        """(x_t, t, target): `z0` noised at uniformly drawn timesteps, as in DDPM or flow-matching training, and what
        the denoiser should output for it (the noise ε, v for a v-prediction model, ε − z0 for a flow)."""
        noise = torch.randn(z0.shape, generator=generator).to(self.device)
        t = self.parameterization.draw_timesteps(len(z0), generator).to(self.device)
        return self.parameterization.add_noise(z0, noise, t), t, self.parameterization.target(z0, noise, t)

    def _batch(self, index: torch.Tensor, generator: torch.Generator):
        x_t, t, target = self._noised(self.anchors.sample(index, generator).to(self.device), generator)
        prompts = self.prompt_index[index]
        return x_t, t, target, self.anchor_embeddings[prompts], self._target_conditioning(prompts)

    def _target_conditioning(self, prompts: torch.Tensor) -> torch.Tensor:
        """The target prompts' conditionings of a batch (`prompts`: each sample's prompt pair), a share of them
        adversarial once an inner attack has run (`adv_prompt_fraction`)."""
        plain = self.target_embeddings[prompts]
        if self.adv_prompts is None:
            return plain
        return self.adv_prompts.mixed(plain, prompts, self.config.adv_prompt_fraction, self.generator)

    def refresh_adversarial_prompts(self) -> dict:
        """The inner attack, on the iterations it runs (every `adv_prompt_every` from `warmup_iterations` on), on
        batches of `_adversarial_batch`. Returns its log entry."""
        cfg = self.config
        if (self.adv_prompts is None or self.step < cfg.warmup_iterations
                or (self.step - cfg.warmup_iterations) % cfg.adv_prompt_every):
            return {}
        loss = self.adv_prompts.attack(self.unet, self.original_output, self._adversarial_batch, self.target_embeddings,
                                       cfg.adv_prompt_steps, cfg.adv_prompt_lr, self.reduce, self.accelerator.autocast)
        return {"adv_prompt_loss": loss}

    def _adversarial_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A batch of the inner attack: noised anchor latents (x_t, t) and each sample's prompt pair."""
        index = self._sample_index()
        x_t, t, _ = self._noised(self.anchors.sample(index, self.generator).to(self.device), self.generator)
        return x_t, t, self.prompt_index[index]

    def _retain_batch(self, x_t: torch.Tensor, t: torch.Tensor, target: torch.Tensor, c: torch.Tensor):
        """The batch of the retaining loss: the anchor batch, plus as many preservation images when a
        preservation set is given, and as many rehearsal images when a rehearsal set is given (drawn after the
        anchor batch, so runs without them are unchanged)."""
        batch = [(x_t, t, target, c)]
        for images, caption_index, embeddings in self.retained_sets:
            index = torch.randint(0, len(images), (len(x_t),), generator=self.generator)
            batch.append((*self._noised(images.sample(index, self.generator).to(self.device), self.generator),
                          embeddings[caption_index[index]]))
        return tuple(torch.cat(parts) for parts in zip(*batch))

    def _grads(self, loss: torch.Tensor, retain_graph: bool) -> list[torch.Tensor]:
        return self._unscaled(torch.autograd.grad(self._scaled(loss), list(self.params.values()),
                                                  retain_graph=retain_graph))

    def _scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to differentiate: times FP16_LOSS_SCALE under fp16, itself otherwise."""
        return loss * self.loss_scale if self.loss_scale != 1 else loss

    def _unscaled(self, grads) -> list[torch.Tensor]:
        return [g / self.loss_scale for g in grads] if self.loss_scale != 1 else list(grads)

    def _clip(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.config.max_grad_norm <= 0:
            return grads
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        scale = (self.config.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        return [g * scale for g in grads]


    def apply_update(self, update: list[torch.Tensor]) -> None:
        """Set `update` as the gradient of the trainable parameters and take an Adam step."""
        if not all(torch.isfinite(g).all() for g in update):
            raise TrainingDiverged(f"non-finite gradient at step {self.step}; the last good checkpoint is "
                                   f"{self.checkpoint_path}")
        for p, g in zip(self.params.values(), update):
            p.grad = g.to(p.dtype)
        self.opt_g.step()
        self.opt_g.zero_grad(set_to_none=True)

    def check_finite(self, logs: dict) -> None:
        """Stop on a non-finite loss. Over several processes the logged values become their mean over the
        processes first (the log describes all their batches, and all processes stop together)."""
        if self.accelerator.num_processes > 1:
            values = torch.tensor(list(logs.values()), dtype=torch.float64, device=self.device)
            logs.update(zip(logs, self.accelerator.reduce(values, "mean").tolist()))
        if not all(math.isfinite(v) for v in logs.values()):
            raise TrainingDiverged(f"non-finite loss at step {self.step} ({logs}); the last good checkpoint is "
                                   f"{self.checkpoint_path}")

    def record_step(self, phase: str, logs: dict) -> dict:
        """Count the iteration and append its log record."""
        self.step += 1
        record = {"step": self.step, "phase": phase, **logs}
        self.history.append(record)
        return record

    def descend(self, loss: torch.Tensor, logs: dict, phase: str) -> dict:
        """One plain gradient step on `loss` (clipped, averaged over processes), logged as `phase`."""
        self.check_finite(logs)
        self.apply_update(self._clip(self.reduce(self._grads(loss, retain_graph=False))))
        return self.record_step(phase, logs)

    def reduce(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Average gradients over processes (multi-GPU); the identity on one process."""
        if self.accelerator.num_processes == 1:
            return grads
        return [self.accelerator.reduce(g, "mean") for g in grads]

    # ---------------------------------------------------------------- memory
    def memory_trial(self) -> tuple[int, str]:
        """(the step of the iteration to come that takes the most memory, how to name it in an error): here the
        next one, as every iteration is alike."""
        return self.step, f"iteration {self.step + 1}"

    def set_gradient_checkpointing(self, on: bool) -> None:
        self.gradient_checkpointing = on
        (self.unet.enable_gradient_checkpointing if on else self.unet.disable_gradient_checkpointing)()

    def fit_memory(self) -> None:
        """On a GPU, before training: with `gradient_checkpointing: auto`, try the largest iteration to come without
        checkpointing and turn it on if that does not fit (trying again with it); otherwise check the largest
        iteration where a lighter phase comes first (DoCo's warm-up), so that a run too large stops now, not hours in."""
        trial, _ = self.memory_trial()
        if self.checkpointing_undecided:
            try:
                self.check_memory()
            except TrainingDoesNotFit:
                self.set_gradient_checkpointing(True)
                self.check_memory()
            self.checkpointing_undecided = False
            if self.accelerator.is_main_process:
                print(f"gradient checkpointing (auto): {'on' if self.gradient_checkpointing else 'off'}")
        elif trial > self.step:
            self.check_memory()

    def check_memory(self) -> None:
        """Run the iteration of `memory_trial` now, then put back everything it changed: the weights, the optimizers
        and the loss scaler, the `extra_state` (DoCo's D), the step and the log, the generator and torch's random
        states. Raises TrainingDoesNotFit, naming the params keys that save memory, when it runs out of GPU memory."""
        cuda = self.device.type == "cuda"
        trial, description = self.memory_trial()
        saved = {"trainable": {n: p.detach().to("cpu", copy=True) for n, p in self.params.items()},
                 "opt_g": copy.deepcopy(self.opt_g.state_dict()), "step": self.step, "history": len(self.history),
                 "generator": self.generator.get_state(), "training": self.unet.training,
                 **copy.deepcopy(self.extra_state())}
        costs.reset_peak()  # open cost meters keep the peaks so far
        failure = None
        try:
            with torch.random.fork_rng(devices=[self.device] if cuda else []):
                self.step = trial
                self.train_step()
        except torch.OutOfMemoryError as error:
            failure = ". ".join(str(error).replace("\n", " ").split(". ")[:3])  # what it tried, what there was
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(saved["trainable"][name])
                    p.grad = None
            self.opt_g.load_state_dict(saved["opt_g"])
            self.load_extra_state(saved)
            self.step, self.history = saved["step"], self.history[:saved["history"]]
            self.generator.set_state(saved["generator"])
            self.unet.train(saved["training"])
        if failure is not None:
            if cuda:
                torch.cuda.empty_cache()
            cfg, keys = self.config, []
            if not self.gradient_checkpointing:
                keys.append("gradient_checkpointing: true")
            if self.mixed_precision == "no":
                keys.append("mixed_precision: auto")
            keys.append(f"a smaller batch_size (now {cfg.batch_size}) with a larger gradient_accumulation_steps "
                        f"(now {cfg.gradient_accumulation_steps})")
            if cfg.weight_dtype == "float32":
                keys.append("weight_dtype: bfloat16 (with mixed precision; the trained parameters stay float32)")
            raise TrainingDoesNotFit(f"{description} does not fit in the memory of {self.device} ({failure}); set any "
                                     f"of: {'; '.join(keys)}.")
        if cuda and self.accelerator.is_main_process:
            total = torch.cuda.get_device_properties(self.device).total_memory
            print(f"memory check: {description} peaks at {torch.cuda.max_memory_allocated(self.device) / 2 ** 30:.1f} "
                  f"of {total / 2 ** 30:.1f} GiB on {self.device} (gradient checkpointing "
                  f"{'on' if self.gradient_checkpointing else 'off'})")

    # ---------------------------------------------------------------- loop, checkpoints, export
    def run(self, until: int | None = None, progress: bool = True) -> list[dict]:
        """Train until step `until` (default: all iterations), checkpointing every `checkpoint_every` steps."""
        from tqdm.auto import tqdm

        until = self.config.iterations if until is None else min(until, self.config.iterations)
        if self.device.type == "cuda" and self.step < until:
            self.fit_memory()
        bar = tqdm(total=until, initial=self.step, desc=self.method, unit="it",
                   disable=not (progress and self.accelerator.is_main_process))
        with self.loop_cost.session(self):
            while self.step < until:
                started = time.perf_counter()
                record = self.train_step()
                record["seconds"] = time.perf_counter() - started  # wall time of the iteration, for run-time reports
                self.tracking.log_iteration(record)
                bar.update(1)
                bar.set_postfix({k: round(v, 3) for k, v in record.items() if isinstance(v, float)}, refresh=False)
                if self.step % self.config.checkpoint_every == 0 or self.step == until:
                    self.save_checkpoint()
        bar.close()
        return self.history

    def save_checkpoint(self) -> None:
        """Every process's generator goes into the checkpoint (the weights and optimizer states are the same in
        all); the main process writes it and the log."""
        from accelerate.utils import gather_object

        generators = torch.stack(gather_object([self.generator.get_state()]))  # one row per process, in rank order
        if not self.accelerator.is_main_process:
            return
        state = {"trainable": {n: p.detach().cpu() for n, p in self.params.items()},
                 "opt_g": self.opt_g.state_dict(), "step": self.step,
                 "generator": generators, "history": json.dumps(self.history),
                 "identity": json.dumps(self.identity(), sort_keys=True), "loop_cost": self.loop_cost.to_json(),
                 **self.extra_state()}
        if self.adv_prompts is not None and self.adv_prompts.embeddings is not None:
            state["adv_prompt_delta"] = self.adv_prompts.delta.cpu()
        atomic_torch_save(state, self.checkpoint_path)
        self.write_history()

    def identity(self) -> dict:
        """What a checkpoint must share with this trainer to be resumed: the settings (mixed precision as resolved
        on this machine), the number of processes and the training data."""
        data = [self.prompt_pairs, self.anchors.seeds]
        for images, _, _ in self.retained_sets:
            data += [images.prompts, images.seeds]
        digest = hashlib.sha256(json.dumps(data).encode()).hexdigest()
        return {**self.config.training_identity(), "mixed_precision": self.mixed_precision,
                "processes": self.accelerator.num_processes, "training_data": digest}

    def _load_checkpoint(self) -> None:
        state = load_torch_checkpoint(self.checkpoint_path)
        # A setting added after the checkpoint was written counts as its default then.
        defaults = {f.name: f.default for f in fields(TrainingConfig)} | {"processes": 1}
        saved, now = json.loads(state["identity"]), self.identity()
        written_by = saved.get("processes", 1)
        if written_by != now["processes"]:
            raise ParamsError(f"{self.checkpoint_path} was written by a run of {written_by} process(es), each drawing "
                              f"its own batches; this one has {now['processes']}. Resume it with "
                              f"{written_by} (torchrun --nproc_per_node {written_by} ...), or delete it or pick "
                              "another run_name to start afresh.")
        changed = sorted(k for k in now if saved.get(k, defaults.get(k)) != now[k])
        if changed:
            raise ParamsError(f"{self.checkpoint_path} was written with other settings ({', '.join(changed)}); "
                              "delete it or pick another run_name to start afresh.")
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(state["trainable"][name].to(p.device))
        self.opt_g.load_state_dict(state["opt_g"])
        self.load_extra_state(state)
        if "adv_prompt_delta" in state:
            self.adv_prompts.load(state["adv_prompt_delta"])
        generators = state["generator"]
        if generators.dim() == 1:  # a checkpoint written before processes had a generator each
            generators = generators[None]
        self.generator.set_state(generators[self.accelerator.process_index].clone())  # set_state crashes on a view
        self.step = state["step"]
        self.history = json.loads(state["history"])
        self.loop_cost.load(state.get("loop_cost"))

    def write_history(self) -> Path:
        import pandas as pd

        path = self.run_dir / "training_log.csv"
        atomic_write_text(pd.DataFrame(self.history).to_csv(index=False), path)
        return path

    def export(self, base_model: str) -> dict[str, Path]:
        """The erased UNet in diffusers format and the weight delta (safetensors), with metadata, and the
        `extra_exports` (and with `export_lora` the delta as a LoRA in `lora/`, doco_lib/export.py); each written
        atomically, so a UNet folder with a config.json is always complete; then the run's cost record
        (`costs.training_record`) and its model card (README.md). Only the main process writes; the others return the
        paths at once (a caller of several processes waits for everyone before reading)."""
        from safetensors.torch import save

        unet_dir, delta_path = self.run_dir / "unet", self.run_dir / "delta.safetensors"
        extras = self.extra_exports()
        paths = {"unet": unet_dir, "delta": delta_path, **{name: self.run_dir / f"{name}.safetensors" for name in extras}}
        if self.config.export_lora:
            paths["lora"] = self.run_dir / "lora"
        if self.accelerator.is_main_process:  # every process holds the same weights
            with atomic_directory(unet_dir) as tmp:
                self.unet.save_pretrained(tmp, safe_serialization=True)
            delta = {n: (p.detach().cpu() - self.original[n]).contiguous() for n, p in self.params.items()}
            metadata = {"method": self.method, "base_model": base_model, "trainable": self.config.trainable,
                        "target": self.spec.target, "anchor": self.spec.anchor, "kind": self.spec.kind,
                        "config": json.dumps(asdict(self.config))}
            atomic_write_bytes(save(delta, metadata=metadata), delta_path)
            atomic_save_json(metadata, self.run_dir / "erasure.json")
            for name, tensors in extras.items():
                atomic_write_bytes(save({k: v.contiguous() for k, v in tensors.items()}), paths[name])
            if self.config.export_lora:
                keep = ("base_model", "method", "target", "anchor", "kind", "trainable")
                export.write_lora(export.decompose(self.unet, delta, self.config.lora_energy), paths["lora"],
                                  metadata={k: metadata[k] for k in keep})
            self.tracking.finish(costs.write_training_record(self, paths))
            export.write_model_card(self.run_dir)
        return paths


class DocoTrainer(ErasureTrainer):
    """DoCo: concept domain correction with a PatchGAN discriminator, and the concept-preserving gradient."""

    method = "doco"

    def needs_frozen_unet(self) -> bool:
        return self.config.disc_real_source == "frozen"

    def build_extra(self) -> None:
        cfg = self.config
        # Under several processes D's BatchNorm statistics span all processes' batches, as one process's would
        # span them all; a single process keeps torch's BatchNorm2d (bit for bit as before).
        # D reads unpacked latents: 4 channels for SD v1/2/XL, 16 for SD 3.x and FLUX.1 (`models.latent_shape`).
        self.discriminator = NLayerDiscriminator(latent_shape(self.unet)[0], cfg.disc_channels, cfg.disc_layers,
                                                 cfg.disc_norm, cfg.disc_final_stride,
                                                 sync_batch_norm=self.accelerator.num_processes > 1).to(self.device)
        self.gan_loss = GANLoss(cfg.gan_mode).to(self.device)
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=cfg.disc_lr, betas=(cfg.disc_beta1, 0.999))
        # Only D's optimizer goes through accelerate (its GradScaler under fp16). D itself is not wrapped in DDP,
        # which copes badly with two forward passes per backward and with autograd.grad through D for the
        # generator term: every process initialises D alike (seeded) and D's gradients are averaged by hand.
        self.opt_d = self.accelerator.prepare(self.opt_d)
        self.joint = self._joint_pass()

    def _joint_pass(self) -> SplitLinearGradients | None:
        """One UNet pass for L_u and L_r together where their gradients can be told apart afterwards (trained
        bias-free linear layers, e.g. the K/V default; not with recomputed or compiled forward passes)."""
        if self.gradient_checkpointing or self.config.compile_unet:
            return None
        linears = bias_free_linears(self.unet, self.params)
        return SplitLinearGradients(linears) if linears else None

    def extra_state(self) -> dict:
        """D (its BatchNorm running statistics the same in every process), D's optimizer, and under fp16 its
        loss scaler."""
        state = {"discriminator": self.discriminator.state_dict(), "opt_d": self.opt_d.state_dict()}
        if self.accelerator.scaler is not None:
            state["scaler"] = self.accelerator.scaler.state_dict()
        return state

    def load_extra_state(self, state: dict) -> None:
        self.discriminator.load_state_dict(state["discriminator"])
        self.opt_d.load_state_dict(state["opt_d"])
        if self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])

    def _disc_view(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What D sees of a UNet output: the noise ε it stands for (`disc_input: eps`) or the clean latent x0."""
        if self.config.disc_input == "x0":
            return self.parameterization.x0(prediction.float(), x_t, t)
        return self.parameterization.eps(prediction.float(), x_t, t)

    def _discriminate(self, view: torch.Tensor) -> torch.Tensor:
        """D's logits in float32, D run under the mixed precision of the run."""
        with self.accelerator.autocast():
            return self.discriminator(view).float()


    def train_step(self) -> dict:
        cfg = self.config
        adversarial = self.step >= cfg.warmup_iterations
        accumulate = cfg.gradient_accumulation_steps
        g_u_sum = g_r_sum = None
        logs = {"d_loss": 0.0, "d_acc": 0.0}
        if adversarial:
            logs.update(g_loss=0.0, retain_loss=0.0)
        logs.update(self.refresh_adversarial_prompts())
        self.opt_d.zero_grad(set_to_none=True)
        for _ in range(accumulate):
            index = self._sample_index()
            x_t, t, target, c, c_star = self._batch(index, self.generator)
            self.unet.train(adversarial)
            retain_prediction = None
            if not adversarial:
                with torch.no_grad(), self.accelerator.autocast():
                    fake = denoiser_output(self.unet, x_t, t, c_star)
            else:
                # L_r's batch: the anchor batch first (sharing x_t and t with the target's), then preservation.
                x_r, t_r, target_r, c_r = self._retain_batch(x_t, t, target, c)
                fake, retain_prediction = self._generator_predictions(x_t, t, c_star, x_r, t_r, c_r)
            real = self._real_prediction(x_t, t, c, retain_prediction)
            if adversarial:
                # Generator term of eq. 8 with the current D: make the target prediction look like the anchor's.
                g_loss = self.gan_loss(self._discriminate(self._disc_view(fake, x_t, t)), True)
                retain_loss = F.mse_loss(retain_prediction.float(), target_r)
                g_u, g_r = self._grads_for_mode(g_loss, retain_loss, len(x_t))
                g_u_sum = g_u if g_u_sum is None else [a + b for a, b in zip(g_u_sum, g_u)]
                if g_r is not None:
                    g_r_sum = g_r if g_r_sum is None else [a + b for a, b in zip(g_r_sum, g_r)]
                logs["g_loss"] += g_loss.item() / accumulate
                logs["retain_loss"] += retain_loss.item() / accumulate
            d_real = self._discriminate(self._disc_view(real.detach(), x_t, t))
            d_fake = self._discriminate(self._disc_view(fake.detach(), x_t, t))
            d_loss = 0.5 * (self.gan_loss(d_real, True) + self.gan_loss(d_fake, False))
            self.accelerator.backward(d_loss / accumulate)
            logs["d_loss"] += d_loss.item() / accumulate
            logs["d_acc"] += 0.5 * ((d_real > 0).float().mean() + (d_fake < 0).float().mean()).item() / accumulate
        self.check_finite(logs)
        d_params = list(self.discriminator.parameters())
        for p, g in zip(d_params, self.reduce([p.grad for p in d_params])):
            p.grad = g
        self.opt_d.step()
        if adversarial:
            logs.update(self._apply_generator_update(g_u_sum, g_r_sum, accumulate))
        return self.record_step("adversarial" if adversarial else "warmup", logs)

    def memory_trial(self) -> tuple[int, str]:
        """The first adversarial iteration: its UNet backward pass and the Adam state it creates make it the largest
        in memory, and the warm-up before it is lighter."""
        first = max(self.step, self.config.warmup_iterations)
        return first, f"the adversarial phase (from iteration {first + 1})"

    def set_gradient_checkpointing(self, on: bool) -> None:
        super().set_gradient_checkpointing(on)
        self.joint = self._joint_pass()

    def _real_prediction(self, x_t, t, c, retain_prediction) -> torch.Tensor:
        """D's "real" sample: the frozen original's prediction for the anchor prompt, or the trained UNet's."""
        if self.config.disc_real_source == "frozen":
            with self.accelerator.autocast():
                return self.original_output(x_t, t, c)
        if retain_prediction is not None:
            return retain_prediction[: len(x_t)]
        with torch.no_grad(), self.accelerator.autocast():
            return denoiser_output(self.unet, x_t, t, c)

    def _generator_predictions(self, x_t, t, c_star, x_r, t_r, c_r):
        """The trained UNet's predictions for the target batch (L_u) and the retaining batch (L_r): one pass over
        both when G_u and G_r can be split afterwards, else a pass each, so that each backward pass runs through
        its own part of the work only."""
        if self.joint is not None:
            with self.joint.recording(), self.accelerator.autocast():
                both = denoiser_output(self.unet, torch.cat([x_t, x_r]), torch.cat([t, t_r]), torch.cat([c_star, c_r]))
            return both[: len(x_t)], both[len(x_t):]
        with self.accelerator.autocast():
            fake = denoiser_output(self.unet, x_t, t, c_star)
        with torch.set_grad_enabled(self.config.retain_mode != "none"), self.accelerator.autocast():
            return fake, denoiser_output(self.unet, x_r, t_r, c_r)

    def _grads_for_mode(self, g_loss, retain_loss, split: int):
        """(G_u, G_r) for cp and rgd; (the one gradient, None) for none and l2."""
        mode = self.config.retain_mode
        if self.joint is not None:
            total = g_loss if mode == "none" else g_loss + self.config.retain_weight * retain_loss
            g_u, g_r = (self._unscaled(g) for g in self.joint.gradients(self._scaled(total), split))
            if mode in ("none", "l2"):
                return ([u + r for u, r in zip(g_u, g_r)] if mode == "l2" else g_u), None
            return g_u, g_r
        if mode == "none":
            return self._grads(g_loss, retain_graph=False), None
        if mode == "l2":
            return self._grads(g_loss + self.config.retain_weight * retain_loss, retain_graph=False), None
        # L_u and L_r come from separate forward passes, so neither backward needs the other's graph kept.
        return self._grads(g_loss, retain_graph=False), self._grads(self.config.retain_weight * retain_loss, False)

    def _apply_generator_update(self, g_u, g_r, accumulate: int) -> dict:
        cfg = self.config
        g_u = self.reduce([g / accumulate for g in g_u])
        stats = {}
        if g_r is not None:
            g_r = self.reduce([g / accumulate for g in g_r])
            g_u, g_r = self._clip(g_u), self._clip(g_r)
            if cfg.retain_mode == "rgd":  # RGD's restricted gradient in place of eq. 9
                update, surgery = restricted_gradient(g_u, g_r, cfg.rgd_alpha)
            else:
                update, surgery = concept_preserving_gradient(g_u, g_r, cfg.surgery_lambda, cfg.surgery_scope,
                                                              cfg.projection)
            if cfg.add_retain_grad:
                update = [u + r for u, r in zip(update, g_r)]
            stats = {"cosine": surgery.cosine.item(), "fired": surgery.fired.item()}
        else:
            update = self._clip(g_u)
        self.apply_update(update)
        return stats

    def extra_exports(self) -> dict[str, dict[str, torch.Tensor]]:
        """The discriminator, exported beside the erased UNet and delta."""
        return {"discriminator": self.discriminator.state_dict()}

    # ---------------------------------------------------------------- discriminator diagnostics
    @torch.no_grad()
    def discriminator_accuracy(self, n_buckets: int = 10, seed: int = 1234) -> list[dict]:
        """Held-out accuracy of D (anchor vs target predictions) per timestep bucket."""
        self.discriminator.eval()
        generator = torch.Generator().manual_seed(seed)
        prompts = self.prompt_index[self.heldout_index]
        c, c_star = self.anchor_embeddings[prompts], self.target_embeddings[prompts]
        frozen = self.config.disc_real_source == "frozen"
        grid = self.parameterization.timesteps  # buckets of the training grid's steps (a flow's: falling σ)
        n_steps = len(grid)
        rows = []
        for bucket in range(n_buckets):
            low, high = bucket * n_steps // n_buckets, (bucket + 1) * n_steps // n_buckets
            t = grid[torch.randint(low, high, (len(self.heldout_index),), generator=generator)].to(self.device)
            z0 = self.anchors.sample(self.heldout_index, generator).to(self.device)
            noise = torch.randn(z0.shape, generator=generator).to(self.device)
            x_t = self.parameterization.add_noise(z0, noise, t)
            with self.accelerator.autocast():  # the run's precision: its weights may be half (`weight_dtype`)
                real = (self.original_output(x_t, t, c) if frozen else denoiser_output(self.unet, x_t, t, c)).float()
                fake = denoiser_output(self.unet, x_t, t, c_star).float()
            d_real = self._discriminate(self._disc_view(real, x_t, t))
            d_fake = self._discriminate(self._disc_view(fake, x_t, t))
            accuracy = 0.5 * ((d_real > 0).float().mean() + (d_fake < 0).float().mean()).item()
            rows.append({"t_low": low, "t_high": high - 1, "accuracy": accuracy})
        self.discriminator.train()
        return rows
