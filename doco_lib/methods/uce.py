"""UCE: unified concept editing, a closed-form edit of the cross-attention keys and values.

Gandikota, Orgad, Belinkov, Materzyńska, Bau, "Unified Concept Editing in Diffusion Models", WACV 2024.
Reference code: github.com/rohitgandikota/unified-concept-editing, `train-scripts/train_erase.py` (2023, the
paper's) and `trainscripts/uce_sd_erase.py` (2025); what both do is in shared/methods/spm_uce.md.

Every cross-attention `to_k` and `to_v` (`attn2`; SD v1.4: 16 layers, 32 matrices) reads the text embedding
rows c (d_in) and nothing else. For each such W₀ (d_out × d_in), with edit rows c_e mapped to the rows c_a
of their anchor (v*_e = W₀ c_a) and preserved rows c_p,

    W' = argmin_W  λ‖W − W₀‖² + s_e Σ_e ‖W c_e − v*_e‖² + s_p Σ_p ‖W c_p − W₀ c_p‖²
       = (λW₀ + s_e Σ_e v*_e c_eᵀ + s_p Σ_p W₀ c_p c_pᵀ) (λI + s_e Σ_e c_e c_eᵀ + s_p Σ_p c_p c_pᵀ)⁻¹,

solved in float64 (λ > 0 makes the right factor positive definite). The λ terms are the code's, not the
paper's closed form as others quote it. Nothing is trained: `UceTrainer.run` applies the edit once (seconds
on a CPU) and exports the UNet as every method of the harness does.

Which text rows, following the code (`uce_code_version`):
  - 2023 (default; the paper's code): each concept is encoded alone ("star", anchor "pentagon"; an empty
    anchor becomes " ", i.e. BOS). Edit and anchor rows start at each one's last word token (index
    attention_mask.sum() − 2) and run through EOS and the padding, trimmed to equal length so that they pair
    up row by row. Preserved concepts are "" plus `uce_preserve`, all 77 rows each, and s_p defaults to
    max(0.1, 1 / number of preserved concepts).
  - 2025: only the last word token's row of each concept (edit, anchor and preserved alike), nothing
    preserved but `uce_preserve`, and s_p defaults to 1.
The 2023 code's 'tensor' technique (removing the W₀c_e component instead of mapping to an anchor) and its
optional prompt templates are not reproduced: the harness always has an anchor.

On an MMDiT (SD 3.x, FLUX.1) no layer but the first reads the text alone: each block's text-stream K/V read the
stream after the blocks before it, normalised and modulated by the timestep. UCE's own code for these models
(`trainscripts/uce_flux_edit.py`, of the 2025 code) edits the two linear maps that take the text encoders' outputs
into the transformer instead: `context_embedder` (the per-token states) and the pooled projection's first layer
(`time_text_embed.text_embedder.linear_1`), with the 2025 rules above whatever `uce_code_version` says (it
chooses between the UNet codes): the states' row of each concept's last word token (T5's on FLUX.1; on SD 3.x the
CLIP encoders' and T5's, one row each), its pooled embedding, nothing preserved but `uce_preserve`, s_p = 1.
"""

from __future__ import annotations

import torch

from doco_lib.config import ParamsError
from doco_lib.methods.harness import ErasureTrainer
from doco_lib.models import denoiser_family, encode_prompts, transformer_inputs, unet_inputs

# The linear maps UCE edits on an MMDiT, by module name, and which of the text's inputs each reads.
MMDIT_MODULES = {"context_embedder": "states", "time_text_embed.text_embedder.linear_1": "pooled"}


def kv_modules(unet) -> dict[str, torch.nn.Linear]:
    """Every cross-attention key and value projection by module name (SD v1.4: 32), as the 2025 code selects them."""
    return {name: module for name, module in unet.named_modules()
            if name.endswith(("attn2.to_k", "attn2.to_v")) and isinstance(module, torch.nn.Linear)}


def edited_modules(denoiser) -> dict[str, torch.nn.Linear]:
    """The linear maps the closed form edits: a UNet's `kv_modules`, an MMDiT's `MMDIT_MODULES`."""
    if denoiser_family(denoiser) == "unet":
        return kv_modules(denoiser)
    modules = dict(denoiser.named_modules())
    return {name: modules[name] for name in MMDIT_MODULES}


def mmdit_rows(pipe, texts: list[str]) -> dict[str, torch.Tensor]:
    """What an MMDiT's edited maps read of each text, (n, rows, d) in float64 on the CPU: "states", the row of each
    text encoder's last word token in the transformer's context (FLUX.1: T5's; SD 3.x: the CLIP encoders' rows, then
    T5's, unless the pipeline has no T5: its slot holds zeros), and "pooled", the pooled embedding (one row)."""
    transformer = pipe.transformer
    states, pooled = transformer_inputs(transformer, encode_prompts(pipe, texts))
    if denoiser_family(transformer) == "flux":
        segments = [(0, pipe.tokenizer_2)]
    else:
        segments = [(0, pipe.tokenizer)] + ([(pipe.tokenizer.model_max_length, pipe.tokenizer_3)]
                                           if pipe.tokenizer_3 is not None else [])
    rows = []
    for offset, tokenizer in segments:
        lengths = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").attention_mask.sum(dim=1)
        rows.append(states[torch.arange(len(texts)), offset + (lengths - 2).clamp(min=0)])  # "": its end token
    return {"states": torch.stack(rows, dim=1).double().cpu(), "pooled": pooled[:, None].double().cpu()}


def encode(pipe, texts: list[str]) -> tuple[torch.Tensor, list[int]]:
    """The rows the cross-attention reads of each text, (n, 77, d) in float64 on the CPU (the harness's conditioning,
    `doco_lib.models.encode_prompts`), and each text's number of tokens with BOS and EOS (the attention mask's
    sum, as both versions of the code count them)."""
    hidden = unet_inputs(pipe.unet, encode_prompts(pipe, texts))["encoder_hidden_states"]
    lengths = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").attention_mask.sum(dim=1).tolist()
    return hidden.double().cpu(), lengths


def paired_rows(erase: torch.Tensor, n_erase: int, anchor: torch.Tensor, n_anchor: int,
                version: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of an erased concept's embedding and of its anchor's that are mapped onto each other: from each
    one's last word token (index n − 2) on, trimmed to a common length (2023), or that token's row alone (2025)."""
    i, j = n_erase - 2, n_anchor - 2
    if version == 2025:
        return erase[i:i + 1], anchor[j:j + 1]
    farthest, rows = max(i, j), erase.shape[0]
    return erase[i:rows - (farthest - i)], anchor[j:rows - (farthest - j)]


def preserved_rows(hidden: torch.Tensor, length: int, version: int) -> torch.Tensor:
    """A preserved concept's rows: all of them (2023) or its last word token's (2025)."""
    return hidden if version == 2023 else hidden[length - 2:length - 1]


def closed_form(w0: torch.Tensor, c_erase: torch.Tensor, c_anchor: torch.Tensor, c_preserve: torch.Tensor,
                lam: float, erase_scale: float, preserve_scale: float) -> torch.Tensor:
    """W' of the module docstring, in float64. Rows are (n, d_in); v*_e = W₀ c_a (c_erase and c_anchor pair up)."""
    w0 = w0.double()
    v_star = c_anchor.double() @ w0.T
    c_e, c_p = c_erase.double(), c_preserve.double()
    left = lam * w0 + erase_scale * v_star.T @ c_e + preserve_scale * (c_p @ w0.T).T @ c_p
    right = lam * torch.eye(w0.shape[1], dtype=torch.float64) + erase_scale * c_e.T @ c_e \
        + preserve_scale * c_p.T @ c_p
    try:  # right is symmetric: W' = left · right⁻¹ = (right⁻¹ · leftᵀ)ᵀ
        return torch.linalg.solve(right, left.T).T
    except torch.linalg.LinAlgError:
        raise ParamsError(f"uce_lambda: {lam} leaves the UCE system singular (the edited and preserved rows do not "
                          "span the text embedding); set uce_lambda above 0.") from None


def mmdit_edit_rows(pipe, erase: list[str], anchors: list[str],
                    preserve: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`edit_rows` on an MMDiT, for each input its edited maps read (`mmdit_rows`)."""
    erased, anchored = mmdit_rows(pipe, erase), mmdit_rows(pipe, [anchor or " " for anchor in anchors])
    kept = mmdit_rows(pipe, preserve) if preserve else {k: v[:0] for k, v in erased.items()}
    return {key: (erased[key].flatten(0, 1), anchored[key].flatten(0, 1), kept[key].flatten(0, 1)) for key in erased}


def edit_rows(pipe, erase: list[str], anchors: list[str], preserve: list[str],
              version: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_erase, c_anchor, c_preserve) row matrices for concepts `erase` mapped to `anchors`, keeping `preserve`."""
    c_erase, c_anchor = [], []
    for erased, anchor in zip(erase, anchors, strict=True):
        hidden, lengths = encode(pipe, [erased, anchor or " "])  # the code's "" → " "
        rows = paired_rows(hidden[0], lengths[0], hidden[1], lengths[1], version)
        c_erase.append(rows[0])
        c_anchor.append(rows[1])
    c_preserve = c_erase[0][:0]  # no rows
    if preserve:
        hidden, lengths = encode(pipe, preserve)
        c_preserve = torch.cat([preserved_rows(h, n, version) for h, n in zip(hidden, lengths)])
    return torch.cat(c_erase), torch.cat(c_anchor), c_preserve


class UceTrainer(ErasureTrainer):
    """UCE in the harness: `run` applies the closed form to every edited map once (`iterations` does not apply);
    `export` writes the edited denoiser and its delta like every other method. Erases `spec.target`, mapped to
    `spec.anchor`; preserves the concepts of `uce_preserve` (and "" with the 2023 code)."""

    method = "uce"

    def __init__(self, pipe, *args, **kwargs):
        super().__init__(pipe, *args, **kwargs)
        cfg = self.config
        version = cfg.uce_code_version if denoiser_family(self.unet) == "unet" else 2025
        self.preserved = ([""] if version == 2023 else []) + list(cfg.uce_preserve)
        self.preserve_scale = cfg.uce_preserve_scale
        if self.preserve_scale is None:  # the code's defaults
            self.preserve_scale = max(0.1, 1 / len(self.preserved)) if version == 2023 else 1.0
        erase, anchor = [self.spec.target], [self.spec.anchor]
        # The rows of each input the edited maps read: a UNet's K/V all read the states.
        self.rows = ({"states": edit_rows(pipe, erase, anchor, self.preserved, version)}
                     if denoiser_family(self.unet) == "unet" else mmdit_edit_rows(pipe, erase, anchor, self.preserved))

    def trained_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The edited maps' weights (on a UNet the same as `trainable: cross_attention_kv`'s)."""
        return {f"{name}.weight": module.weight for name, module in edited_modules(self.unet).items()}

    @torch.no_grad()
    def train_step(self) -> dict:
        """The edit of every edited map; logs the two data terms of the objective after it, relative:
        g_loss = Σ‖W'c_e − v*‖² / Σ‖v*‖² (erasure residual), retain_loss = Σ‖(W' − W₀)c_p‖² / Σ‖W₀c_p‖²."""
        cfg = self.config
        residual = target = drift = kept = 0.0
        for name, module in edited_modules(self.unet).items():
            c_erase, c_anchor, c_preserve = self.rows[MMDIT_MODULES.get(name, "states")]
            w0 = module.weight.detach().double().cpu()
            w = closed_form(w0, c_erase, c_anchor, c_preserve, cfg.uce_lambda, cfg.uce_erase_scale,
                            self.preserve_scale)
            v_star = c_anchor @ w0.T
            residual += (c_erase @ w.T - v_star).square().sum().item()
            target += v_star.square().sum().item()
            drift += (c_preserve @ (w - w0).T).square().sum().item()
            kept += (c_preserve @ w0.T).square().sum().item()
            module.weight.copy_(w.to(module.weight.dtype))
        logs = {"g_loss": residual / max(target, 1e-30), "retain_loss": drift / max(kept, 1e-30)}
        self.check_finite(logs)
        return self.record_step("uce", logs)

    def run(self, until: int | None = None, progress: bool = True) -> list[dict]:
        """Apply the edit, once: a trainer that has applied it (step 1) does nothing more."""
        if self.step == 0 and (until is None or until > 0):
            with self.loop_cost.session(self):
                self.train_step()
            if self.accelerator.is_main_process:
                self.write_history()
        return self.history
