"""Small shared helpers: the error type, image quality metrics, lateral binning, the device."""

import numpy as np
from scipy import ndimage
from skimage.metrics import structural_similarity
from skimage.restoration import estimate_sigma


class DataError(Exception):
    """Bad user input: the scripts print it as one line and exit."""


# ---- image quality metrics ----
#
# All metrics take float images in [0, 1] as 2-D arrays, reference first,
# and return a python float.

_LAPLACIAN = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=np.float64)


def _check(ref, img):
    ref = np.asarray(ref, dtype=np.float64)
    img = np.asarray(img, dtype=np.float64)
    if ref.ndim != 2 or ref.shape != img.shape:
        raise ValueError(f"expected two 2-D images of the same shape, got ref {ref.shape} and img {img.shape}")
    return ref, img


def psnr(ref, img):
    """PSNR = 10 * log10(1 / MSE) in dB; inf for identical images.

    The data range is fixed at 1.0 (not the max of the images) so that values
    are comparable across images and papers.
    """
    ref, img = _check(ref, img)
    mse = np.mean((ref - img) ** 2)
    if mse == 0:
        return float("inf")
    return float(10 * np.log10(1.0 / mse))


def ssim(ref, img):
    """SSIM = skimage structural_similarity(ref, img, data_range=1.0).

    skimage defaults: 7x7 uniform window, sample covariance, K1=0.01, K2=0.03.
    """
    ref, img = _check(ref, img)
    return float(structural_similarity(ref, img, data_range=1.0))


def gcmse(ref, img, kappa=0.5):
    """Gradient conduction MSE (Lopez-Randulfe et al. 2017), lower is better.

    From the reference only: forward differences dS = ref[i+1, j] - ref[i, j]
    and dE = ref[i, j+1] - ref[i, j]; Perona-Malik conduction (option 1)
    cS = exp(-(dS / kappa)^2), cE likewise, set to 1 on the last row/column
    where there is no neighbour; cN[i, j] = cS[i-1, j] and cW[i, j] = cE[i, j-1]
    (1 on the first row/column). C = clip((cN + cS + cE + cW) / 4, 0, 1),
    G = 1 - C and

        GCMSE = numel * sum((G * (ref - img))^2) / sum(G).

    No cropping, so the value scales with image size. A perfectly flat
    reference has no edges (G == 0 everywhere); then every pixel is weighted
    equally (G = 1), which gives the plain sum of squared errors.
    """
    ref, img = _check(ref, img)
    c_s = np.ones_like(ref)
    c_e = np.ones_like(ref)
    c_s[:-1, :] = np.exp(-((np.diff(ref, axis=0) / kappa) ** 2))
    c_e[:, :-1] = np.exp(-((np.diff(ref, axis=1) / kappa) ** 2))
    c_n = np.ones_like(ref)
    c_w = np.ones_like(ref)
    c_n[1:, :] = c_s[:-1, :]
    c_w[:, 1:] = c_e[:, :-1]
    g = 1.0 - np.clip((c_n + c_s + c_e + c_w) / 4, 0.0, 1.0)
    g_sum = g.sum()
    if g_sum == 0:
        return float(np.sum((ref - img) ** 2))
    return float(ref.size * np.sum((g * (ref - img)) ** 2) / g_sum)


def epi(ref, img):
    """Edge preservation index (Sattar et al. 1997), <= 1, higher is better.

    dr, di = Laplacian(ref), Laplacian(img) with the 3x3 kernel
    [[0, 1, 0], [1, -4, 1], [0, 1, 0]] (scipy.ndimage.convolve, mode
    'reflect', identical to 'nearest' for a 3x3 kernel), each minus its mean;

        EPI = sum(dr * di) / sqrt(sum(dr^2) * sum(di^2)).

    Identical images give 1.0. If either image has no Laplacian energy (e.g.
    flat) and they are not identical, no edge is preserved: 0.0.
    """
    ref, img = _check(ref, img)
    if np.array_equal(ref, img):
        return 1.0
    dr = ndimage.convolve(ref, _LAPLACIAN, mode="reflect")
    di = ndimage.convolve(img, _LAPLACIAN, mode="reflect")
    # With 'reflect' (Neumann) borders a Laplacian already sums to ~0; the
    # means are removed anyway to follow Sattar's definition.
    dr -= dr.mean()
    di -= di.mean()
    denom = np.sqrt(np.sum(dr**2) * np.sum(di**2))
    if denom == 0:
        return 0.0
    return float(np.sum(dr * di) / denom)


def epi_v(ref, img):
    """Axial (vertical, axis 0) gradient ratio, 1 is ideal, < 1 means smoothing:

        EPI_v = sum|img[1:] - img[:-1]| / sum|ref[1:] - ref[:-1]|.

    If the reference has no axial gradient: 1.0 when the image has none
    either, else inf.
    """
    ref, img = _check(ref, img)
    num = np.sum(np.abs(np.diff(img, axis=0)))
    den = np.sum(np.abs(np.diff(ref, axis=0)))
    if den == 0:
        return 1.0 if num == 0 else float("inf")
    return float(num / den)


METRICS = {"PSNR": psnr, "SSIM": ssim, "GCMSE": gcmse, "EPI": epi, "EPI_v": epi_v}


# ---- no-reference metrics on regions of interest (datasets.read_rois) ----
#
# On the denoised image alone, any intensity scale; std with the N-1 denominator, as in
# Abbasi et al.'s package. Rectangles are (x, y, width, height), 0-based, x = column.

ROI_METRICS = ("MSR", "CNR", "ENL")


def _region(image, rect):
    x, y, width, height = rect
    values = np.asarray(image, np.float64)[y:y + height, x:x + width]
    if values.size < 2 or values.shape != (height, width):
        raise ValueError(f"region {rect} does not lie inside the {image.shape[0]} x {image.shape[1]} image")
    return values.mean(), values.std(ddof=1)


def roi_metrics(image, rois):
    """{"MSR", "CNR", "ENL"} of an image for rois {"foreground": [rect...], "background": [rect]}.

    MSR = mean_j(m_j / s_j) over the foreground regions; with m_f, s_f the means of their means
    and stds and m_b, s_b the background's: CNR = |m_f - m_b| / sqrt((s_f^2 + s_b^2) / 2) and
    ENL = m_b^2 / s_b^2. A region with zero spread gives inf (perfectly flat).
    """
    fore = np.array([_region(image, rect) for rect in rois["foreground"]])
    back_mean, back_std = np.mean([_region(image, rect) for rect in rois["background"]], axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        msr = float(np.mean(fore[:, 0] / fore[:, 1]))
        fore_mean, fore_std = fore.mean(axis=0)
        cnr = float(abs(fore_mean - back_mean) / np.sqrt((fore_std ** 2 + back_std ** 2) / 2))
        enl = float(back_mean ** 2 / back_std ** 2)
    return {"MSR": msr, "CNR": cnr, "ENL": enl}


def all_metrics(ref, img):
    """{name: metric(ref, img)} for every metric in METRICS."""
    ref, img = _check(ref, img)
    return {name: fn(ref, img) for name, fn in METRICS.items()}


# ---- image helpers ----

def noise_sigma(image):
    """The noise standard deviation of a 2-D image: skimage's wavelet (MAD) estimate, as BM3D.py's threshold uses."""
    return float(estimate_sigma(np.asarray(image, np.float32)))


def context_stack(slices, centre, neighbours):
    """(1 + neighbours, H, W): slices[centre] followed by its `neighbours` nearest slices, nearest first (the
    earlier one of two at the same distance first), then copies of slices[centre] where fewer exist: the
    input of a network trained with train.py --neighbours (copies are its single-B-scan fallback)."""
    others = sorted((i for i in range(len(slices)) if i != centre), key=lambda i: (abs(i - centre), i))[:neighbours]
    return np.stack([slices[centre]] + [slices[i] for i in others] + [slices[centre]] * (neighbours - len(others)))


def check_lateral_bin(factor):
    """The one check of a lateral binning factor (train.py, the Denoiser, the baselines): a whole number >= 1."""
    if int(factor) != factor or factor < 1:
        raise DataError(f"--lateral_bin must be a whole number >= 1 (1: full resolution), got {factor}")
    return int(factor)


def bin_laterally(image, factor):
    """image (H, W) averaged factor:1 along the lateral (last) axis: (H, round(W / factor)); factor 1: image.
    A stack (C, H, W) is binned slice by slice."""
    import cv2
    if factor <= 1:
        return image
    if image.ndim == 3:
        return np.stack([bin_laterally(plane, factor) for plane in image])
    height, width = image.shape
    return cv2.resize(np.ascontiguousarray(image, np.float32), (max(1, round(width / factor)), height),
                      interpolation=cv2.INTER_AREA)


def at_lateral_scale(fn, image, factor):
    """fn(image binned factor:1 laterally), resized back to the image's size.

    OCT speckle grain is longer laterally than axially and averaged references are
    smooth laterally, so the classical baselines denoise a laterally binned B-scan
    (and train.py --lateral_bin trains and denoises the same way).
    """
    import cv2
    if factor <= 1:
        return fn(image).astype(np.float32)
    height, width = image.shape[-2:]  # fn may take a (C, H, W) stack and return one (H, W) image
    return cv2.resize(fn(bin_laterally(image, factor)).astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)


def resolve_device(name):
    """--device auto | cpu | cuda -> torch.device; cuda asked for but absent is one clear error."""
    import torch
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda: no CUDA device is available")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def bf16_is_native(device):
    """Whether the hardware computes in bfloat16: Ampere+ GPUs, or CPUs with AVX512-BF16 or AMX.

    oneDNN accepts bf16 on any AVX-512 CPU (torch.ops.mkldnn._is_mkldnn_bf16_supported() says
    yes) but emulates it there, 3-200x slower than fp32 (bench/train_speed.py's probe), so
    the CPU's instruction set is asked instead."""
    import torch
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without the probes: assume emulated
        return False


def use_bf16(precision, device):
    """--precision auto | fp32 | bf16 -> whether to run under bf16 autocast; auto: where it is native."""
    return precision == "bf16" or (precision == "auto" and bf16_is_native(device))
