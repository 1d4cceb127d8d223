"""The shapes-world oracle: bundled accuracy, exact save/load, training data, embeddings, reading, training."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from easyref.shapes import world
from easyref.shapes.oracle import (
    ASSETS_DIR,
    ATTRIBUTES,
    CLASSES,
    CONFIG_NAME,
    OracleNet,
    Reading,
    clean_accuracy,
    clean_scenes,
    images_to_tensor,
    load_oracle,
    main,
    read_images,
    save_oracle,
    train_oracle,
    training_example,
)

# The bundled weights were trained with seed 0 and reported on seed 1234; this set is neither.
TEST_SEED = 99


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def oracle() -> OracleNet:
    return load_oracle()


def _jittered(subject: world.Subject, background: str, position: str, rng: random.Random) -> Image.Image:
    cx, cy = world.POSITIONS[position]
    placement = world.Placement(
        subject, cx + rng.uniform(-0.05, 0.05), cy + rng.uniform(-0.05, 0.05), rng.uniform(0.35, 0.5)
    )
    return world.render(world.Scene(background, placement))


def test_class_lists_follow_the_world():
    assert CLASSES == {
        "shape": world.SHAPES,
        "colour": tuple(world.COLOURS),
        "pattern": world.PATTERNS,
        "background": tuple(world.BACKGROUNDS),
        "position": tuple(world.POSITIONS),
    }
    assert ATTRIBUTES == ("shape", "colour", "pattern", "background", "position")


def test_bundled_weights_read_clean_renders(oracle):
    result = clean_accuracy(oracle, 300, seed=TEST_SEED)
    assert set(result) == {*ATTRIBUTES, "all"}
    assert result["all"] >= 0.98, result
    assert (ASSETS_DIR / "oracle.safetensors").stat().st_size < 2_000_000


def test_clean_sets_cover_both_splits():
    scenes = clean_scenes(40, seed=TEST_SEED)
    assert {world.split_of(subject) for subject, _, _ in scenes} == set(world.SPLITS)
    assert clean_scenes(40, seed=TEST_SEED) == scenes
    assert clean_scenes(40, seed=TEST_SEED + 1) != scenes


def test_save_load_round_trip_is_exact(oracle, tmp_path):
    save_oracle(oracle, tmp_path)
    loaded = load_oracle(tmp_path)
    assert not loaded.training
    images = images_to_tensor(
        [_jittered(s, "gray", "center", random.Random(i)) for i, s in enumerate(world.all_subjects()[::12])]
    )
    with torch.no_grad():
        before, after = oracle(images), loaded(images)
        for attribute in ATTRIBUTES:
            assert torch.equal(before[attribute], after[attribute])
        assert torch.equal(oracle.embed(images), loaded.embed(images))


def test_load_refuses_other_class_lists(oracle, tmp_path):
    save_oracle(oracle, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["classes"]["colour"] = config["classes"]["colour"][::-1]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="other classes"):
        load_oracle(tmp_path)


def test_images_to_tensor_scales_and_resizes():
    small = Image.new("RGB", (64, 64), (255, 0, 128))
    large = Image.new("RGBA", (100, 100), (0, 255, 0, 255))
    batch = images_to_tensor([small, large])
    assert batch.shape == (2, 3, 64, 64) and batch.dtype == torch.float32
    assert batch[0, :, 0, 0].tolist() == pytest.approx([1.0, -1.0, 128 / 127.5 - 1], abs=1e-6)
    assert batch[1, :, 5, 5].tolist() == [-1.0, 1.0, -1.0]


def _nearest(pixels: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> np.ndarray:
    names = list(palette)
    table = np.array([palette[n] for n in names], dtype=np.float32)
    distance = ((pixels[..., None, :] - table) ** 2).sum(-1)
    return np.array(names, dtype=object)[distance.argmin(-1)]


def _pale(rgb: tuple[int, int, int]) -> tuple[int, ...]:
    return tuple(int(0.35 * c + 0.65 * 255) for c in rgb)


def test_training_example_is_deterministic_and_labelled_truthfully(oracle):
    for seed in range(12):
        image, labels = training_example(random.Random(seed))
        again, labels_again = training_example(random.Random(seed))
        assert labels == labels_again and image.tobytes() == again.tobytes()
        assert image.size == (64, 64) and image.mode == "RGB"
        names = {a: CLASSES[a][labels[a]] for a in ATTRIBUTES}

        # every pixel takes the nearest of: the labelled background, each colour, each colour's pale tint
        palette = {"bg": world.BACKGROUNDS[names["background"]], **world.COLOURS}
        palette.update({f"pale {n}": _pale(rgb) for n, rgb in world.COLOURS.items()})
        nearest = _nearest(np.asarray(image, dtype=np.float32), palette)
        # the corner diagonally away from the subject is background, whatever the jitter
        rows = slice(0, 3) if "bottom" in names["position"] else slice(-3, None)
        cols = slice(0, 3) if "right" in names["position"] else slice(-3, None)
        corner = np.asarray(image, dtype=np.float32)[rows, cols].reshape(-1, 3)
        assert set(_nearest(corner, world.BACKGROUNDS)) == {names["background"]}, names
        object_pixels = nearest != "bg"
        # only the saturated colours vote: pale tints sit close together once contrast or blur moves them
        colours = [n for n in nearest[object_pixels] if not n.startswith("pale ")]
        assert max(set(colours), key=colours.count) == names["colour"], names

        ys, xs = np.nonzero(object_pixels)
        centre = (xs.mean() / 64, ys.mean() / 64)
        closest = min(world.POSITIONS, key=lambda p: np.hypot(*np.subtract(world.POSITIONS[p], centre)))
        assert closest == names["position"], (names, centre)

        # shape and pattern are not measurable by pixel rules; the (clean-verified) oracle checks them
        reading = read_images(oracle, [image])[0]
        assert (reading.shape, reading.pattern) == (names["shape"], names["pattern"]), (names, reading)
    first = [training_example(random.Random(seed))[1] for seed in range(12)]
    assert len({tuple(labels.values()) for labels in first}) > 6


def test_training_examples_are_jittered_and_augmented():
    rng = random.Random(5)
    examples = [training_example(rng) for _ in range(40)]
    clean = 0
    for image, labels in examples:
        subject = world.Subject(*(CLASSES[a][labels[a]] for a in ("shape", "colour", "pattern")))
        render = world.render(
            world.target_scene(
                subject, CLASSES["background"][labels["background"]], CLASSES["position"][labels["position"]]
            )
        )
        clean += render.tobytes() == image.tobytes()
    assert clean == 0
    # renders are aliased, so an example without pixel-level augmentation uses only palette colours
    palette = {*world.COLOURS.values(), *map(_pale, world.COLOURS.values()), *world.BACKGROUNDS.values()}
    untouched = [e for e, _ in examples if set(e.getdata()) <= palette]
    assert 0 < len(untouched) < len(examples)


def test_embed_prefers_the_same_subject(oracle):
    rng = random.Random(7)
    subjects = world.all_subjects()
    same, different = [], []
    for _ in range(8):
        a, b = rng.sample(subjects, 2)
        (bg1, bg2), (pos1, pos2) = rng.sample(list(world.BACKGROUNDS), 2), rng.sample(list(world.POSITIONS), 2)
        images = [_jittered(a, bg1, pos1, rng), _jittered(a, bg2, pos2, rng), _jittered(b, bg1, pos1, rng)]
        with torch.no_grad():
            e = oracle.embed(images_to_tensor(images))
        assert torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
        same.append(float(e[0] @ e[1]))
        different.append(float(e[0] @ e[2]))
    # bundled weights give about 0.98 against 0.65; an untrained net fails this
    assert np.mean(same) > np.mean(different) + 0.2, (same, different)


def test_read_images_on_hand_made_renders(oracle):
    cases = [
        Reading("star", "blue", "striped", "tan", "top right"),
        Reading("circle", "yellow", "dotted", "white", "center"),
        Reading("hexagon", "purple", "solid", "black", "bottom left"),
        Reading("triangle", "orange", "dotted", "gray", "top left"),
        Reading("diamond", "cyan", "striped", "black", "bottom right"),
    ]
    images = [
        world.render(world.target_scene(world.Subject(c.shape, c.colour, c.pattern), c.background, c.position))
        for c in cases
    ]
    # a larger render (as a generator at another resolution would give) reads the same after resizing
    images.append(world.render(world.target_scene(world.Subject("square", "red", "solid"), "gray", "center"), side=128))
    cases.append(Reading("square", "red", "solid", "gray", "center"))
    assert read_images(oracle, images) == cases
    assert read_images(oracle, []) == []


def test_short_training_lowers_the_loss():
    losses: list[float] = []
    model = train_oracle(steps=40, batch_size=16, seed=3, on_step=lambda step, loss: losses.append(loss))
    assert len(losses) == 40 and not model.training
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8]), losses


def test_training_is_deterministic_for_a_seed():
    def weights(seed: int) -> dict[str, torch.Tensor]:
        return train_oracle(steps=2, batch_size=4, seed=seed).state_dict()

    first, again, other = weights(1), weights(1), weights(2)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_accuracy_command_reports_bundled_weights(capsys):
    assert main(["accuracy", "--count", "40", "--seed", str(TEST_SEED)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {*ATTRIBUTES, "all"} and result["all"] >= 0.95
