"""The blur floor: an anisotropic Gaussian blur (tuned on training subjects), the bar every learned
method must clear. `python blur.py` scores the synthetic test set; on the real scans:

    python blur.py --dataset duke28 --data_root ../shared/data/duke_bioptigen --split test --json out.json

and `--tune --split train` prints the sigma grid. Why these sigmas: baselines.blur_denoise.
"""
import baselines
import scoring

main = scoring.baseline_cli(baselines.BLUR, __doc__)

if __name__ == "__main__":
    main()
