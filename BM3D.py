"""BM3D baseline (the `bm3d` package), scored like every other method.

    python BM3D.py                                       # built-in synthetic test set
    python BM3D.py --dataset duke28 --data_root ../shared/data/duke_bioptigen --split test \
        --workers 2 --json bench/results/bm3d_duke28_test.json
    python BM3D.py --dataset duke28 --data_root ../shared/data/duke_bioptigen --split train --tune --workers 2

Denoised images go to img/BM3D/<id>.tif (at the input's bit depth) with scores.csv;
the summary table is scoring.score()'s, so BM3D rows compare with every other row.

The method, its tuned parameters and why: baselines.bm3d_denoise. Every call is single-threaded
(deterministic); --workers N runs N images at once in processes.
"""
import baselines
import scoring


def main(argv=None):
    return scoring.baseline_main(baselines.BM3D, __doc__, argv)


if __name__ == "__main__":
    main()
