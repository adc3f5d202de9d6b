"""Non-local means baseline (OpenCV fastNlMeansDenoising), scored like every other method.

    python NLM.py                                        # built-in synthetic test set
    python NLM.py --dataset duke28 --data_root ../shared/data/duke_bioptigen --split test \
        --workers 2 --json bench/results/nlm_duke28_test.json
    python NLM.py --dataset duke28 --data_root ../shared/data/duke_bioptigen --split train --tune

Denoised images go to img/NLM/<id>.tif (at the input's bit depth) with scores.csv;
the summary table is scoring.score()'s, so NLM rows compare with every other row.

The method, its tuned parameters and why (lateral binning, the 8- and 16-bit paths):
baselines.nlm_denoise. Every call is single-threaded (cv2.setNumThreads(1)); --workers N runs N
images at once in processes, and seconds_per_image is the time of one call.
"""
import baselines
import scoring


def main(argv=None):
    return scoring.baseline_main(baselines.NLM, __doc__, argv)


if __name__ == "__main__":
    main()
