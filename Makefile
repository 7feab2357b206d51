# Two commands on a fresh machine (Python 3.11 and make): `make demo` and `make test-all` (`make test`: without slow tests).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all install bench ablation ablation-quick sepme damage-matrix styles-attributes clean-outputs ui-check readme-figure results-retain-modes results-lora-export results-toy-world results-sepme results-methods results-methods-mmdit results-damage-matrix results-multi-concept results-styles-attributes attacks attacks-mmdit

install: $(STAMP)

# Reinstalls only when pyproject.toml changes. Torch comes first, pinned, from the local wheels. No pip
# cache: the venv alone takes about 6.7 GB (torch is a CUDA build), and CI disks can be tight.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-cache-dir --upgrade pip
	$(BIN)/pip install --quiet --no-cache-dir torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet --no-cache-dir -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/doco demo --params params/toy_world.yaml

# While working: everything but the slow end-to-end runs (tests marked slow). One pytest-xdist worker per core, each
# test file on one worker (its module fixtures built once), one torch thread per worker (tests/conftest.py).
PYTEST_WORKERS ?= auto
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" -n $(PYTEST_WORKERS) --dist loadfile

# What CI runs: the whole suite, slow end-to-end runs included (the SD path, multi-process training); the longest
# files first (tests/conftest.py).
test-all: $(STAMP)
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

clean-outputs:
	find outputs -mindepth 1 ! -name README.md -exec rm -rf {} +

bench: $(STAMP)
	$(BIN)/python -m benchmarks

# The ablation study (notebook 05) on the toy world: Table 3, the method comparison, sequential erasure.
ablation: $(STAMP)
	$(BIN)/doco demo --params params/toy_world.yaml --notebooks 05_ablations

# The same study in under 45 minutes on 2 cores (16 judged images per prompt set, one multi-concept seed, ESD in 10 steps).
ablation-quick: $(STAMP)
	$(BIN)/doco demo --params params/toy_ablation_quick.yaml --notebooks 05_ablations

# SepME (notebook 08) on the toy world: three concepts erased one increment each, every subset, one restored.
sepme: $(STAMP)
	$(BIN)/doco demo --params params/toy_sepme.yaml --notebooks 08_sepme

# The collateral-damage matrix (notebook 09), one seed; `make results-damage-matrix` records it over seeds.
damage-matrix: $(STAMP)
	$(BIN)/doco demo --params params/toy_damage_matrix.yaml --notebooks 09_damage_matrix

# Toy Table 2 (styles) and toy Figure 6 (an implicit attribute), notebook 10, one pass over study_seeds; its style
# grid is committed under docs/figures/ (the bar chart is drawn from the artefact: `make results-styles-attributes`).
styles-attributes: $(STAMP)
	$(BIN)/doco demo --params params/toy_styles_attributes.yaml --notebooks 10_styles_and_attributes
	cp outputs/toy_styles_attributes/10_styles_and_attributes/styles_same_seeds.png docs/figures/styles_same_seeds.png

# The explorer (notebook 06) end to end in headless JupyterLab + Chromium; not part of `make test`.
# Needs Debian's chromium (apt-get install -y chromium); writes outputs/ui_check/explorer.png.
ui-check: $(STAMP)
	$(BIN)/python scripts/ui_check.py

# The README's figure, docs/figures/erasure.png: the original toy model and the demo's erased UNet on the same
# prompts and seeds (about 30 s); runs `make demo` first when its erased UNet is missing.
DEMO_UNET := outputs/toy_world/doco/unet
readme-figure: $(STAMP) $(DEMO_UNET)/config.json
	$(BIN)/python scripts/readme_figure.py --unet $(DEMO_UNET) --out docs/figures/erasure.png

$(DEMO_UNET)/config.json: | $(STAMP)
	$(MAKE) demo

# docs/results/retain_modes.{csv,json}: DoCo's retain modes on the toy world, 3 seeds × 64 judged images per set.
results-retain-modes: $(STAMP)
	$(BIN)/doco toy erasure --params params/toy_world.yaml --seeds 0 1 2 --samples 64 --record retain_modes
	$(BIN)/doco results

# The LoRA export against the full weights (docs/results/lora_export.csv): DoCo (cp) on 3 seeds, 64 images per set.
results-lora-export: $(STAMP)
	$(BIN)/doco toy lora-export --params params/toy_world.yaml --seeds 0 1 2 --samples 64 --record
	$(BIN)/doco results

# How often the judge names the prompted shape, colour and style of toy and toy-wide (docs/results/toy_world.csv).
results-toy-world: $(STAMP)
	$(BIN)/doco toy quality --models toy toy-wide toy-mmdit --seeds 0 1000 2000 --samples 64 --record
	$(BIN)/doco results

# SepME's increments per seed, every subset judged (docs/results/sepme.csv): 3 seeds, 64 images per set.
results-sepme: $(STAMP)
	$(BIN)/doco toy sepme --params params/toy_sepme.yaml --seeds 0 1 2 --samples 64 --record
	$(BIN)/doco results

# Notebook 05's method comparison (docs/results/methods/): every method and the two robust variants, each shape's
# judged rate and UA / IRA / CRA at 64 judged images per prompt set, with the same runs' training costs
# (method_costs/) and the target judged across sampling settings (sampling_sweep/). Recorded seed by seed like the
# attack study, whose trained runs it reuses: `make results-methods METHOD_SEEDS=0` after `make attacks
# ATTACK_SEEDS=0`; a part already recorded with the same rows is left as it was.
METHOD_SEEDS ?= 0 1 2
results-methods: $(STAMP)
	$(BIN)/doco toy methods --params params/toy_methods.yaml --seeds $(METHOD_SEEDS) --record
	$(BIN)/doco results

# The collateral-damage matrix recorded seed by seed (docs/results/damage_matrix/; docs/figures/damage_matrix.png
# drawn from it): notebook 09's runs (4 methods × 8 shapes, the demo's 400 iterations, shared with `make
# damage-matrix`), every shape judged on 64 images after each. One part per call: `DAMAGE_SEEDS=0`, then 1, then 2.
DAMAGE_SEEDS ?= 0 1 2
results-damage-matrix: $(STAMP)
	$(BIN)/doco toy damage-matrix --params params/toy_damage_matrix.yaml --set eval_samples=64 --seeds $(DAMAGE_SEEDS) --record
	$(BIN)/doco results --figures

# Notebook 05's multi-concept erasure recorded seed by seed (docs/results/multi_concept/): DoCo (cp) erasing star,
# heart and cross one after another and at once on toy-wide, every stage judged on 64 images per prompt set.
MULTI_SEEDS ?= 0 1 2
results-multi-concept: $(STAMP)
	$(BIN)/doco toy multi-concept --params params/toy_methods.yaml --seeds $(MULTI_SEEDS) --record
	$(BIN)/doco results

# Notebook 10's toy Table 2 and Figure 6 recorded seed by seed (docs/results/styles/, implicit_attribute/,
# attribute_colours/; docs/figures/implicit_attribute.png drawn from them): the runs of `make styles-attributes`
# (6 methods × (3 styles + orange) per seed), every judged prompt set on 64 images.
STUDY_SEEDS ?= 0 1 2
results-styles-attributes: $(STAMP)
	$(BIN)/doco toy styles-attributes --params params/toy_styles_attributes.yaml --set eval_samples=64 --seeds $(STUDY_SEEDS) --record
	$(BIN)/doco results --figures

# The same comparison on toy-mmdit (docs/results/methods_toy_mmdit/): the eight methods that train its transformer.
results-methods-mmdit: $(STAMP)
	$(BIN)/doco toy methods --params params/toy_mmdit_methods.yaml --seeds $(METHOD_SEEDS) --record
	$(BIN)/doco results

# The attack study, notebook 07's (docs/results/attacks/, relearning/; docs/figures/attacks.png, relearning.png, drawn
# from every recorded part):
# every method of notebook 05 and the two robust variants × every attack of params/toy_attacks.yaml, 20 attempts
# each, and the circle control. Two shards, a process per core, then a call that combines their chunks and records
# the seeds' part of the artefacts. A seed is 13 models (11 erasures, the toy and toy-wide originals) × 20 attempts ×
# 9 attacks and the control's 3. Measured on 2 cores, each seed beside a session's other work: seed 0 (2026-12-06,
# beside the test suite) 18 min (the original, DoCo none) to 28 min (DoCo cp) per model on its share of a core,
# after 20-25 min of training; seed 2 (2026-12-07, nice 19, beside about 40 min of test runs) 30 min of training
# and 83 min of attacks, 1 h 53 min in all. So the three seeds take about 6 h: `make attacks ATTACK_SEEDS=0` records
# one seed per session; every part must come from the same settings and STUDY_VERSION (`doco results` refuses
# others).
ATTACK_SEEDS ?= 0 1 2
ATTACK_PARAMS ?= params/toy_attacks.yaml
ATTACKS = $(BIN)/doco toy attacks --params $(ATTACK_PARAMS) --seeds $(ATTACK_SEEDS)
attacks: $(STAMP)
	$(ATTACKS) --shard 1/2 > outputs/attacks_shard1.log 2>&1 & $(ATTACKS) --shard 2/2; shard2=$$?; \
		wait $$! && test $$shard2 -eq 0 || { tail -20 outputs/attacks_shard1.log; exit 1; }
	$(ATTACKS) --record
	$(BIN)/doco results --figures

# The same study on toy-mmdit (docs/results/attacks_toy_mmdit/, relearning_toy_mmdit/): its eight methods.
attacks-mmdit: $(STAMP)
	$(MAKE) attacks ATTACK_PARAMS=params/toy_mmdit_attacks.yaml
