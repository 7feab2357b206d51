import pytest
import torch

from doco_lib.anchors import load_anchor_latents, prepare_anchor_latents
from doco_lib.models import load_pipeline

PROMPTS = ["a photo of a pentagon", "a red pentagon on a striped background", "a pentagon in dotted style"]


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("toy", "cpu")


def make(pipe, directory, n=6):
    return prepare_anchor_latents(pipe, PROMPTS, n, directory, model="toy", seed=3, steps=2, guidance=5.0,
                                  shard_size=2, progress=False)


def test_cache_is_deterministic_and_repairs_missing_and_corrupt_shards(pipe, tmp_path):
    first = make(pipe, tmp_path / "a")
    assert len(first) == 6 and first.prompts[:4] == PROMPTS + PROMPTS[:1] and first.seeds == list(range(3, 9))
    reference = {p.name: p.read_bytes() for p in (tmp_path / "a").glob("shard_*.safetensors")}
    assert len(reference) == 3

    (tmp_path / "a" / "shard_00001.safetensors").unlink()  # as if killed before this shard
    corrupt = tmp_path / "a" / "shard_00002.safetensors"
    corrupt.write_bytes(corrupt.read_bytes()[:-16])  # truncated
    with pytest.raises(FileNotFoundError, match=r"incomplete or corrupt \(shards \[1, 2\]\)"):
        load_anchor_latents(tmp_path / "a", 1.0)
    repaired = make(pipe, tmp_path / "a")
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").glob("shard_*.safetensors")} == reference
    assert torch.equal(repaired.latent_mean, first.latent_mean)
    assert len(list((tmp_path / "a" / "images").glob("*.png"))) == 6


def test_changed_settings_regenerate(pipe, tmp_path):
    make(pipe, tmp_path / "b", n=4)
    bigger = make(pipe, tmp_path / "b", n=6)
    assert len(bigger) == 6


def test_sampling_latents_is_seeded(pipe, tmp_path):
    anchors = make(pipe, tmp_path / "c", n=4)
    index = torch.tensor([0, 3])
    a = anchors.sample(index, torch.Generator().manual_seed(0))
    b = anchors.sample(index, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (2, 4, 8, 8)
