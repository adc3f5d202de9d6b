"""Anisotropic Gaussian blur baseline (scipy.ndimage.gaussian_filter), scored like every other method.

    python blur.py                                       # built-in synthetic test set
    python blur.py --dataset duke28 --data_root ../shared/data/duke_bioptigen --split test \
        --workers 2 --json bench/results/blur_duke28_test.json
    python blur.py --dataset duke28 --data_root ../shared/data/duke_bioptigen --split train --tune --workers 2

Denoised images go to img/blur/<id>.tif (at the input's bit depth) with scores.csv;
the summary table is scoring.score()'s, so blur rows compare with every other row.

The "blur floor" every learned method must clear; the method, its tuned sigmas and why:
baselines.blur_denoise. Single-threaded and deterministic; --workers N runs N images at once.
"""
import baselines
import scoring


def main(argv=None):
    return scoring.baseline_main(baselines.BLUR, __doc__, argv)


if __name__ == "__main__":
    main()
