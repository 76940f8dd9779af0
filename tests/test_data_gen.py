"""Invariants of the synthetic generator."""
import numpy as np
import pytest
from scipy import ndimage

import data_gen
from data_gen import compact_blob, generate_dataset, generate_sample, min_lesion_pixels, random_ellipse
from metrics import best_threshold_dice


@pytest.mark.parametrize("difficulty", data_gen.DIFFICULTIES)
def test_values_range_and_lesion_inside_organ(difficulty):
    d = generate_dataset(40, 48, seed=3, difficulty=difficulty)
    assert d.images.dtype == np.float32 and d.images.shape == (40, 48, 48)
    assert d.images.min() >= 0.0 and d.images.max() <= 1.0
    assert set(np.unique(d.lesions)) <= {0, 1} and set(np.unique(d.organs)) <= {0, 1}
    assert not np.any(d.lesions & (1 - d.organs)), "lesion pixels outside the organ"


def test_deterministic_per_seed_and_global_rng_untouched():
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a = generate_dataset(10, 32, seed=7, difficulty="realistic")
    after = np.random.get_state()[1]
    assert np.array_equal(before, after), "the global NumPy RNG state changed"
    b = generate_dataset(10, 32, seed=7, difficulty="realistic")
    assert np.array_equal(a.images, b.images) and np.array_equal(a.lesions, b.lesions)
    c = generate_dataset(10, 32, seed=8, difficulty="realistic")
    assert not np.array_equal(a.images, c.images)
    # sample i depends only on (seed, i): a larger dataset starts with the same images
    bigger = generate_dataset(15, 32, seed=7, difficulty="realistic")
    assert np.array_equal(a.images, bigger.images[:10])


def test_every_seed_lesion_is_large_enough_and_min_size_scales():
    assert min_lesion_pixels(64, 64) == 10
    assert min_lesion_pixels(256, 256) == 16 * min_lesion_pixels(64, 64) + 4  # 0.25 % of the area
    for size in (32, 64, 128):
        d = generate_dataset(60, size, seed=1, difficulty="seed")
        assert d.lesions.sum(axis=(1, 2)).min() >= min_lesion_pixels(size, size)


def test_fallback_is_one_compact_blob_not_a_speckle():
    rng = np.random.default_rng(0)
    for size in (32, 64, 256):
        for _ in range(20):
            organ, centre, axes = random_ellipse(rng, size, size)
            blob = compact_blob(rng, organ, centre, axes, min_lesion_pixels(size, size))
            assert blob.sum() >= min_lesion_pixels(size, size)
            _, n = ndimage.label(blob)
            assert n == 1
            filled = ndimage.binary_fill_holes(blob)
            assert filled.sum() == blob.sum(), "a blob has no holes"
            ys, xs = np.nonzero(blob)
            box = (np.ptp(ys) + 1) * (np.ptp(xs) + 1)
            assert blob.sum() / box > 0.5, "compact: fills most of its bounding box (a disc fills ~pi/4, a speckle ~0.15)"


def test_seed_preset_has_no_speckle_lesions():
    # the post's fallback (15 % of organ pixels at random) gave dozens of 1-px components;
    # six clipped circles or the compact fallback give at most six
    d = generate_dataset(200, 64, seed=42, difficulty="seed")
    components = [ndimage.label(m)[1] for m in d.lesions]
    assert min(components) >= 1 and max(components) <= 6


def test_realistic_preset_is_not_solved_by_a_threshold():
    seed = generate_dataset(60, 64, seed=5, difficulty="seed")
    real = generate_dataset(60, 64, seed=5, difficulty="realistic")
    assert best_threshold_dice(seed.images, seed.lesions)[0] > 0.95
    assert best_threshold_dice(real.images, real.lesions)[0] < 0.5
    counts = [ndimage.label(m)[1] for m in real.lesions]
    assert any(c == 0 for c in counts), "some realistic images have no lesion"
    assert any(c >= 2 for c in counts), "some realistic images have several lesions"


def test_multiclass_labels_and_bad_arguments():
    d = generate_dataset(4, 32, seed=0)
    lab = d.labels("organ+lesion")
    assert set(np.unique(lab)) == {0, 1, 2}
    assert np.array_equal(lab == 2, d.lesions == 1)
    with pytest.raises(ValueError):
        d.labels("nope")
    with pytest.raises(ValueError):
        generate_sample(np.random.default_rng(0), 32, difficulty="nope")
    with pytest.raises(ValueError):
        generate_dataset(4, 8)
