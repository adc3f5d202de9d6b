"""BM3D baseline (the `bm3d` package on the laterally binned B-scan), scored like every other method.

    python BM3D.py                 # built-in synthetic test set; outputs and scores.csv in img/BM3D/
    python BM3D.py --dataset duke28 --data_root ../shared/data/duke_bioptigen --split test --workers 2 \
        --json bench/results/bm3d_duke28_test.json
    python BM3D.py --dataset duke28 --data_root ../shared/data/duke_bioptigen --split train --tune --workers 2

Method, tuned parameters and why: baselines.bm3d_denoise.
"""
import baselines
import scoring

main = scoring.baseline_cli(baselines.BM3D, __doc__)

if __name__ == "__main__":
    main()
