import numpy as np

from doco_lib.toy import render


def test_rendering_is_deterministic_per_seed():
    a, labels_a = render.render_dataset(16, seed=3)
    b, labels_b = render.render_dataset(16, seed=3)
    c, _ = render.render_dataset(16, seed=4)
    assert np.array_equal(a, b) and np.array_equal(labels_a.shape, labels_b.shape)
    assert not np.array_equal(a, c)
    assert a.shape == (16, 32, 32, 3) and a.dtype == np.uint8


def test_world_has_enough_shapes_colours_and_styles():
    assert len(render.SHAPES) >= 8 and len(render.COLOURS) >= 6 and len(render.STYLES) >= 4


def test_shape_is_drawn_in_its_colour_and_is_salient():
    rng = np.random.default_rng(0)
    for colour_index, colour in enumerate(render.COLOURS):
        image = render.render_image(render.SHAPES.index("square"), colour_index, render.STYLES.index("plain"), rng)
        target = np.array(render.COLOUR_RGB[colour])
        close = np.abs(image.astype(int) - target).sum(-1) < 30
        assert close.mean() > 0.15, f"{colour} square covers only {close.mean():.0%} of the image"


def test_shapes_differ_from_each_other():
    rng_seed = 7
    masks = {}
    for index, shape in enumerate(render.SHAPES):
        image = render.render_image(index, 0, 0, np.random.default_rng(rng_seed))
        masks[shape] = np.abs(image.astype(int) - render.BACKGROUND_LIGHT).sum(-1) > 60
    names = list(masks)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert (masks[a] != masks[b]).mean() > 0.02, f"{a} and {b} render alike"


def test_styles_are_distinct_textures():
    rng = np.random.default_rng(0)
    backgrounds = {style: render._background(style, 128, rng)[..., 0] for style in render.STYLES}
    assert backgrounds["plain"].std() == 0
    for style in ("striped", "dotted", "checkered"):
        assert backgrounds[style].std() > 10


def test_synonym_rate_for_stars_is_about_ten_percent():
    labels = render.sample_labels(40_000, np.random.default_rng(0))
    stars = labels.shape == render.SHAPES.index("star")
    rate = labels.synonym[stars].mean()
    assert 0.08 < rate < 0.12
    assert not labels.synonym[~stars].any()


def test_captions_use_templates_synonym_and_articles():
    star, orange = render.SHAPES.index("star"), render.COLOURS.index("orange")
    texts = {render.caption(star, orange, 0, synonym, t) for synonym in (False, True)
             for t in range(len(render.CAPTION_TEMPLATES))}
    assert "a photo of a star" in texts and "a photo of a pentagram" in texts
    assert "an orange star on a plain background" in texts
    assert not any(" a orange" in t or t.startswith("a orange") for t in texts)
    assert set(render.all_captions()) >= texts
