"""Physics and calibration of the synthetic OCT data set."""
import numpy as np
import pytest

import synthetic
from synthetic import (NOISE_FLOOR, SyntheticOCT, clean_image, mean_intensity, noisy_clean_pair, phantom,
                       speckle_image, speckle_intensity)


def psnr(a, b):
    return 10 * np.log10(1.0 / np.mean((a.astype(np.float64) - b) ** 2))


def test_deterministic_by_seed():
    n1, c1 = noisy_clean_pair(3, 64, 96)
    n2, c2 = noisy_clean_pair(3, 64, 96)
    assert np.array_equal(n1, n2) and np.array_equal(c1, c2)
    n3, c3 = noisy_clean_pair(4, 64, 96)
    assert not np.array_equal(n1, n3) and not np.array_equal(c1, c3)
    a, b = SyntheticOCT(n_train=2, n_test=1, seed=5), SyntheticOCT(n_train=2, n_test=1, seed=5)
    assert np.array_equal(a.noisy_train(1), b.noisy_train(1))
    assert np.array_equal(a.clean_train(1), b.clean_train(1))
    assert np.array_equal(a.test_pair(0)[0], b.test_pair(0)[0])
    assert not np.array_equal(a.clean_train(1), SyntheticOCT(seed=6).clean_train(1))


@pytest.mark.parametrize('shape', [(256, 256), (45, 90)])
def test_range_and_dtype(shape):
    rng = np.random.default_rng(0)
    refl = phantom(rng, *shape)
    assert refl.shape == shape and refl.dtype == np.float64 and refl.min() > 0
    for img in (speckle_image(refl, rng), clean_image(refl)):
        assert img.shape == shape and img.dtype == np.float32
        assert img.min() >= 0 and img.max() <= 1


def test_speckle_fully_developed_in_homogeneous_region():
    refl = np.full((192, 256), 0.1)
    intensity = speckle_intensity(refl, np.random.default_rng(1))
    cv = intensity.std() / intensity.mean()
    assert abs(cv - 1) < 0.1
    assert intensity.mean() == pytest.approx(0.1 + NOISE_FLOOR, rel=0.05)


def test_background_display_statistics():
    # Signal-free pixels: speckle of the noise floor alone (Duke: 31-33 grey
    # levels std, 53-63 mean).
    values = []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        refl = phantom(rng, 256, 256)
        noisy = speckle_image(refl, rng)
        values.append(noisy[mean_intensity(refl) < 1.01 * NOISE_FLOOR])
    values = np.concatenate(values)
    assert values.size > 20000
    assert 0.11 < values.std() < 0.14
    assert 0.19 < values.mean() < 0.26


def test_noisy_vs_clean_psnr_matches_real_scans():
    for seed in range(4):
        noisy, clean = noisy_clean_pair(seed)
        assert 16 < psnr(noisy, clean) < 20


def test_clean_is_the_limit_of_averaged_displays():
    rng = np.random.default_rng(7)
    refl = phantom(rng, 32, 64)
    average = np.mean([speckle_image(refl, rng) for _ in range(400)], axis=0)
    diff = average - clean_image(refl)
    # Per-pixel standard error is ~0.007; a log-of-mean-intensity target
    # would be off by ~0.06 everywhere.
    assert np.abs(diff).max() < 0.035
    assert np.abs(diff).mean() < 0.008
    assert abs(diff.mean()) < 0.002


def test_clean_is_not_log_of_mean_intensity():
    refl = phantom(np.random.default_rng(0), 64, 64)
    log_of_mean = synthetic.display(mean_intensity(refl))
    assert np.mean(log_of_mean - clean_image(refl)) > 0.04


def test_unpaired_train_images_come_from_different_phantoms():
    ds = SyntheticOCT(n_train=4, n_test=2, height=64, width=128, seed=0)
    assert len(ds) == 4 and ds.n_test == 2
    behind_noisy = [clean_image(ds.reflectivity('noisy', i)) for i in range(4)]
    behind_test = [ds.test_pair(i)[1] for i in range(2)]
    for j in range(4):
        clean = ds.clean_train(j)
        assert clean.shape == (64, 128) and clean.dtype == np.float32
        for other in behind_noisy + behind_test:
            assert np.abs(clean - other).mean() > 0.01
    # The noisy training image really is a speckled view of its phantom.
    assert 16 < psnr(ds.noisy_train(0), behind_noisy[0]) < 20
    noisy, clean = ds.test_pair(1)
    assert np.array_equal(clean, clean_image(ds.reflectivity('test', 1)))
    with pytest.raises(IndexError):
        ds.noisy_train(4)
    with pytest.raises(IndexError):
        ds.test_pair(2)
