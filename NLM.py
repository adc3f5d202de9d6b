"""Non-local means baseline (OpenCV's fastNlMeansDenoising), scored like every other method.

Denoised images go to img/NLM/<id>.tif at the input's bit depth, with scores.csv:

    python NLM.py
    python NLM.py --dataset duke28 --data_root ../shared/data/duke_bioptigen --split test --workers 2
    python NLM.py --dataset duke28 --data_root ../shared/data/duke_bioptigen --split train --tune

Lateral binning, the 8- and 16-bit paths and the tuned strength: baselines.nlm_denoise.
"""
import baselines
import scoring

main = scoring.baseline_cli(baselines.NLM, __doc__)

if __name__ == "__main__":
    main()
