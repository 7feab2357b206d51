"""Loading Stable Diffusion pipelines (real or toy) and the toy judge, with clear offline errors."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import torch

from doco_lib.errors import ModelLoadError, ParamsError
from doco_lib.toy import TOY_BUILD_FLAGS, TOY_PIPELINES, toy_weights_dir
from doco_lib.toy.models import ToyJudge

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
TOY = "toy"


def is_toy(model: str) -> bool:
    """Whether `model` names a toy world (judged by the toy judge)."""
    return model in TOY_PIPELINES


def resolve_model(model: str) -> str:
    """'toy' / 'toy-wide' / 'toy-mmdit' → the shipped toy pipeline folder; a local folder stays a path; anything
    else is a hub id."""
    if is_toy(model):
        folder = toy_weights_dir() / TOY_PIPELINES[model]
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(f"The toy pipeline {model!r} is missing from {folder}. It ships with the "
                                    f"repository; rebuild it with `doco toy build{TOY_BUILD_FLAGS[model]}` if you "
                                    "removed it.")
        return str(folder)
    return model


def check_model_reference(model: str, key: str = "model") -> None:
    """Fail fast, before any loading, on a model reference that cannot work."""
    if is_toy(model):
        return
    path = Path(model)
    looks_local = path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1
    if looks_local:
        if not path.is_dir():
            raise ParamsError(f"{key}: {model!r} is not a folder (expected 'toy', a diffusers pipeline folder "
                              "containing model_index.json, or a hub id such as 'CompVis/stable-diffusion-v1-4').")
        if not (path / "model_index.json").is_file():
            raise ParamsError(f"{key}: {model!r} has no model_index.json, so it is not a diffusers pipeline "
                              "folder (save one with StableDiffusionPipeline.save_pretrained).")
    elif not HUB_ID.fullmatch(model):
        raise ParamsError(f"{key}: {model!r} is neither a local folder nor a hub id of the form 'org/name'.")


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} was asked for but CUDA is not available on this machine.")
    return torch.device(device)


PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def check_safetensors_only(folder: str | Path, trust_pickle: bool = False) -> None:
    """Refuse a weights folder that holds only pickle files: unpickling runs arbitrary code."""
    folder = Path(folder)
    if trust_pickle or not folder.is_dir() or any(folder.rglob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(f"{folder} holds only pickle weights ({', '.join(pickles[:3])}); they can run arbitrary "
                             "code when loaded, so only safetensors are read. Convert them (load once in a trusted "
                             "session and save_pretrained(..., safe_serialization=True)), or pass --trust-pickle.")


def half_dtype(kind: str = "unet") -> torch.dtype:
    """The half precision a GPU runs a denoiser `kind` ('unet' or 'mmdit') in: float16 for the UNets, as SD's own
    releases sample; bfloat16 for the MMDiTs, whose transformers and T5 encoders overflow float16 (SD 3.5's and
    FLUX.1's model cards load them in bfloat16), on GPUs with native bfloat16 (float16 on older ones)."""
    if kind == "mmdit" and torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    return torch.float16


def sampling_dtype(device: torch.device, kind: str = "unet") -> torch.dtype:
    """Pipelines that only sample run in half precision on GPUs (`half_dtype` of their denoiser `kind`: half the
    memory, 2–4× the speed of float32), float32 elsewhere. What trains keeps float32 master weights and runs
    under autocast instead."""
    return half_dtype(kind) if device.type == "cuda" else torch.float32


def _load_error(model: str, error: OSError) -> ModelLoadError:
    return ModelLoadError(
        f"Could not load the pipeline {model!r}: {error}. Without internet access, a hub id only works if it "
        "is already in the Hugging Face cache; otherwise pass a local folder saved with save_pretrained.")


def _model_index(model: str, source: str) -> dict:
    """The model_index.json of the pipeline `model` (resolved to `source`), or a clear error offline."""
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(source)
    except OSError as error:
        raise _load_error(model, error) from None


def _index_kind(index: dict) -> str:
    """'unet' or 'mmdit': the denoiser kind a model_index.json names (a transformer component: an MMDiT)."""
    return "mmdit" if (index.get("transformer") or [None])[0] is not None else "unet"


def base_denoiser_class(model: str) -> tuple[str, type]:
    """(pipeline component, model class) of the denoiser the pipeline `model` names in its model_index.json: ("unet",
    UNet2DConditionModel) or ("transformer", SD3Transformer2DModel or FluxTransformer2DModel)."""
    import diffusers

    index = _model_index(model, resolve_model(model))
    component = "transformer" if _index_kind(index) == "mmdit" else "unet"
    return component, getattr(diffusers, index[component][1])


def pipeline_kind(model: str) -> str:
    """'unet' or 'mmdit': the denoiser kind of the pipeline `model` names ('toy', a folder or a hub id), from its
    model_index.json alone."""
    return _index_kind(_model_index(model, resolve_model(model)))


def load_pipeline(model: str = TOY, device: str = "auto", dtype: torch.dtype | str = "auto", unet: str | None = None,
                  trust_pickle: bool = False, compile_unet: bool = False):
    """The pipeline class its model_index.json names (`StableDiffusionPipeline` for SD v1 and 2.x,
    `StableDiffusionXLPipeline` for SDXL, `StableDiffusion3Pipeline`, `FluxPipeline`), without safety checker;
    `unet` swaps in an erased denoiser folder (a UNet, or the transformer of an SD 3.x or FLUX.1 pipeline). `dtype`
    "auto": `sampling_dtype` of the device and the model's kind; pass torch.float32 for a pipeline whose denoiser
    will be trained. A half-precision pipeline on a GPU (one that only samples) keeps its denoiser and VAE in
    channels-last layout, which the GPU's convolution kernels read fastest; `compile_unet` also compiles its UNet
    (torch.compile: the first batch waits for the compilation, the later ones run faster).

    Weights are read from safetensors only, unless `trust_pickle`."""
    from diffusers import DDIMScheduler, DiffusionPipeline

    check_model_reference(model)
    target_device = pick_device(device)  # fail on a missing GPU before loading gigabytes
    source = resolve_model(model)
    index = _model_index(model, source)
    if dtype == "auto":
        dtype = sampling_dtype(target_device, _index_kind(index))
    if target_device.type == "cuda":  # TF32 matmuls and convolutions for whatever still runs in float32
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    for folder in (source, unet):
        if folder is not None:
            check_safetensors_only(folder, trust_pickle)
    safetensors = None if trust_pickle else True
    kwargs = dict(dtype=dtype, use_safetensors=safetensors)
    if unet is not None:
        try:
            component, model_class = denoiser_class(unet)
            kwargs[component] = model_class.from_pretrained(unet, dtype=dtype, use_safetensors=safetensors)
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"the UNet folder {unet!r} could not be loaded ({str(error).splitlines()[0]}); it "
                                 "is damaged or not a diffusers UNet: export it again or delete it.") from None
    if "safety_checker" in index:  # SD v1 and 2.x have one; SDXL has none
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    # components saved as absent (SD 3 without T5: text_encoder_3 [null, null]) must be passed as None
    kwargs.update({name: None for name, value in index.items() if value == [None, None]})
    try:
        pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
    except OSError as error:
        raise _load_error(model, error) from None
    if is_toy(model) and getattr(pipe, "unet", None) is not None:  # the UNet toys sample with DDIM
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    else:  # decode one image at a time: a batch of 512-px decodes at once takes gigabytes
        pipe.vae.enable_slicing()
    pipe.set_progress_bar_config(disable=True)
    pipe.to(target_device)
    if target_device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        denoiser(pipe).to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if compile_unet:
        denoiser(pipe).compile()
    return pipe


# ---------------------------------------------------------------------------------------------- the denoiser
# The pipeline component that denoises: SD v1, 2.x and SDXL have a `unet`, SD 3.x and FLUX.1 a `transformer`. The
# harness trains whichever `denoiser(pipe)` returns; `denoiser_output` calls it with an `encode_prompts`
# conditioning, so that no method needs to know which family it trains.
DENOISER_COMPONENTS = ("unet", "transformer")
# FluxPipeline's `default_sample_size`: 128×128 latents (1024 px); its transformer config has no sample size.
FLUX_LATENT_SIZE = 128
# The distilled guidance FLUX.1-dev's transformer is conditioned on in training: the Flux pipeline's default
# guidance_scale and diffusers' train_dreambooth_flux.py's --guidance_scale.
FLUX_TRAINING_GUIDANCE = 3.5


def denoiser_component(pipe) -> str:
    """'unet' or 'transformer': the name of `pipe`'s denoising component."""
    for name in DENOISER_COMPONENTS:
        if getattr(pipe, name, None) is not None:
            return name
    raise ModelLoadError(f"{type(pipe).__name__} has neither a UNet nor a transformer to train.")


def denoiser(pipe) -> torch.nn.Module:
    """`pipe`'s denoiser: its UNet (SD v1, 2.x, SDXL) or its MMDiT transformer (SD 3.x, FLUX.1)."""
    return getattr(pipe, denoiser_component(pipe))


def denoiser_family(model) -> str:
    """'unet', 'sd3' (`SD3Transformer2DModel`) or 'flux' (`FluxTransformer2DModel`): how `model` is called."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    if isinstance(model, SD3Transformer2DModel):
        return "sd3"
    if isinstance(model, FluxTransformer2DModel):
        return "flux"
    return "unet"


def denoiser_kind(model) -> str:
    """'unet', or 'mmdit' for either transformer family: the key of the tables that treat SD 3.x and FLUX.1 alike."""
    return "unet" if denoiser_family(model) == "unet" else "mmdit"


def latent_shape(model) -> tuple[int, int]:
    """(channels, side) of the square latents the denoiser `model` draws at its native size, unpacked: SD v1's
    (4, 64), SDXL's (4, 128), SD 3.5's (16, 128), FLUX.1's (16, 128) (its 64 input channels are 2×2 patches of 16)."""
    if denoiser_family(model) == "flux":  # its config names no sample size, unless one was registered (a rehearsal's)
        return model.config.in_channels // 4, model.config.get("sample_size", FLUX_LATENT_SIZE)
    return model.config.in_channels, model.config.sample_size


def denoiser_class(folder: str) -> tuple[str, type]:
    """(pipeline component, model class) of a saved denoiser folder, by the class its config.json names."""
    import json

    import diffusers

    name = json.loads((Path(folder) / "config.json").read_text()).get("_class_name", "UNet2DConditionModel")
    component = "transformer" if name in ("SD3Transformer2DModel", "FluxTransformer2DModel") else "unet"
    return component, getattr(diffusers, name)


# ---------------------------------------------------------------------------------------------- conditioning
# SDXL's `time_ids`: original size (h, w), crop corner (top, left), target size (h, w).
TIME_IDS = 6


def text_encoders(pipe) -> list:
    """The pipeline's text encoders: one for SD v1 and 2.x, two for SDXL and FLUX.1, three for SD 3.x."""
    return [encoder for encoder in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None),
                                    getattr(pipe, "text_encoder_3", None)) if encoder is not None]


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
    """What the UNet reads of each prompt, as one float32 tensor (len(prompts), rows, width) for every model
    family, computed as the pipeline's `encode_prompt` computes it when it samples (prompts padded to the
    tokenizer's 77 positions), on the encoders' device; any object with the pipeline's encoders and tokenizers
    will do.

    SD v1 and 2.x: the text encoder's last hidden states (77 rows of 768 or 1024). SDXL: the penultimate hidden
    states of both encoders concatenated (77 rows of 768 + 1280 = 2048), then what its UNet reads through
    `added_cond_kwargs`: the second encoder's pooled embedding (`text_embeds`, 1280) and `time_ids` = (H, W, 0, 0,
    H, W) for the UNet's native size in pixels, packed zero-padded into one more row. One tensor per prompt keeps
    caching, indexing, concatenating and casting conditionings the same code for every family; `unet_inputs`
    unpacks it.

    SD 3.x and FLUX.1: the pipeline's own `encode_prompt` (SD 3.x: the CLIP states zero-padded to T5's width and
    joined with 256 T5 rows, FLUX.1: 512 T5 rows), with the pooled CLIP embedding packed as zero-padded rows in the
    same way; `denoiser_output` unpacks it."""
    if getattr(pipe, "transformer", None) is not None:
        return _encode_with_pipeline(pipe, prompts, batch_size)
    encoders = text_encoders(pipe)
    tokenizers = [pipe.tokenizer, getattr(pipe, "tokenizer_2", None)][:len(encoders)]
    chunks = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        states, pooled = [], None
        for tokenizer, encoder in zip(tokenizers, encoders):
            ids = tokenizer(chunk, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(encoder.device)
            if len(encoders) == 1:
                states.append(encoder(ids)[0])
                continue
            out = encoder(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]  # the second encoder's projected pooled embedding
        hidden = torch.cat([s.to(encoders[0].device) for s in states], dim=-1).float()
        if pooled is not None:
            size = pipe.unet.config.sample_size * pipe.vae_scale_factor
            time_ids = torch.tensor([size, size, 0, 0, size, size], dtype=torch.float32, device=hidden.device)
            hidden = pack_conditioning(hidden, pooled.float().to(hidden.device), time_ids.expand(len(hidden), TIME_IDS))
        chunks.append(hidden)
    return torch.cat(chunks)


def text_call_kwargs(pipe) -> dict:
    """What every prompt-encoding call of `pipe` passes besides the prompts: for an SD 3.x pipeline saved without
    T5 ('toy-mmdit'), `max_sequence_length` equal to its CLIP rows. Its T5 slot holds zeros, 256 rows of them by
    default (the rows a T5 prompt would have), and the transformer attends to every row: toy-mmdit reads 16 CLIP
    and 16 zero rows instead of 272. Every other pipeline: its defaults ({})."""
    if denoiser_family(denoiser(pipe)) == "sd3" and getattr(pipe, "text_encoder_3", None) is None:
        return {"max_sequence_length": pipe.tokenizer_max_length}
    return {}


def _encode_with_pipeline(pipe, prompts: list[str], batch_size: int) -> torch.Tensor:
    """`encode_prompts` of an SD 3.x or FLUX.1 pipeline: its `encode_prompt`'s states, the pooled embedding appended."""
    device = pipe.text_encoder.device
    chunks = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        if denoiser_family(pipe.transformer) == "sd3":
            hidden, _, pooled, _ = pipe.encode_prompt(chunk, None, None, device=device,
                                                      do_classifier_free_guidance=False, **text_call_kwargs(pipe))
        else:  # the text ids it returns are zeros, rebuilt by `denoiser_output`
            hidden, pooled, _ = pipe.encode_prompt(chunk, None, device=device)
        chunks.append(append_rows(hidden.float(), pooled.float().to(hidden.device)))
    return torch.cat(chunks)


def unconditional_conditioning(pipe) -> torch.Tensor:
    """The conditioning classifier-free guidance contrasts with, (1, rows, width): the empty prompt's, or zeros
    (SDXL's time_ids kept) for a pipeline that zeroes it (SDXL's `force_zeros_for_empty_prompt`)."""
    empty = encode_prompts(pipe, [""])
    if not getattr(getattr(pipe, "config", None), "force_zeros_for_empty_prompt", False):
        return empty
    inputs = unet_inputs(pipe.unet, empty)
    return pack_conditioning(torch.zeros_like(inputs["encoder_hidden_states"]),
                 torch.zeros_like(inputs["added_cond_kwargs"]["text_embeds"]), inputs["added_cond_kwargs"]["time_ids"])


def pack_conditioning(hidden: torch.Tensor, text_embeds: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """SDXL's hidden states (B, 77, d) with [text_embeds, time_ids] appended as ⌈(p + 6)/d⌉ zero-padded rows: the
    `encode_prompts` form of a conditioning, which `unet_inputs` unpacks."""
    return append_rows(hidden, torch.cat([text_embeds, time_ids], dim=-1))


def append_rows(hidden: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    """Hidden states (B, L, d) with the vectors `extra` (B, p) appended as ⌈p/d⌉ zero-padded rows."""
    width = hidden.shape[-1]
    rows = -(-extra.shape[-1] // width)
    extra = torch.nn.functional.pad(extra, (0, rows * width - extra.shape[-1]))
    return torch.cat([hidden, extra.view(len(hidden), rows, width)], dim=1)


def unet_inputs(unet, conditioning: torch.Tensor) -> dict:
    """The UNet's keyword arguments for an `encode_prompts` tensor: `encoder_hidden_states`, and for a UNet with
    SDXL's `text_time` embedding also `added_cond_kwargs` = {text_embeds, time_ids}, unpacked."""
    config = unet.config
    if config.addition_embed_type is None:
        return {"encoder_hidden_states": conditioning}
    if config.addition_embed_type != "text_time":
        raise ModelLoadError(f"UNet addition_embed_type {config.addition_embed_type!r} is not supported (SD v1, SD 2.x "
                             "and SDXL's 'text_time' are).")
    pooled = config.projection_class_embeddings_input_dim - TIME_IDS * config.addition_time_embed_dim
    rows = -(-(pooled + TIME_IDS) // conditioning.shape[-1])
    extra = conditioning[:, -rows:].flatten(1)
    return {"encoder_hidden_states": conditioning[:, :-rows],
            "added_cond_kwargs": {"text_embeds": extra[:, :pooled], "time_ids": extra[:, pooled:pooled + TIME_IDS]}}


def transformer_inputs(transformer, conditioning: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An SD 3.x or FLUX.1 transformer's text inputs of an `encode_prompts` tensor: the states (B, L, d) and the
    pooled embedding (B, `pooled_projection_dim`), unpacked from its zero-padded last rows."""
    pooled_width = transformer.config.pooled_projection_dim
    rows = -(-pooled_width // conditioning.shape[-1])
    return conditioning[:, :-rows], conditioning[:, -rows:].flatten(1)[:, :pooled_width]


def denoiser_output(model, x_t: torch.Tensor, t: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
    """The denoiser's output (ε or v, as its scheduler's `prediction_type` says) for latents x_t (B, C, H, W), a
    timestep per sample (or one for all) and an `encode_prompts` conditioning, called as its pipeline calls it:
    a UNet with `unet_inputs`; an SD 3.x transformer with the states, the pooled embedding and t; a FLUX.1
    transformer with the latents packed into 2×2 patches, their position ids, the text's (zeros), t/1000 and for
    dev the distilled guidance (`FLUX_TRAINING_GUIDANCE`), its output unpacked to (B, C, H, W)."""
    family = denoiser_family(model)
    if family == "unet":
        return model(x_t, t, **unet_inputs(model, conditioning)).sample
    hidden, pooled = transformer_inputs(model, conditioning)
    t = torch.as_tensor(t, device=x_t.device).expand(len(x_t))
    if family == "sd3":
        return model(hidden_states=x_t, timestep=t, encoder_hidden_states=hidden, pooled_projections=pooled).sample
    from diffusers import FluxPipeline

    batch, channels, height, width = x_t.shape
    packed = FluxPipeline._pack_latents(x_t, batch, channels, height, width)
    image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, x_t.device, x_t.dtype)
    text_ids = torch.zeros(hidden.shape[1], 3, device=x_t.device, dtype=x_t.dtype)
    guidance = (torch.full((batch,), FLUX_TRAINING_GUIDANCE, device=x_t.device, dtype=torch.float32)
                if model.config.guidance_embeds else None)
    output = model(hidden_states=packed, timestep=t / 1000, guidance=guidance, pooled_projections=pooled,
                   encoder_hidden_states=hidden, txt_ids=text_ids, img_ids=image_ids).sample
    return FluxPipeline._unpack_latents(output, height, width, 1)


class DenoiserOutput(torch.nn.Module):
    """`denoiser_output` of a denoiser as a module's forward, so that `torch.func.functional_call` can swap its
    weights for one call (`output_with_weights`)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x_t, t, conditioning):
        return denoiser_output(self.model, x_t, t, conditioning)


def output_with_weights(model, weights: dict[str, torch.Tensor], x_t: torch.Tensor, t: torch.Tensor,
                        conditioning: torch.Tensor) -> torch.Tensor:
    """`denoiser_output(model, x_t, t, conditioning)` with the named parameters replaced by `weights` for this call
    only (`torch.func.functional_call`): the module is left as it was, every row of the batch sees the same weights,
    and gradients reach `weights`."""
    from torch.func import functional_call

    return functional_call(DenoiserOutput(model), {f"model.{name}": w for name, w in weights.items()},
                           (x_t, t, conditioning))


def load_text_encoder(model: str = TOY, device: str = "auto"):
    """Only the tokenizer and text encoder of a pipeline (what ranking words by their text embeddings needs),
    as an object with `.tokenizer` and `.text_encoder`."""
    from types import SimpleNamespace

    from transformers import CLIPTextModel, CLIPTokenizer

    check_model_reference(model)
    target_device = pick_device(device)
    source = resolve_model(model)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
        encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", use_safetensors=True,
                                                dtype=sampling_dtype(target_device))
    except OSError as error:
        raise ModelLoadError(f"Could not load the text encoder of {model!r}: {error}. Offline, a hub id only works "
                             "if it is already in the Hugging Face cache.") from None
    return SimpleNamespace(tokenizer=tokenizer, text_encoder=encoder.to(target_device).eval())


def load_judge(device: str = "auto"):
    return ToyJudge.from_pretrained(toy_weights_dir() / "judge").to(pick_device(device))


@torch.no_grad()
def concept_similarity(pipe, words: list[str], template: str = "a photo of a {}") -> pd.DataFrame:
    """How alike the text encoder encodes each word: cosine similarity of its final hidden state at the word's
    last token in `template`, centred on the mean over `words` (what the prompts share drops out). Entangled
    words move together under any edit of the cross-attention K/V weights."""
    prompts = [template.format(w) for w in words]
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    states = pipe.text_encoder(ids.to(pipe.text_encoder.device))[0].float().cpu()
    prefix = len(pipe.tokenizer(template.split("{}")[0].strip()).input_ids) - 1  # start token, no end token
    last = [prefix + len(pipe.tokenizer(w, add_special_tokens=False).input_ids) - 1 for w in words]
    vectors = torch.stack([states[i, position] for i, position in enumerate(last)])
    vectors = torch.nn.functional.normalize(vectors - vectors.mean(0), dim=-1)
    return pd.DataFrame((vectors @ vectors.T).numpy(), index=words, columns=words)
