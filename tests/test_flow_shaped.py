"""The flow-matching transformer families shaped with random weights (doco_lib/toy/flow_shaped.py): SD3.5-medium-,
FLUX.1-dev- and FLUX.1-schnell-shaped tiny pipelines install in a Hugging Face cache under their hub ids, load
offline by those ids, keep the published configs' structure and sample images; the full configs have the real
parameter counts (on the meta device: nothing allocated)."""

import pytest
import torch

from doco_lib.models import load_pipeline
from doco_lib.toy import flow_shaped, shaped


@pytest.fixture(scope="module")
def flow_hub(tmp_path_factory):
    return tmp_path_factory.mktemp("hub")


@pytest.fixture(scope="module")
def sd35_installed(flow_hub):
    return shaped.install_shaped("sd35", flow_hub)


@pytest.fixture(scope="module")
def flux_installed(flow_hub, tmp_path_factory):
    """Both FLUX.1 variants, through the command line that installs shaped pipelines."""
    assert shaped.main(["flux-dev", "flux-schnell", "--hub-cache", str(flow_hub)]) == 0
    return flow_hub


@pytest.fixture
def offline(flow_hub, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(flow_hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _sample(pipe, **kwargs):
    return pipe("a photo of Snoopy on a beach", num_inference_steps=2, height=64, width=64,
                generator=torch.Generator().manual_seed(0), **kwargs).images


@pytest.mark.slow  # 15-25 s with its fixture's build
def test_sd35_shaped_pipeline_loads_by_hub_id_offline_and_samples(sd35_installed, offline, one_torch_thread):
    assert sd35_installed.parent.parent.name == "models--stabilityai--stable-diffusion-3.5-medium"
    pipe = load_pipeline(flow_shaped.SD35_ID, "cpu")
    transformer, vae = pipe.transformer.config, pipe.vae.config
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and type(pipe.transformer).__name__ == "SD3Transformer2DModel"
    # SD3.5 medium's structure: 2×2 patches of 16 channels, 384² positions, dual attention in the first blocks, RMS
    # q/k norms; the caption projection as wide as the joint stream.
    assert transformer.patch_size == 2 and transformer.in_channels == transformer.out_channels == 16
    assert transformer.sample_size == 128 and pipe.vae_scale_factor * transformer.sample_size == 1024
    assert transformer.pos_embed_max_size == 384 and transformer.qk_norm == "rms_norm"
    assert tuple(transformer.dual_attention_layers) == (0, 1) and transformer.num_layers == 4
    assert transformer.caption_projection_dim == transformer.num_attention_heads * transformer.attention_head_dim
    assert vae.latent_channels == 16 and vae.scaling_factor == 1.5305 and vae.shift_factor == 0.0609
    assert not vae.use_quant_conv and not vae.use_post_quant_conv and pipe.vae_scale_factor == 8
    # Three encoders: the CLIPs' pooled projections join into the pooled conditioning, their states (zero-padded
    # to T5's width) and T5's into the joint text stream.
    encoders = (pipe.text_encoder.config, pipe.text_encoder_2.config, pipe.text_encoder_3.config)
    assert [type(e).__name__ for e in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3)] == [
        "CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel"]
    assert transformer.pooled_projection_dim == encoders[0].projection_dim + encoders[1].projection_dim
    assert transformer.joint_attention_dim == encoders[2].d_model > encoders[0].hidden_size + encoders[1].hidden_size
    assert encoders[1].num_hidden_layers == 32 and encoders[2].feed_forward_proj == "gated-gelu"
    assert pipe.tokenizer_2.pad_token == "!" and len(pipe.tokenizer_3) == 32100
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and pipe.scheduler.config.shift == 3.0
    assert not pipe.scheduler.config.use_dynamic_shifting
    full = flow_shaped.SD35_TRANSFORMER  # the full config's widths fit together the same way
    assert full["pooled_projection_dim"] == flow_shaped.SD35_TEXT["projection_dim"] + flow_shaped.SD35_TEXT_2[
        "projection_dim"] == 2048
    assert full["joint_attention_dim"] == flow_shaped.SD35_TEXT_3["d_model"] == 4096
    assert full["caption_projection_dim"] == full["num_attention_heads"] * full["attention_head_dim"] == 1536

    assert _sample(pipe, output_type="latent").shape == (1, 16, 8, 8)
    images = _sample(pipe, output_type="np")
    assert images.shape == (1, 64, 64, 3) and 0 <= images.min() and images.max() <= 1


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_flux_shaped_pipeline_loads_by_hub_id_offline_and_samples(variant, flux_installed, offline,
                                                                  one_torch_thread):
    pipe = load_pipeline(flow_shaped.FLUX_IDS[variant], "cpu")
    transformer, vae, scheduler = pipe.transformer.config, pipe.vae.config, pipe.scheduler.config
    assert type(pipe).__name__ == "FluxPipeline" and type(pipe.transformer).__name__ == "FluxTransformer2DModel"
    # FLUX.1's structure: 16 latent channels packed 2×2 into 64, double- then single-stream blocks, rotary axes
    # (16, 56, 56) of a 128-d head scaled to (4, 14, 14) of 32; the guidance embedding on dev only.
    assert transformer.patch_size == 1 and transformer.in_channels == 4 * vae.latent_channels == 64
    assert (transformer.num_layers, transformer.num_single_layers) == (2, 4)
    assert sum(transformer.axes_dims_rope) == transformer.attention_head_dim
    assert tuple(transformer.axes_dims_rope) == tuple(d // 4 for d in flow_shaped.FLUX_TRANSFORMER["axes_dims_rope"])
    assert transformer.guidance_embeds == (variant == "dev")
    assert vae.scaling_factor == 0.3611 and vae.shift_factor == 0.1159 and pipe.vae_scale_factor == 8
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel" and type(pipe.text_encoder_2).__name__ == "T5EncoderModel"
    assert transformer.pooled_projection_dim == pipe.text_encoder.config.hidden_size  # CLIP-L's pooled output
    assert transformer.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert pipe.tokenizer.model_max_length == 77 and pipe.tokenizer_2.model_max_length == 512
    assert scheduler.use_dynamic_shifting == (variant == "dev")
    assert scheduler.shift == (3.0 if variant == "dev" else 1.0)
    if variant == "dev":
        assert (scheduler.base_shift, scheduler.max_shift) == (0.5, 1.15)
    full = flow_shaped.FLUX_TRANSFORMER
    assert sum(full["axes_dims_rope"]) == full["attention_head_dim"] == 128
    assert full["pooled_projection_dim"] == flow_shaped.FLUX_TEXT["hidden_size"] == 768

    assert _sample(pipe, output_type="latent").shape == (1, 16, 64)  # 4×4 packed tokens of 2×2×16 latents
    images = _sample(pipe, output_type="np", guidance_scale=3.5 if variant == "dev" else 0.0)
    assert images.shape == (1, 64, 64, 3) and 0 <= images.min() and images.max() <= 1


def test_t5_tokenizer_has_t5s_layout_and_loads_offline(tmp_path):
    from transformers import AutoTokenizer

    flow_shaped.t5_tokenizer().save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert type(tokenizer).__name__ == "T5Tokenizer" and len(tokenizer) == 32100
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_99>"]) == [32099, 32000]
    ids = tokenizer("a photo of a dog on the beach", padding="max_length", max_length=16).input_ids
    assert ids[ids.index(1) + 1:] == [0] * (15 - ids.index(1)) and 2 not in ids  # ends with </s>, then pads
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of a dog on the beach"


def test_full_configs_have_the_real_parameter_counts():
    """The full pipelines build on the meta device (nothing allocated): SD3.5 medium's MMDiT-X has 2.24B
    parameters, 2.47B with its 384² positional grid (a buffer its checkpoint stores: the published 2.5B);
    FLUX.1-dev's transformer 11.9B, schnell's 10.2M fewer (no guidance embedding); T5 v1.1 XXL's encoder 4.76B,
    CLIP-L's text tower 123M (124M with SD3's projection), OpenCLIP bigG's 695M, the 16-channel VAE 84M."""
    def counts(pipe):
        return {name: sum(p.numel() for p in module.parameters()) for name, module in pipe.components.items()
                if isinstance(module, torch.nn.Module)}

    sd35 = flow_shaped.make_sd35_pipeline("full", device="meta")
    assert counts(sd35) == {"transformer": 2_243_171_520, "vae": 83_819_683, "text_encoder": 123_650_304,
                            "text_encoder_2": 694_659_840, "text_encoder_3": 4_762_310_656}
    assert sum(t.numel() for t in sd35.transformer.state_dict().values()) == 2_469_663_936
    assert sd35.transformer.pos_embed.pos_embed.shape == (1, 384 * 384, 1536)
    dev = flow_shaped.make_flux_pipeline("full", "dev", device="meta")
    assert counts(dev) == {"transformer": 11_901_408_320, "vae": 83_819_683, "text_encoder": 123_060_480,
                           "text_encoder_2": 4_762_310_656}
    schnell = flow_shaped.make_flux_transformer("full", "schnell", device="meta")
    assert sum(p.numel() for p in schnell.parameters()) == 11_891_178_560


def test_unknown_family_and_variant_are_refused(tmp_path):
    with pytest.raises(ValueError, match="flux-dev"):
        shaped.install_shaped("flux-pro", tmp_path)
    with pytest.raises(ValueError, match="'dev' or 'schnell'"):
        flow_shaped.make_flux_transformer("tiny", "pro", device="meta")
    with pytest.raises(ValueError, match="'tiny' or 'full'"):
        flow_shaped.make_sd35_transformer("small", device="meta")


def test_pipelines_are_built_in_the_dtype_asked_and_the_default_dtype_is_restored():
    """A full FLUX.1 is built in bfloat16 on a GPU (the rehearsal): every weight in that dtype from the start."""
    pipe = flow_shaped.make_flux_pipeline("full", "dev", device="meta", dtype=torch.bfloat16)
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in pipe.text_encoder_2.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32
    assert flow_shaped.make_sd35_pipeline("full", device="meta").transformer.dtype == torch.float32
