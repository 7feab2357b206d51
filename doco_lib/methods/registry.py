"""The methods and their settings as data: what a params file may name, in one place.

The params schema (`doco_lib.config`), the harness (`doco_lib.methods.harness`) and the studies read these
tuples and tables; none of them retypes a choice.
"""

METHODS = ("doco", "esd", "conabl", "rgd", "uce", "spm")
UCE_CODE_VERSIONS = (2023, 2025)
SPM_ANCHOR_BATCHES = ("official", "intended")
SPM_PROMPTS = ("concept", "target_prompts")
RETAIN_MODES = ("none", "l2", "cp", "rgd")
TRAINABLE = ("cross_attention_kv", "cross_attention", "non_cross_attention", "full")
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
}
# Not a harness method: the target's SepME increment (doco_lib/studies/sepme_study.py), on `sepme_model`.
SEPME = "SepME"
