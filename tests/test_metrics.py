"""Image quality metrics: hand-computed values on tiny arrays, identities,
input validation, and a self-check on the real Duke test split."""

import math
from pathlib import Path

import numpy as np
import pytest

from utils import METRICS, all_metrics, epi, epi_v, gcmse, psnr, roi_metrics, ssim

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "duke_bioptigen"
Q = math.exp(-4)  # Perona-Malik conduction of a unit step with kappa = 0.5: exp(-(1/0.5)^2)


def textured(shape=(16, 16), seed=0):
    return np.random.default_rng(seed).random(shape)


# ---- PSNR ----

def test_psnr_by_hand():
    # one pixel off by 0.1 in a 2x2: MSE = 0.01 / 4 = 0.0025, PSNR = 10 log10(400) = 26.0206 dB
    # (a data range of max(images) = 0.1 would give 6.02 dB instead)
    ref = np.zeros((2, 2))
    img = np.array([[0.1, 0.0], [0.0, 0.0]])
    assert psnr(ref, img) == pytest.approx(26.020599913, abs=1e-6)
    # every pixel off by 0.5: MSE = 0.25, PSNR = 10 log10(4) = 6.0206 dB
    assert psnr(np.full((2, 2), 0.5), np.ones((2, 2))) == pytest.approx(6.020599913, abs=1e-6)


def test_psnr_identical_is_inf():
    x = textured()
    assert psnr(x, x.copy()) == float("inf")


# ---- SSIM ----
# A 7x7 image is exactly one 7x7 window: skimage keeps only the centre pixel, so
# SSIM = (2 mx my + C1)(2 sxy + C2) / ((mx^2 + my^2 + C1)(sx^2 + sy^2 + C2))
# with global statistics, sample (co)variance (/48), C1 = 0.01^2, C2 = 0.03^2.

def test_ssim_by_hand_luminance():
    # flat 0.5 vs flat 0.7: all variances 0, so the contrast term is C2/C2 = 1 and
    # SSIM = (2*0.5*0.7 + 1e-4) / (0.25 + 0.49 + 1e-4) = 0.7001 / 0.7401
    assert ssim(np.full((7, 7), 0.5), np.full((7, 7), 0.7)) == pytest.approx(0.7001 / 0.7401, rel=1e-6)


def test_ssim_by_hand_inverted():
    # ref = 0.5 except 0.74 and 0.26: mean 24.5/49 = 0.5, var = 2*0.24^2/48 = 0.0024.
    # img = 1 - ref: same mean and variance, cov = -0.0024; luminance term = 1, so
    # SSIM = (-0.0048 + 0.0009) / (0.0048 + 0.0009) = -0.0039 / 0.0057 = -13/19
    ref = np.full((7, 7), 0.5)
    ref[0, 0], ref[0, 1] = 0.74, 0.26
    assert ssim(ref, 1 - ref) == pytest.approx(-13 / 19, rel=1e-6)


def test_ssim_identical_is_one():
    x = textured()
    assert ssim(x, x.copy()) == pytest.approx(1.0, abs=1e-12)


# ---- GCMSE ----

def test_gcmse_by_hand_2x2():
    # ref = [[0, 0], [0, 1]], q = exp(-4).
    #   S (down)  = [[1, q], [1, 1]]   last row has no neighbour -> 1
    #   E (right) = [[1, 1], [q, 1]]   last column -> 1
    #   N = S shifted down  = [[1, 1], [1, q]]   first row -> 1
    #   W = E shifted right = [[1, 1], [1, q]]   first column -> 1
    #   G = 1 - mean = [[0, (1-q)/4], [(1-q)/4, (1-q)/2]], sum(G) = 1 - q
    # img = 0: error 1 at (1, 1) only -> GCMSE = 4 * ((1-q)/2)^2 / (1-q) = 1 - q
    ref = np.array([[0.0, 0.0], [0.0, 1.0]])
    assert gcmse(ref, np.zeros((2, 2))) == pytest.approx(1 - Q, rel=1e-9)
    # error 0.1 at (0, 1) only -> GCMSE = 4 * 0.01 * ((1-q)/4)^2 / (1-q) = 0.0025 (1 - q)
    img = ref.copy()
    img[0, 1] = 0.1
    assert gcmse(ref, img) == pytest.approx(0.0025 * (1 - Q), rel=1e-9)


@pytest.mark.parametrize("transpose", [False, True])
def test_gcmse_by_hand_border_direction(transpose):
    # ref = column [0, 0, 1] (or the row, for E/W): S = [1, q, 1], N = [1, 1, q],
    # E = W = 1, so G = [0, (1-q)/4, (1-q)/4], sum(G) = (1-q)/2.
    # Shifting N/W the wrong way would give G = [(1-q)/4, (1-q)/4, 0] instead.
    def f(v):
        a = np.array(v, dtype=float)[:, None]
        return a.T if transpose else a

    ref = f([0, 0, 1])
    # error only at the first pixel, where G = 0
    assert gcmse(ref, f([0.5, 0, 1])) == pytest.approx(0.0, abs=1e-15)
    # error 1 at the last pixel: 3 * ((1-q)/4)^2 / ((1-q)/2) = 3 (1-q) / 8
    assert gcmse(ref, f([0, 0, 0])) == pytest.approx(3 * (1 - Q) / 8, rel=1e-9)
    # errors 0.5 at the first two pixels: 3 * 0.25 * ((1-q)/4)^2 / ((1-q)/2) = 3 (1-q) / 32
    assert gcmse(ref, f([0.5, 0.5, 1])) == pytest.approx(3 * (1 - Q) / 32, rel=1e-9)


def test_gcmse_flat_reference_falls_back_to_sum_of_squares():
    ref = np.zeros((2, 2))
    img = np.array([[0.1, 0.0], [0.0, 0.2]])
    assert gcmse(ref, img) == pytest.approx(0.01 + 0.04, rel=1e-12)
    assert gcmse(ref, ref.copy()) == 0.0


def test_gcmse_identical_is_zero():
    x = textured()
    assert gcmse(x, x.copy()) == 0.0


# ---- EPI (Sattar) ----

def test_epi_by_hand():
    # 3x3, Laplacian [[0,1,0],[1,-4,1],[0,1,0]], 'reflect' border (edge pixel repeated):
    # ref = centre 1 -> Lr = [[0, 1, 0], [1, -4, 1], [0, 1, 0]], mean 0
    # img = corner (0,0) 1 -> Li = [[-2, 1, 0], [1, 0, 0], [0, 0, 0]], mean 0
    #   (at (0,0): up 1 + left 1 (reflected) + 0 + 0 - 4 = -2)
    # sum(Lr*Li) = 1 + 1 = 2, sum(Lr^2) = 20, sum(Li^2) = 6 -> EPI = 2 / sqrt(120) = 1/sqrt(30)
    ref = np.zeros((3, 3))
    ref[1, 1] = 1
    img = np.zeros((3, 3))
    img[0, 0] = 1
    assert epi(ref, img) == pytest.approx(1 / math.sqrt(30), rel=1e-9)


def test_epi_invariances_and_flat():
    x = textured()
    assert epi(x, x.copy()) == 1.0
    # gain and offset change neither the mean-removed Laplacian's direction
    assert epi(x, 0.5 * x + 0.2) == pytest.approx(1.0, abs=1e-12)
    assert epi(x, 1 - x) == pytest.approx(-1.0, abs=1e-12)
    # a flat image preserves no edge
    assert epi(x, np.full_like(x, 0.3)) == 0.0


# ---- EPI_v (axial gradient ratio) ----

def test_epi_v_by_hand():
    # axial (axis 0) |diffs|: ref [[0,0],[1,1]] -> 1 + 1 = 2; img [[0,0],[0.5,0.25]] -> 0.75
    # EPI_v = 0.75 / 2 = 0.375 (along axis 1 the reference has no gradient at all)
    ref = np.array([[0.0, 0.0], [1.0, 1.0]])
    img = np.array([[0.0, 0.0], [0.5, 0.25]])
    assert epi_v(ref, img) == pytest.approx(0.375, rel=1e-12)


def test_epi_v_identical_and_flat_reference():
    x = textured()
    assert epi_v(x, x.copy()) == 1.0
    flat = np.zeros((2, 2))
    assert epi_v(flat, np.full((2, 2), 0.3)) == 1.0
    assert epi_v(flat, np.array([[0.0, 0.0], [1.0, 0.0]])) == float("inf")


# ---- interface ----

def test_all_metrics_names_and_types():
    assert list(METRICS) == ["PSNR", "SSIM", "GCMSE", "EPI", "EPI_v"]
    x = textured()
    y = np.clip(x + 0.05 * textured(seed=1), 0, 1)
    out = all_metrics(x, y)
    assert list(out) == list(METRICS)
    assert all(type(v) is float for v in out.values())
    assert out["PSNR"] == psnr(x, y)


@pytest.mark.parametrize("fn", [*METRICS.values(), all_metrics])
def test_shape_mismatch_raises(fn):
    with pytest.raises(ValueError, match=r"\(8, 9\).*\(9, 8\)"):
        fn(np.zeros((8, 9)), np.zeros((9, 8)))
    with pytest.raises(ValueError, match=r"\(8, 8, 1\)"):
        fn(np.zeros((8, 8, 1)), np.zeros((8, 8, 1)))


# ---- ROI metrics (MSR, CNR, ENL) ----

def test_roi_metrics_by_hand():
    # Foreground regions: [1, 3] (mean 2, std sqrt(2)) and [4, 4, 6, 6] (mean 5, std sqrt(4/3));
    # background [0, 2] (mean 1, std sqrt(2)); stds with the N-1 denominator.
    image = np.zeros((2, 6))
    image[0, 0:2] = [1, 3]
    image[:, 2:4] = [[4, 4], [6, 6]]
    image[0, 4:6] = [0, 2]
    rois = {"foreground": [(0, 0, 2, 1), (2, 0, 2, 2)], "background": [(4, 0, 2, 1)]}
    got = roi_metrics(image, rois)
    s1, s2 = math.sqrt(2), math.sqrt(4 / 3)
    assert got["MSR"] == pytest.approx((2 / s1 + 5 / s2) / 2)
    s_f = (s1 + s2) / 2
    assert got["CNR"] == pytest.approx(abs(3.5 - 1) / math.sqrt((s_f ** 2 + 2) / 2))
    assert got["ENL"] == pytest.approx(1 / 2)


def test_roi_metrics_ignore_intensity_scale_and_reject_regions_outside():
    image = textured((20, 30)) + 0.5
    rois = {"foreground": [(2, 3, 5, 4), (10, 10, 6, 5)], "background": [(20, 1, 8, 6)]}
    plain, scaled = roi_metrics(image, rois), roi_metrics(3 * image, rois)
    assert plain == pytest.approx(scaled)
    with pytest.raises(ValueError, match="inside"):
        roi_metrics(image, {"foreground": [(25, 0, 10, 4)], "background": [(0, 0, 4, 4)]})


def test_roi_metrics_of_published_mifcn_outputs_match_the_literature():
    # Check values of the data's README: MIFCN's outputs on subjects 11-15 average
    # MSR 8.83, CNR 3.97, ENL 2278 (Abbasi et al.'s package).
    outputs = DATA.parent / "published_outputs" / "MIFCN"
    if not outputs.is_dir():
        pytest.skip(f"published outputs not found at {outputs}")
    import datasets
    rois = datasets.read_rois(DATA)
    values = [roi_metrics(datasets.read_image(outputs / f"{n}.tif")[0], rois[str(n)]) for n in range(11, 16)]
    mean = {k: np.mean([v[k] for v in values]) for k in values[0]}
    assert mean["MSR"] == pytest.approx(8.83, rel=0.01 / 8.83)
    assert mean["CNR"] == pytest.approx(3.97, rel=0.01 / 3.97)
    assert mean["ENL"] == pytest.approx(2278, rel=1e-3)


# ---- real data ----

def test_duke_noisy_vs_average_self_check():
    # mean over test subjects 11-15 of noisy (test.tif) vs average.tif, from an
    # independent implementation: PSNR 17.64 dB, SSIM 0.086, GCMSE 70.2
    if not DATA.is_dir():
        pytest.skip(f"Duke Bioptigen data not found at {DATA}")
    tifffile = pytest.importorskip("tifffile")
    vals = []
    for n in range(11, 16):
        ref = tifffile.imread(DATA / str(n) / "average.tif") / 255.0
        img = tifffile.imread(DATA / str(n) / "test.tif") / 255.0
        vals.append([psnr(ref, img), ssim(ref, img), gcmse(ref, img)])
    m_psnr, m_ssim, m_gcmse = np.mean(vals, axis=0)
    assert m_psnr == pytest.approx(17.64, abs=0.01)
    assert m_ssim == pytest.approx(0.086, abs=0.002)
    assert m_gcmse == pytest.approx(70.2, abs=0.2)
