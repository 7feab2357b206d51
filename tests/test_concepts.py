import pytest

from doco_lib.concepts import ConceptSpec, PromptFileError, read_prompt_file


def test_target_prompts_per_kind():
    assert ConceptSpec("instance", "dog", "Snoopy").target_prompt("a Dog on a sofa, dog bowl") == \
        "a Snoopy on a sofa, Snoopy bowl"
    assert ConceptSpec("instance", "dog", "Snoopy").target_prompt("a hotdog stand with a dog") == \
        "a hotdog stand with a Snoopy"
    assert ConceptSpec("style", "painting", "Van Gogh").target_prompt("a painting of a harbour") == \
        "a painting of a harbour, in the style of Van Gogh"
    assert ConceptSpec("nudity", "clothed", "nudity").target_prompt("a man in a suit") == "nudity, a man in a suit"
    with pytest.raises(ValueError, match="concept_kind"):
        ConceptSpec("object", "a", "b")


def test_shipped_prompt_files_are_valid_and_varied(repo_root):
    files = {"dog.txt": ConceptSpec("instance", "dog", "Snoopy"),
             "painting.txt": ConceptSpec("style", "painting", "Van Gogh"),
             "clothed_people.txt": ConceptSpec("nudity", "clothed", "nudity")}
    for name, spec in files.items():
        prompts = read_prompt_file(repo_root / "params" / "prompts" / name, spec)
        assert len(prompts) >= 200
        words = {w for p in prompts for w in p.replace(",", " ").split()}
        assert len(words) >= 60, f"{name} uses only {len(words)} distinct words"
    toy = read_prompt_file(repo_root / "params" / "prompts" / "toy_pentagon.txt",
                           ConceptSpec("instance", "pentagon", "star"))
    assert "a photo of a pentagon" in toy


@pytest.mark.parametrize("content, message", [
    ("a dog\n\na dog running\n", "line 2 is empty"),
    ("a dog\na cat\n", "line 2 does not contain the anchor word 'dog'"),
    ("a dog\nA dog \n", "line 2 repeats the prompt of line 1"),
    ("# only a comment\n", "no prompts"),
])
def test_prompt_file_errors_name_the_line(tmp_path, content, message):
    path = tmp_path / "p.txt"
    path.write_text(content)
    with pytest.raises(PromptFileError, match=message):
        read_prompt_file(path, ConceptSpec("instance", "dog", "Snoopy"))


def test_missing_prompt_file(tmp_path):
    with pytest.raises(PromptFileError, match="does not exist"):
        read_prompt_file(tmp_path / "none.txt")
