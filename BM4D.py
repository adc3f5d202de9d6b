"""BM4D baseline (the `bm4d` package) on the B-scan between its registered neighbours, scored
like every other method.

    python BM4D.py                                       # built-in synthetic test set (4 neighbours each)
    python BM4D.py --dataset duke28 --data_root ../shared/data/duke_bioptigen --split test \
        --workers 2 --json bench/results/bm4d_duke28_test.json
    python BM4D.py --dataset duke28 --data_root ../shared/data/duke_bioptigen --split train --tune --workers 2

Denoised images go to img/BM4D/<id>.tif (at the input's bit depth) with scores.csv;
the summary table is scoring.score()'s, so BM4D rows compare with every other row. Unlike
the other baselines BM4D reads 5 B-scans per output (the JSON records "bscans": 5): the
volume 1, 2, test, 3, 4 of a duke28 subject (datasets.Sample.volume()), of which only the
central, denoised B-scan is kept and scored. A sample without neighbours is one error.

The method, its tuned parameters and why: baselines.bm4d_denoise. Every call is single-threaded
(deterministic); --workers N runs N volumes at once in processes.
"""
import baselines
import scoring


def main(argv=None):
    return scoring.baseline_main(baselines.BM4D, __doc__, argv)


if __name__ == "__main__":
    main()
