"""The documentation: a README that fits on a few screens and shows the figure, links that lead somewhere, the
right DoCo citation, and the figure script's own behaviour (without sampling: that is `make readme-figure`)."""

import importlib.util
import re
import subprocess

import pytest
import torch
from PIL import Image

README_MAX_LINES = 200
FIGURE = "docs/figures/erasure.png"
FIGURE_MAX_BYTES = 300 * 1024
WRONG_DOCO_ARXIV = "2312." + "10940"  # split, so that this file does not contain what it looks for
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def outside_code(text: str) -> list[str]:
    """The lines of a Markdown text that are not inside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for a document's headings: lower case, punctuation dropped, spaces to hyphens, a
    repeated anchor numbered -1, -2, …"""
    anchors = set()
    for line in outside_code(text):
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            anchor = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
            numbered, n = anchor, 0
            while numbered in anchors:
                n += 1
                numbered = f"{anchor}-{n}"
            anchors.add(numbered)
    return anchors


def relative_links(path) -> list[str]:
    text = "\n".join(outside_code(path.read_text(encoding="utf-8")))
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]  # no http:, mailto:, …


def test_readme_fits_in_200_lines(repo_root):
    lines = (repo_root / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/"


@pytest.mark.parametrize("name", ["README.md", "benchmarks/README.md", "docs/*.md"])
def test_every_relative_link_leads_to_a_file_and_heading(repo_root, name):
    paths = sorted(repo_root.glob(name))
    assert paths, f"no {name}"
    broken, checked = [], 0
    for path in paths:
        for target in relative_links(path):
            checked += 1
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                broken.append(f"{path.relative_to(repo_root)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked.read_text(encoding="utf-8")):
                broken.append(f"{path.relative_to(repo_root)}: {target} (no heading #{anchor})")
    assert checked >= len(paths), f"{name}: expected relative links, found {checked}"
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_link_checker_finds_a_broken_file_and_anchor(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\n[ok](b.md#the-part) [gone](c.md) [bad](b.md#nope) "
                                   "[web](https://example.org/x)\n```\n[in code](d.md)\n```\n")
    (tmp_path / "b.md").write_text("# The part\n")
    assert relative_links(tmp_path / "a.md") == ["b.md#the-part", "c.md", "b.md#nope"]
    assert heading_anchors((tmp_path / "b.md").read_text()) == {"the-part"}


def test_readme_shows_the_committed_figure(repo_root):
    figure = repo_root / FIGURE
    assert figure.is_file(), f"{FIGURE} is missing: `make readme-figure`"
    assert figure.stat().st_size < FIGURE_MAX_BYTES, f"{FIGURE} is {figure.stat().st_size} bytes"
    with Image.open(figure) as image:
        assert image.format == "PNG" and min(image.size) >= 200
    readme = (repo_root / "README.md").read_text(encoding="utf-8")
    assert re.search(r"!\[[^\]]+\]\(" + re.escape(FIGURE) + r"\)", readme), "README.md does not show the figure"
    assert "make readme-figure" in readme
    assert re.search(r"^readme-figure:.*\n\t.*scripts/readme_figure\.py", (repo_root / "Makefile").read_text(), re.M)


def repository_text_files(repo_root):
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo_root,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        path = repo_root / name
        if path.is_file():
            data = path.read_bytes()
            if b"\0" not in data[:8192]:
                yield name, data.decode("utf-8", errors="replace")


def test_doco_is_cited_as_arxiv_2405_15304_aaai_2025_everywhere(repo_root):
    files = dict(repository_text_files(repo_root))
    assert "README.md" in files and "docs/results.md" in files
    wrong = sorted(name for name, text in files.items() if WRONG_DOCO_ARXIV in text)
    assert not wrong, f"DoCo is arXiv 2405.15304 (AAAI 2025), not {WRONG_DOCO_ARXIV}: {wrong}"
    assert "arxiv.org/abs/2405.15304" in files["README.md"] and "AAAI 2025" in files["README.md"]


@pytest.fixture(scope="module")
def readme_figure(repo_root):
    spec = importlib.util.spec_from_file_location("readme_figure", repo_root / "scripts" / "readme_figure.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_figure_script_draws_original_left_and_erased_right_row_by_prompt(readme_figure, tmp_path):
    prompts, seeds = ["a photo of a star", "a photo of a heart"], 3
    black, white = torch.zeros(len(prompts) * seeds, 3, 32, 32), torch.ones(len(prompts) * seeds, 3, 32, 32)
    fig = readme_figure.comparison_figure(black, white, prompts, seeds, "doco: star → pentagon")
    left, right = fig.axes
    assert (left.get_title(), right.get_title()) == ("original", "erased")
    assert [label.get_text() for label in left.get_yticklabels()] == [f'"{p}"' for p in prompts]
    grids = [ax.images[0].get_array() for ax in (left, right)]
    assert grids[0].shape == grids[1].shape == (2 * (96 + 6) + 6, 3 * (96 + 6) + 6, 3)  # 2 rows, 3 seeds, ×3, padding
    assert grids[0][6:96, 6:96].max() == 0 and grids[1][6:96, 6:96].min() == 255  # black images left, white right
    path = tmp_path / "f.png"
    path.write_bytes(readme_figure.png_bytes(fig))
    with Image.open(path) as image:
        assert image.format == "PNG"


def test_figure_script_names_a_missing_unet_in_one_line(readme_figure, tmp_path, capsys):
    assert readme_figure.main(["--unet", str(tmp_path / "nope"), "--out", str(tmp_path / "f.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0] and "make demo" in err[0]
    assert not (tmp_path / "f.png").exists()
