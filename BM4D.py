"""BM4D baseline (the `bm4d` package) on the B-scan between its 4 registered neighbours, keeping
the central B-scan: it reads 5 B-scans per output (the results record "bscans": 5), and needs
the neighbours (duke28: <subject>/1.tif..4.tif; the synthetic set carries them).

    python BM4D.py
    python BM4D.py --dataset duke28 --data_root ../shared/data/duke_bioptigen --split test --workers 2

Parameters, tuned with --tune on the train split, and why: baselines.bm4d_denoise.
"""
import baselines
import scoring

main = scoring.baseline_cli(baselines.BM4D, __doc__)

if __name__ == "__main__":
    main()
