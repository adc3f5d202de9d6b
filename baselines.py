"""The classical baselines as plain functions, denoise(image, **params) -> image, and their specs.

Each spec (Baseline) names the method's parameters with their tuned defaults, the grid that
tuned them (`python BM3D.py --tune ...`, always on training subjects) and whether it reads the
B-scan's registered neighbours. The scripts BM3D.py, NLM.py, blur.py and BM4D.py are thin
command lines over these specs (scoring.baseline_main); denoise.py and the benchmarks call the
functions directly. All work on float32 2-D B-scans in [0, 1] (16-bit input keeps its precision)
and are single-threaded and deterministic.
"""
import functools
from dataclasses import dataclass

import bm3d
import bm4d
import cv2
import numpy as np
from scipy import ndimage
from skimage.restoration import estimate_sigma

from utils import at_lateral_scale, bin_laterally


@dataclass(frozen=True)
class Baseline:
    name: str                 # the results-table row and the default output folder img/<name>
    denoise: callable         # denoise(image, **params), or denoise(volume, **params) when volume
    params: dict              # {option: (tuned default, help)}; types follow the defaults
    tune_grid: dict           # {option: values} searched by --tune on the training split
    volume: bool = False      # reads the B-scan between its registered neighbours (datasets.Sample.volume)


# ---------------------------------------------------------------- the blur floor

# Chosen with `--tune` on the duke28 train split (subjects 1-10, never the test
# subjects 11-15): mean PSNR there 28.76 dB (noisy input 17.83 dB; BM3D.py 29.02 dB).
# The optimum is broad: sigma_lateral 12-20 px at sigma_axial 1-1.5 px all lie within
# 0.05 dB of it; the earlier 1.5 / 8 px gave 28.58 dB, sigma_axial 2 px <= 28.62 dB.
BLUR_SIGMA_AXIAL = 1.25    # Gaussian standard deviation along axis 0 (depth), pixels
BLUR_SIGMA_LATERAL = 16.0  # Gaussian standard deviation along axis 1 (lateral), pixels

BLUR_TUNE_GRID = {"sigma_axial": (1.0, 1.25, 1.5, 2.0), "sigma_lateral": (8.0, 12.0, 16.0, 20.0, 24.0)}


def blur_denoise(image, sigma_axial=BLUR_SIGMA_AXIAL, sigma_lateral=BLUR_SIGMA_LATERAL):
    """Anisotropic Gaussian blur (scipy.ndimage.gaussian_filter) of a float32 [0, 1] 2-D B-scan.

    Method: the "blur floor" every learned method must clear. Each B-scan is
    smoothed with a Gaussian of standard deviation sigma_axial pixels along axis 0
    (depth) and sigma_lateral pixels along axis 1 (lateral): OCT speckle grain is
    longer laterally than axially and the averaged references are smooth laterally,
    so the lateral kernel is much wider. Borders are reflected (scipy's 'reflect').
    No noise estimate, no adaptivity: whatever a denoiser gains over this row is what
    it does beyond low-pass filtering.
    """
    image = np.asarray(image, np.float32)
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D B-scan, got shape {image.shape}")
    out = ndimage.gaussian_filter(image, sigma=(sigma_axial, sigma_lateral), mode="reflect")
    return np.clip(out, 0.0, 1.0).astype(np.float32)


BLUR = Baseline("blur", blur_denoise,
                {"sigma_axial": (BLUR_SIGMA_AXIAL, "Gaussian sigma along depth (axis 0), pixels"),
                 "sigma_lateral": (BLUR_SIGMA_LATERAL, "Gaussian sigma along the lateral axis (axis 1), pixels")},
                BLUR_TUNE_GRID)


# ---------------------------------------------------------------- BM3D

# Chosen with `--tune` on the duke28 train split (subjects 1-10, never the test
# subjects 11-15): mean PSNR there 29.02 dB (noisy input 17.83 dB). PSNR is flat
# in sigma_factor 2-3.5 (+-0.02 dB); lateral_bin 2/3/4/6/8 gave 28.90/28.98/29.02/
# 29.05/29.06 dB. Full resolution (lateral_bin 1) is over the 12 s budget; wider bins
# than 4 gain < 0.1 dB here (as for NLM), so 4 stays: lateral sampling keeps shrinking.
BM3D_SIGMA_FACTOR = 2.5  # threshold sigma = sigma_factor * estimate_sigma(binned image)
BM3D_LATERAL_BIN = 4  # lateral binning factor before BM3D (1 = full resolution)

BM3D_TUNE_GRID = {"lateral_bin": (2, 3, 4, 6, 8), "sigma_factor": (2.0, 2.5, 3.0, 3.5)}


def bm3d_hard_threshold(image, sigma_factor):
    """BM3D hard-thresholding stage with sigma = sigma_factor * estimated noise sigma."""
    sigma = max(sigma_factor * float(estimate_sigma(image)), 1e-6)  # a flat image estimates 0
    profile = bm3d.BM3DProfile()
    profile.num_threads = 1
    return bm3d.bm3d(image, sigma, profile=profile, stage_arg=bm3d.BM3DStages.HARD_THRESHOLDING)


def bm3d_low_complexity(image, sigma_factor):
    """Both BM3D stages (hard thresholding, then Wiener) in the bm3d package's low-complexity profile, sigma =
    sigma_factor * estimated noise sigma: 3x faster than both stages of the default profile. A TCFL start
    option (--skip_bm3d_profile lc); BM3D.py keeps the hard-thresholding stage (see bm3d_denoise)."""
    sigma = max(sigma_factor * float(estimate_sigma(image)), 1e-6)
    profile = bm3d.BM3DProfileLC()
    profile.num_threads = 1
    return bm3d.bm3d(image, sigma, profile=profile)


def bm3d_denoise(image, sigma_factor=BM3D_SIGMA_FACTOR, lateral_bin=BM3D_LATERAL_BIN):
    """BM3D (the `bm3d` package) of a float32 [0, 1] 2-D B-scan.

    Method: the noise sigma of each image is estimated with skimage's
    estimate_sigma (wavelet MAD) and multiplied by sigma_factor: log-compressed
    speckle is heavier-tailed than Gaussian noise and the averaged references are
    smoother than any single scan, so the best threshold is well above the estimate.
    As for NLM, each B-scan is binned lateral_bin:1 along the lateral axis (OCT
    speckle grain is longer laterally and the references are smooth laterally),
    denoised, and resized back (linear interpolation); this also keeps BM3D within its
    time budget (< 12 s per 450 x 900 B-scan on one core: ~3.3 s CPU at lateral_bin 4,
    ~13 s at full resolution).
    Only the hard-thresholding stage runs: on the train split the Wiener stage
    lowered PSNR (it restores speckle-like texture the references do not have) and
    doubled the time. The package's default 'np' profile otherwise.
    """
    run = functools.partial(bm3d_hard_threshold, sigma_factor=sigma_factor)
    return np.clip(at_lateral_scale(run, np.asarray(image, np.float32), lateral_bin), 0.0, 1.0)


BM3D = Baseline("BM3D", bm3d_denoise,
                {"sigma_factor": (BM3D_SIGMA_FACTOR, "threshold sigma / estimated sigma"),
                 "lateral_bin": (BM3D_LATERAL_BIN, "lateral binning factor (1 = none)")},
                BM3D_TUNE_GRID)


# ---------------------------------------------------------------- non-local means

# Chosen with `--tune` on the duke28 train split (subjects 1-10, never the test
# subjects 11-15): mean PSNR there 28.92 dB (noisy input 17.83 dB). Wider bins gain
# < 0.1 dB on train (best: lateral_bin 8, h 15: 28.99 dB), so 4 stays: lateral
# sampling keeps shrinking. (On the validation B-scans 8:1 gains more: docs/training.md.)
NLM_H = 20  # filter strength in 8-bit grey levels (NORM_L2)
NLM_LATERAL_BIN = 4  # lateral binning factor before NLM (1 = full resolution)
TEMPLATE = 7       # patch side, pixels (OpenCV's recommended value)
SEARCH = 21        # search window side, pixels (OpenCV's recommended value)
# 16-bit path: NORM_L1 strength per unit of h. Forced through the 16-bit path,
# the train images score within 0.02 dB of the 8-bit path with this value
# (chosen from 160..280 at three (lateral_bin, h) settings).
H16_PER_LEVEL = 220.0

NLM_TUNE_GRID = {"lateral_bin": (1, 2, 3, 4, 6, 8), "h": (15, 20, 25, 30, 35, 40)}


def is_8bit(image):
    """True when every pixel is a multiple of 1/255, i.e. the image holds 8-bit data."""
    scaled = np.asarray(image, np.float64) * 255.0
    return bool(np.all(np.abs(scaled - np.round(scaled)) < 1e-3))


def nlm(image, h, template, search, eight_bit):
    """fastNlMeansDenoising of a float [0, 1] image, via uint8 (L2) or uint16 (L1)."""
    image = np.clip(image, 0.0, 1.0)
    if eight_bit:
        src = np.round(image * 255.0).astype(np.uint8)
        return cv2.fastNlMeansDenoising(src, None, h, template, search).astype(np.float32) / 255.0
    src = np.round(image * 65535.0).astype(np.uint16)
    out = cv2.fastNlMeansDenoising(src, h=[float(h) * H16_PER_LEVEL], templateWindowSize=template,
                                   searchWindowSize=search, normType=cv2.NORM_L1)
    return out.astype(np.float32) / 65535.0


def nlm_denoise(image, h=NLM_H, lateral_bin=NLM_LATERAL_BIN, template=TEMPLATE, search=SEARCH):
    """Non-local means (OpenCV fastNlMeansDenoising) of a float32 [0, 1] 2-D B-scan.

    Method: OCT speckle grain is longer laterally than axially and the averaged
    references are smooth laterally, so each B-scan is first binned lateral_bin:1
    along the lateral axis (pixel averaging), denoised with non-local means, and
    resized back (linear interpolation). This is also what keeps NLM within its time
    budget (< 0.3 s per 450 x 900 B-scan on one core: ~0.1 s CPU at lateral_bin 4,
    ~0.36 s at full resolution).

    8- and 16-bit data: OpenCV's fast NLM takes uint8 (NORM_L2 patch distance) or
    uint16 (NORM_L1 only). An image whose pixels are all multiples of 1/255 (i.e.
    came from 8-bit data) is denoised as uint8; anything else (16-bit or float input)
    goes through uint16 with NORM_L1 so it is not quantised to 256 levels. The L1
    strength is h * H16_PER_LEVEL, matched so that 16-bit copies of the train images
    score like the 8-bit path.
    """
    run = functools.partial(nlm, h=h, template=template, search=search, eight_bit=is_8bit(image))
    return np.clip(at_lateral_scale(run, image, lateral_bin), 0.0, 1.0)



NLM = Baseline("NLM", nlm_denoise,
               {"h": (NLM_H, "filter strength, 8-bit grey levels"),
                "lateral_bin": (NLM_LATERAL_BIN, "lateral binning factor (1 = none)"),
                "template": (TEMPLATE, "patch side (odd)"), "search": (SEARCH, "search window side (odd)")},
               {"lateral_bin": NLM_TUNE_GRID["lateral_bin"], "h": NLM_TUNE_GRID["h"]})


# ---------------------------------------------------------------- BM4D (5 B-scans)

# Chosen with `--tune` on the duke28 train split (subjects 1-10, never the test
# subjects 11-15): mean PSNR there 29.10 dB (noisy input 17.83 dB; BM3D.py 29.02 dB,
# blur.py 28.76 dB). PSNR is flat in sigma_factor 2-3 at lateral_bin 4 (29.09/29.10/29.08 dB
# at 2/2.5/3; 29.05, 28.95, 28.86 dB at 4, 6, 8); lateral_bin 2 was lower at every factor
# (28.97/28.96/28.94/28.90 dB at 2/2.5/3/4) and 2-3x slower. Single subjects differ
# (subject 1 peaks near factor 6), so the factor is the train mean's, not any one scan's.
BM4D_SIGMA_FACTOR = 2.5  # threshold sigma = SIGMA_FACTOR * estimate_sigma(central binned B-scan)
BM4D_LATERAL_BIN = 4     # lateral binning factor of every B-scan before BM4D (1 = full resolution)

BM4D_TUNE_GRID = {"lateral_bin": (2, 4), "sigma_factor": (2.0, 2.5, 3.0, 4.0)}


def bm4d_hard_threshold(volume, sigma_factor, centre):
    """BM4D hard-thresholding stage of a (n, H, W) volume, sigma = sigma_factor * estimated
    noise sigma of volume[centre]; returns the denoised volume[centre]."""
    sigma = max(sigma_factor * float(estimate_sigma(volume[centre])), 1e-6)  # a flat image estimates 0
    profile = bm4d.BM4DProfile()
    profile.num_threads = 1
    # bm4d takes (rows, columns, slices): the B-scans go last.
    out = bm4d.bm4d(np.moveaxis(volume, 0, -1), sigma, profile=profile, stage_arg=bm4d.BM4DStages.HARD_THRESHOLDING)
    return out[..., centre]


def bm4d_denoise(volume, sigma_factor=BM4D_SIGMA_FACTOR, lateral_bin=BM4D_LATERAL_BIN):
    """Float32 [0, 1] (n, H, W) stack of B-scans (the one to denoise in the middle, n odd) ->
    its denoised central B-scan, float32 [0, 1] (H, W): BM4D (the `bm4d` package).

    Method: as in BM3D.py, each B-scan of the volume is binned lateral_bin:1 along the lateral
    axis (OCT speckle grain is longer laterally and the references are smooth laterally),
    the noise sigma is estimated with skimage's estimate_sigma (wavelet MAD) on the central
    binned B-scan and multiplied by sigma_factor (log-compressed speckle is heavier-tailed
    than Gaussian noise and the averaged references are smoother than any single scan),
    the binned volume is denoised with BM4D's default 'np' profile (4 x 4 x 4 blocks, so every
    group spans 4 of the 5 B-scans), and the central B-scan is resized back (linear
    interpolation, utils.at_lateral_scale).
    Only the hard-thresholding stage runs: at lateral_bin 4 on the train split, adding the
    Wiener stage lowered PSNR (29.02 dB at sigma_factor 2.5, 28.86 dB at 1.5, against 29.10 dB;
    as for BM3D it restores speckle-like texture the references do not have) and tripled the
    time. The 8 x 8 x 1 profile (BM4DProfile2D: BM3D's blocks, grouped across the B-scans)
    scored 29.04 dB at sigma_factor 2.5 and took 4x as long.

    Time: ~20 s per 5 x 450 x 900 volume (binned to 5 x 450 x 225) on one core of the 2-core
    CPU while it was shared with two background jobs (21-32 s per volume with --workers 2).
    bm4d also spends a fixed 1-4 s of every call whatever the volume's size (set by its
    search window and FFT domain, not the image), so the built-in synthetic set (8 volumes
    of 5 x 256 x 256) takes ~40 s (4.4 s per volume).
    """
    volume = np.asarray(volume, np.float32)
    depth = bm4d.BM4DProfile.bs_ht[2]
    if volume.ndim != 3 or volume.shape[0] < depth:
        raise ValueError(f"expected a (n, H, W) stack of n >= {depth} B-scans, got shape {volume.shape}")
    centre = volume.shape[0] // 2

    def run(binned_centre):  # at_lateral_scale bins the central B-scan; the neighbours are binned alike
        binned = np.stack([binned_centre if k == centre else bin_laterally(bscan, lateral_bin)
                           for k, bscan in enumerate(volume)])
        return bm4d_hard_threshold(binned, sigma_factor, centre)

    return np.clip(at_lateral_scale(run, volume[centre], lateral_bin), 0.0, 1.0)


BM4D = Baseline("BM4D", bm4d_denoise,
                {"sigma_factor": (BM4D_SIGMA_FACTOR, "threshold sigma / estimated sigma of the central B-scan"),
                 "lateral_bin": (BM4D_LATERAL_BIN, "lateral binning factor (1 = none)")},
                BM4D_TUNE_GRID, volume=True)

CLASSICAL = {"blur": BLUR, "bm3d": BM3D, "nlm": NLM, "bm4d": BM4D}
