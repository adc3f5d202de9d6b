"""Synthetic retinal OCT B-scans with physically modelled speckle.

Phantom: a linear reflectivity map of a retina (nine layers between smooth
random boundaries, a foveal dip, dark vitreous above, an attenuating textured
choroid below, optional vessel shadows).

Imaging: each scatterer returns a circular complex Gaussian amplitude scaled
by sqrt(reflectivity + noise floor); the coherent sum seen by one pixel is
that field blurred by an anisotropic Gaussian PSF. The intensity |field|^2 is
therefore exponentially distributed with mean m = (reflectivity + floor)
convolved with |psf|^2 (fully developed speckle, coefficient of variation 1),
and the display maps 10*log10(intensity) over DYNAMIC_RANGE_DB onto [0, 1].

Clean target: what averaging many registered noisy B-scans converges to, i.e.
E[display(m * E)] with E ~ Exp(1), which is the log of the mean intensity
lowered by 2.5 dB (Euler's gamma) and reshaped by the clipping. It has the
closed form c * (E1(e0) - E1(e1)) (E1 = exponential integral, e0/e1 = speckle
values at which the display clips), so no Monte Carlo is needed.

Calibration: 10*log10(Exp(1)) has a std of 5.57 dB. Real Duke B-scans show
0.14-0.15 display std inside tissue, 31-33 grey levels (0.125) in background
where ~7% of pixels are clipped to black: both fit a 38 dB display range
(the nominal "about 45 dB" would give only 0.11 in background) and give a
noisy-vs-clean PSNR of about 17.5 dB.
"""
import numpy as np
from scipy import ndimage, special

DYNAMIC_RANGE_DB = 38.0
# Intensity (dB relative to RPE reflectivity 1) displayed as white: puts the
# RPE near 0.8 and the nerve fibre layer near 0.65, as in real scans.
DISPLAY_TOP_DB = 5.0
# Detection noise power relative to the RPE; puts signal-free background at
# ~0.23 of the display (Duke deep background: 53-63 grey levels).
NOISE_FLOOR = 10 ** (-22.0 / 10)
# Faint vitreous haze: real vitreous sits slightly above the deep background.
VITREOUS_REFLECTIVITY = 0.5 * NOISE_FLOOR
# Amplitude PSF std in pixels (axial, lateral): grain of a few pixels,
# elongated laterally like the coarser lateral resolution of real OCT.
PSF_SIGMA = (0.7, 1.2)

# (reflectivity, thickness as a fraction of image height, foveal thinning)
# from the inner limiting membrane down to Bruch's membrane. Negative
# thinning means the layer thickens in the fovea (outer nuclear layer).
RETINAL_LAYERS = (
    (0.25, 0.030, 1.00),   # nerve fibre layer
    (0.05, 0.030, 0.95),   # ganglion cell layer
    (0.10, 0.028, 0.90),   # inner plexiform layer
    (0.025, 0.030, 0.80),  # inner nuclear layer
    (0.08, 0.020, 0.60),   # outer plexiform layer
    (0.010, 0.060, -0.40),  # outer nuclear layer
    (0.45, 0.010, 0.0),    # ellipsoid zone
    (0.06, 0.012, 0.0),    # photoreceptor outer segments
    (1.00, 0.020, 0.0),    # retinal pigment epithelium
)
CHOROID_REFLECTIVITY = 0.12
# Round-trip attenuation per image height in retina and choroid; the choroid
# value makes it fade into the noise floor 15-20% of the height below the RPE.
ATTENUATION = (1.5, 18.0)


def _psf_kernels():
    """1-D amplitude kernels with unit energy, so |psf|^2 sums to 1."""
    kernels = []
    for sigma in PSF_SIGMA:
        radius = int(np.ceil(4 * sigma))
        k = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma ** 2))
        kernels.append(k / np.sqrt(np.sum(k ** 2)))
    return kernels


_KERNELS = _psf_kernels()


def _smooth_curve(rng, n, n_modes=5):
    """Random low-frequency curve on n points, roughly unit amplitude."""
    x = np.arange(n) / n
    k = np.arange(1, n_modes + 1)
    amp = rng.normal(size=n_modes) / k
    phase = rng.uniform(0, 2 * np.pi, n_modes)
    return (amp[:, None] * np.cos(np.pi * k[:, None] * x + phase[:, None])).sum(0)


def _smooth_field(rng, shape, sigma):
    f = ndimage.gaussian_filter(rng.normal(size=shape), sigma, truncate=3.0)
    return f / (f.std() + 1e-12)


def _below(y, boundary):
    """Fraction of each pixel lying below a boundary (anti-aliased edges)."""
    return np.clip(y + 0.5 - boundary[None, :], 0.0, 1.0)


def phantom(rng, height, width, vessels=True):
    """Linear reflectivity map (float64, > 0) of a random retina."""
    H, W = height, width
    x = np.arange(W) / W
    y = np.arange(H, dtype=np.float64)[:, None]
    fovea = rng.uniform(0.35, 0.65)
    dip = np.exp(-(x - fovea) ** 2 / (2 * rng.uniform(0.04, 0.07) ** 2))

    # The RPE is a smooth tilted bowl; layers stack upwards from it, so the
    # foveal pit in the inner surface comes from the thinning inner layers.
    rpe_bottom = H * (rng.uniform(0.30, 0.40) + rng.uniform(-0.06, 0.06) * (x - 0.5)
                      - rng.uniform(0.0, 0.25) * (x - fovea) ** 2
                      + 0.008 * _smooth_curve(rng, W))
    scale = rng.uniform(0.85, 1.15)
    boundaries = [rpe_bottom]
    for _, frac, thinning in reversed(RETINAL_LAYERS):
        jitter = np.clip(1 + 0.15 * _smooth_curve(rng, W), 0.5, 1.5)
        t = H * frac * scale * jitter * (1 - thinning * dip)
        boundaries.insert(0, boundaries[0] - np.maximum(t, 0.05))
    ilm = boundaries[0]

    refl = np.zeros((H, W))
    for i, (r, _, _) in enumerate(RETINAL_LAYERS):
        refl += r * (_below(y, boundaries[i]) - _below(y, boundaries[i + 1]))
    # Lateral texture inside layers so the clean image is not piecewise flat.
    refl *= np.exp(0.15 * _smooth_field(rng, (H, W), (0.5, 0.02 * W + 1)))
    refl += VITREOUS_REFLECTIVITY * (1 - _below(y, ilm))

    # Choroid: lognormal stroma with soft-edged dark vessel lumens.
    stroma = np.exp(0.6 * _smooth_field(rng, (H, W), (0.006 * H + 1, 0.004 * W + 1)))
    lumen = _smooth_field(rng, (H, W), (0.015 * H + 1, 0.015 * W + 1))
    lumen = 1 - 0.85 / (1 + np.exp(-4 * (lumen - 0.9)))
    refl += CHOROID_REFLECTIVITY * stroma * lumen * _below(y, rpe_bottom)

    depth_retina = np.clip(y - ilm, 0, None) - np.clip(y - rpe_bottom, 0, None)
    depth_choroid = np.clip(y - rpe_bottom, 0, None)
    refl *= np.exp(-(ATTENUATION[0] * depth_retina + ATTENUATION[1] * depth_choroid) / H)

    if vessels:
        # Retinal vessels in the inner retina absorb light: a reflective
        # vessel wall with a shadow cast on everything beneath it.
        for _ in range(rng.integers(0, 2 + W // 128)):
            xv = rng.uniform(0, W)
            half = rng.uniform(0.004, 0.008) * W + 1
            yv = ilm[int(xv)] + rng.uniform(0.01, 0.03) * H
            profile = np.exp(-(np.arange(W) - xv) ** 2 / (2 * half ** 2))
            shadow = 1 - rng.uniform(0.5, 0.85) * profile * _below(y, np.full(W, yv + half))
            refl *= shadow
            refl += 0.2 * profile * np.exp(-(y - yv) ** 2 / (2 * (0.7 * half) ** 2))

    return np.maximum(refl, 1e-12)


def _blur(a, kernels):
    for axis, k in zip((-2, -1), kernels):
        a = ndimage.correlate1d(a, k, axis=axis, mode='reflect')
    return a


def mean_intensity(reflectivity):
    """Expected speckle intensity: (reflectivity + floor) * |psf|^2."""
    return _blur(np.asarray(reflectivity, np.float64) + NOISE_FLOOR,
                 [k ** 2 for k in _KERNELS])


def speckle_intensity(reflectivity, rng):
    """One linear-intensity speckle realization of a reflectivity map."""
    r = np.asarray(reflectivity, np.float64) + NOISE_FLOOR
    # Pad before drawing the scatterers so the border pixels see independent
    # scatterers whose power matches mean_intensity's 'reflect' boundary.
    pads = [(len(k) // 2,) * 2 for k in _KERNELS]
    amp = np.sqrt(np.pad(r, pads, mode='symmetric') / 2)
    field = amp * rng.standard_normal((2,) + amp.shape)  # real, imaginary
    field = _blur(field, _KERNELS)
    (pa, _), (pl, _) = pads
    field = field[:, pa:pa + r.shape[0], pl:pl + r.shape[1]]
    return field[0] ** 2 + field[1] ** 2


def display(intensity):
    """Log compression of linear intensity to a [0, 1] B-scan display."""
    db = 10 * np.log10(np.maximum(intensity, 1e-30))
    return np.clip(1 + (db - DISPLAY_TOP_DB) / DYNAMIC_RANGE_DB, 0, 1).astype(np.float32)


def speckle_image(reflectivity, rng):
    """Noisy display image (float32 in [0, 1])."""
    return display(speckle_intensity(reflectivity, rng))


def _expected_display(db):
    """E[display(m * E)], E ~ Exp(1), for a mean intensity of `db` decibels."""
    c = 10 / (np.log(10) * DYNAMIC_RANGE_DB)  # display units per neper
    a = 1 + (db - DISPLAY_TOP_DB) / DYNAMIC_RANGE_DB
    # Speckle values at which the display reaches 0 and 1; between them the
    # display is linear in log(E), whose truncated mean is an E1 difference.
    e0 = np.exp(np.clip(-a / c, -700, 700))
    e1 = np.exp(np.clip((1 - a) / c, -700, 700))
    return c * (special.exp1(e0) - special.exp1(e1))


# exp1 is slow on whole images; a 0.01 dB table is exact to ~3e-8 and spans
# mean intensities from far below black to far above white.
_TABLE_DB = np.arange(DISPLAY_TOP_DB - DYNAMIC_RANGE_DB - 30, DISPLAY_TOP_DB + 40, 0.01)
_TABLE = _expected_display(_TABLE_DB)


def clean_image(reflectivity):
    """Expected display image: the limit of averaging noisy displays."""
    db = 10 * np.log10(mean_intensity(reflectivity))
    return np.clip(np.interp(db, _TABLE_DB, _TABLE), 0, 1).astype(np.float32)


def noisy_clean_pair(seed, height=256, width=256):
    """(noisy, clean) float32 images of the same random phantom."""
    rng = np.random.default_rng(seed)
    refl = phantom(rng, height, width)
    return speckle_image(refl, rng), clean_image(refl)


class SyntheticOCT:
    """Unpaired noisy / clean training images and paired test images.

    Every image comes from its own phantom seeded by (seed, split, index), so
    noisy and clean training images never share a phantom and any image can
    be regenerated on demand without storing the set.
    """
    SPLITS = ('noisy', 'clean', 'test')

    def __init__(self, n_train=64, n_test=8, height=256, width=256, seed=0):
        self.n_train, self.n_test = n_train, n_test
        self.height, self.width, self.seed = height, width, seed

    def __len__(self):
        return self.n_train

    def _rng(self, split, i):
        n = self.n_test if split == 'test' else self.n_train
        if not 0 <= i < n:
            raise IndexError(f'{split} index {i} out of range [0, {n})')
        return np.random.default_rng((self.seed, self.SPLITS.index(split), int(i)))

    def reflectivity(self, split, i):
        """The phantom behind image i of a split ('noisy', 'clean', 'test')."""
        return phantom(self._rng(split, i), self.height, self.width)

    def noisy_train(self, i):
        rng = self._rng('noisy', i)
        return speckle_image(phantom(rng, self.height, self.width), rng)

    def clean_train(self, i):
        return clean_image(self.reflectivity('clean', i))

    def test_neighbours(self, i, count=4):
        """Further noisy B-scans of test phantom i (independent speckle), like registered repeats."""
        refl = self.reflectivity('test', i)
        return [speckle_image(refl, np.random.default_rng((self.seed, 3, int(i), k))) for k in range(count)]

    def test_pair(self, i):
        rng = self._rng('test', i)
        refl = phantom(rng, self.height, self.width)
        return speckle_image(refl, rng), clean_image(refl)
