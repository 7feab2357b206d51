"""The methods and their settings as data: what a params file may name, in one place.

The params schema (`doco_lib.config`), the harness (`doco_lib.methods.harness`) and the studies read these
tuples and tables; none of them retypes a choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

METHODS = ("doco", "esd", "conabl", "rgd", "uce", "spm")  # the harness's trainers (`doco_lib.methods.harness`)
# What `method` may name: the harness's trainers, and SepME, whose one increment `doco train` trains outside the
# harness (`doco_lib.studies.runs.train_sepme`).
TRAIN_METHODS = (*METHODS, "sepme")
UCE_CODE_VERSIONS = (2023, 2025)
SPM_ANCHOR_BATCHES = ("official", "intended")
SPM_PROMPTS = ("concept", "target_prompts")
RETAIN_MODES = ("none", "l2", "cp", "rgd")
TRAINABLE = ("cross_attention_kv", "cross_attention", "non_cross_attention", "full")
# What each `trainable` mode selects, per kind of denoiser (`models.denoiser_family`): a parameter trains when its
# name matches the first regular expression (searched, not anchored) and not the second (None: nothing excluded).
# On a UNet the text enters through cross-attention (`attn2`): its K/V read the text states (DoCo's and
# ConAbl's code, UCE), all of it is ESD-x's, everything else but the time embedding and the output convolution
# ESD-u's. An MMDiT (SD 3.x's joint blocks, FLUX.1's double-stream blocks) has no cross-attention: text and image
# tokens attend jointly, each stream with its own projections, and the text stream's `add_k_proj`/`add_v_proj`
# are what the image queries read of the text, the analogue of cross-attention K/V; with `add_q_proj`, the text
# stream's attention input, ESD-x's analogue; FLUX.1's single-stream blocks project both streams with one matrix
# and stay out of these two. ESD-u's analogue keeps out the text projections, the time/text embedding and the
# output projection.
#
# Trained parameters on the full configs (meta device; tests/test_flow_training.py checks them), weights and biases:
#   mode                  SD 3.5 medium: 24 joint blocks, 1536 wide     FLUX.1-dev: 19 double-stream, 3072 wide
#   cross_attention_kv    48 matrices, 113,319,936 (5.1%)               38 matrices, 358,729,728 (3.0%)
#   cross_attention       72 matrices, 169,979,904                      57 matrices, 538,094,592
#   non_cross_attention   2,064,829,568                                 11,330,854,912
#   full                  2,243,171,520                                 11,901,408,320
# (SDXL's UNet trains 140 K/V matrices, 340,787,200 parameters, under cross_attention_kv.)
TRAINABLE_PARAMETERS = {
    "unet": {"cross_attention_kv": (r"attn2\.to_[kv]", None), "cross_attention": (r"attn2\.", None),
             "non_cross_attention": ("", r"attn2\.|^time_embedding|^conv_out"), "full": ("", None)},
    "mmdit": {"cross_attention_kv": (r"attn\.add_[kv]_proj\.", None),
              "cross_attention": (r"attn\.add_[qkv]_proj\.", None),
              "non_cross_attention": ("", r"attn\.add_[qkv]_proj\.|^time_text_embed|^proj_out"), "full": ("", None)},
}
# Every method trains the flow-matching transformers (SD 3.x, FLUX.1) too. DoCo, ESD, ConAbl and RGD train what
# `trainable` selects above; UCE, which needs maps that read the text alone, edits the two that take it into the
# transformer (`doco_lib.methods.uce.MMDIT_MODULES`, as UCE's Flux script): the context embedder and the pooled
# projection's first layer, SD 3.5 medium 6,291,456 + 3,145,728 weights, FLUX.1-dev 12,582,912 + 2,359,296; SPM
# adapts the attention and feed-forward Linears of every block (`doco_lib.methods.spm.adapted_modules`).
# SepME's increments (`doco_lib.methods.sepme`) go on the weights that read the text embeddings themselves, per
# denoiser kind, as (include, exclude) regular expressions like the table above: a UNet's cross-attention K/V matrices
# (`cross_attention_kv`'s); on an MMDiT the context embedder's weight alone, the only map that reads the encoders'
# token rows before any block has mixed them with the image (SD 3.5 medium: 1536 × 4096 = 6,291,456 weights, FLUX.1-dev:
# 3072 × 4096 = 12,582,912); the pooled projection is left as it is.
SEPME_PARAMETERS = {"unet": TRAINABLE_PARAMETERS["unet"]["cross_attention_kv"],
                    "mmdit": (r"^context_embedder\.weight$", None)}
OPTIMIZERS = ("adam", "adam_fused", "adam_8bit")
CONABL_VARIANTS = ("model", "noise")

FIDELITY_PRESETS = {
    # The paper's text: D on predicted noise, "real" = the trained UNet on the anchor prompt, eq. 9 with
    # global dot products, no gradient clipping, the plain diffusion loss as L_r.
    "paper": dict(disc_input="eps", disc_real_source="trained", surgery_scope="global", projection="exact",
                  add_retain_grad=False, disc_layers=5, disc_final_stride=2, disc_norm="batch",
                  disc_beta1=0.9, retain_weight=1.0, max_grad_norm=0.0),
    # The authors' code (yongliang-wu/DoCo): D on predicted x0, "real" = a frozen original UNet, surgery
    # per parameter tensor with its cos·unit(G_r) update after clipping both gradients to norm 1,
    # L_r weighted 0.1·prior_loss_weight, D with BatchNorm and Adam betas (0.5, 0.999).
    "official": dict(disc_input="x0", disc_real_source="frozen", surgery_scope="per_tensor", projection="official",
                     add_retain_grad=False, disc_layers=5, disc_final_stride=1, disc_norm="batch",
                     disc_beta1=0.5, retain_weight=0.1, max_grad_norm=1.0),
}

# The comparison's rows (notebooks 05 and 07): a name and the keys it sets on top of the params file.
VARIANTS = {
    "DoCo (none)": {"method": "doco", "retain_mode": "none"},
    "DoCo (l2)": {"method": "doco", "retain_mode": "l2"},
    "DoCo (cp)": {"method": "doco", "retain_mode": "cp"},
    "DoCo (rgd)": {"method": "doco", "retain_mode": "rgd"},
    "ESD-x": {"method": "esd", "trainable": "cross_attention"},
    "ESD-u": {"method": "esd", "trainable": "non_cross_attention"},
    "ConAbl": {"method": "conabl", "conabl_variant": "model"},
    "RGD": {"method": "rgd", "trainable": "full"},
    "UCE": {"method": "uce", "trainable": "cross_attention_kv"},
    "SPM": {"method": "spm"},
    # Robust erasures: adversarial prompts in the loop, an inner attack every 20 iterations (AdvUnlearn's rate).
    "DoCo (cp) + adv prompts": {"method": "doco", "retain_mode": "cp", "adv_prompt_every": 20},
    "ESD-x + adv prompts": {"method": "esd", "trainable": "cross_attention", "adv_prompt_every": 20},
}
# The methods that train with adversarial prompts (`adv_prompt_every`, doco_lib/methods/adversarial_prompts.py).
ADV_PROMPT_METHODS = ("doco", "esd")
# Not a harness method: the target's SepME increment (doco_lib/studies/sepme_study.py), on `sepme_model`.
SEPME = "SepME"


@dataclass(frozen=True)
class RecipeValue:
    """A setting whose schema default is the toy world's and differs from a method's recipe on a real model."""

    key: str
    value: Any  # the recipe's value (toy data: what to give instead, in `source`)
    source: str  # where the value comes from, as the message names it
    methods: tuple[str, ...] = ()  # the methods that read the key; (): every run, whatever it trains
    toy_data: bool = False  # the default is toy-world data (a file, the toy shapes, a toy network): refused


# Gradient-trained on the DoCo paper's SD schedule (params/sd14_paper.yaml gives it to every method on SD alike).
_PAPER_SCHEDULE = ("doco", "esd", "conabl", "rgd")
_SPM_CODE = "SPM's code (configs/snoopy)"

# The toy-vs-recipe table: on a real model (not `models.is_toy`), `doco_lib.config.check_real_model_defaults`
# compares every key a run reads against it where params are loaded. Hyper-parameters left at the toy default
# warn (`ToyDefaultsWarning`): the run is still the method on the user's concept, with other settings. Toy data
# stops the run (`ParamsError`) whoever set it: RGD would forget the toy "star", UCE preserve the toy shapes, the
# evaluation score SD images with the toy CLIP and judge, so no number would be about the user's concept.
REAL_MODEL_RECIPE = (
    RecipeValue("lr", 4e-6, "paper (section 4.1, params/sd14_paper.yaml)", _PAPER_SCHEDULE),
    RecipeValue("iterations", 1000, "paper", _PAPER_SCHEDULE),
    RecipeValue("warmup_iterations", 200, "paper", ("doco",)),
    RecipeValue("n_anchor_images", 1000, "paper", ("doco",)),
    RecipeValue("disc_layers", 5, "the fidelity presets' D on 64×64 latents (disc_layers: null)", ("doco",)),
    RecipeValue("lr", 1e-4, _SPM_CODE, ("spm",)),
    RecipeValue("iterations", 3000, _SPM_CODE, ("spm",)),
    RecipeValue("batch_size", 1, _SPM_CODE, ("spm",)),
    RecipeValue("max_grad_norm", 0.0, _SPM_CODE, ("spm",)),  # no clipping
    RecipeValue("spm_alpha", 1.0, _SPM_CODE, ("spm",)),
    RecipeValue("spm_anchor_strength", 1000.0, _SPM_CODE, ("spm",)),
    RecipeValue("spm_prompts", "concept", _SPM_CODE, ("spm",)),
    RecipeValue("spm_denoising_steps", 30, _SPM_CODE, ("spm",)),
    RecipeValue("spm_lr_warmup", 500, _SPM_CODE, ("spm",)),
    RecipeValue("spm_lr_cycles", 3, _SPM_CODE, ("spm",)),
    RecipeValue("esd_steps", 50, "ESD's code", ("esd",)),
    RecipeValue("images_per_template", 10, "paper"),
    RecipeValue("rgd_slots_file", None, "slots naming the target, as params/prompts/rgd_nudity_slots.yaml does for "
                "nudity", ("rgd",), toy_data=True),
    RecipeValue("uce_preserve", [], "UCE's code for objects: [] (params/concepts/sd14_snoopy_uce.yaml)", ("uce",),
                toy_data=True),
    RecipeValue("anchor_prompts_file", None, "the anchor's prompts, e.g. params/prompts/dog.txt", toy_data=True),
    RecipeValue("related_concepts", None, "the target's neighbours, e.g. [Mickey, SpongeBob, Pikachu]", toy_data=True),
    RecipeValue("eval_concepts", None, "the target and its neighbours", toy_data=True),
    RecipeValue("erased_concepts", None, "the target", toy_data=True),
    RecipeValue("sequential_stages", None, "stages of the model's own concepts, e.g. ['Snoopy|dog|params/prompts/"
                "dog.txt', 'Mickey|mouse|params/prompts/mouse.txt']", toy_data=True),
    RecipeValue("clip_model", "openai/clip-vit-large-patch14", "the paper's CLIP ViT-L/14", toy_data=True),
    RecipeValue("fid_features", "inception", "the paper's Inception features", toy_data=True),
    RecipeValue("eval_templates", "clip80", "the paper's 80 CLIP ImageNet templates", toy_data=True),
)
# The params files that hold each method's recipe on SD v1.4, named by the message.
RECIPE_FILES = {**dict.fromkeys(_PAPER_SCHEDULE, "params/sd14_paper.yaml (the base of params/concepts/sd14_*.yaml)"),
                "spm": "params/concepts/sd14_snoopy_spm.yaml", "uce": "params/concepts/sd14_snoopy_uce.yaml"}
