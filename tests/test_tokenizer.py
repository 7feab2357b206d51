import json

import pytest

from doco_lib.toy.tokenizer import CLIP_VOCAB_SIZE, build_clip_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_clip_tokenizer(tmp_path_factory.mktemp("bpe"))


def test_tokenizer_is_the_real_clip_vocabulary(tokenizer):
    assert len(tokenizer) == CLIP_VOCAB_SIZE
    # Stable Diffusion v1 token ids: <|startoftext|> a photo of a dog <|endoftext|>
    assert tokenizer("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]
    assert tokenizer("Snoopy").input_ids[0] == 49406 and tokenizer("Snoopy").input_ids[-1] == 49407


def test_padding_is_end_of_text_to_77_tokens(tokenizer):
    ids = tokenizer("a red star", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert len(ids) == 77 and ids[-1] == 49407 and tokenizer.pad_token_id == 49407


def test_saved_tokenizer_round_trips(tokenizer, tmp_path):
    from transformers import CLIPTokenizer

    tokenizer.save_pretrained(tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert reloaded("a photo of a pentagram").input_ids == tokenizer("a photo of a pentagram").input_ids
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["model_max_length"] == 77
