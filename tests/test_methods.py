"""The alternative training methods (train.py --method r2r|n2n|cncl|drgan): each one's core rule
on tiny tensors, then train.py + evaluate.py end to end for a couple of steps."""
import csv

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F

import datasets
import evaluate
import models
import synthetic
import train
import trainers
from datasets import Sample
from utils import DataError

METHODS = ["r2r", "n2n", "cncl", "drgan"]


def correlation(noise, dy, dx):
    noise = noise - noise.mean()
    a = noise[..., dy:, dx:]
    b = noise[..., :noise.shape[-2] - dy, :noise.shape[-1] - dx]
    return float((a * b).mean() / noise.var())


# ------------------------------------------------------------------ R2R

def r2r_model(sigma=0.15, lateral=0.6):
    """An R2R module whose noise model has the synthetic speckle's lateral correlation."""
    model = models.R2RDenoiser(torch.nn.Identity(), alpha=0.5, passes=4)
    kernel = torch.zeros(1, 1, 7, 7)
    kernel[0, 0, 3, 2:5] = torch.tensor([lateral, 1.0, lateral])
    model.kernel.copy_(kernel / kernel.norm())
    model.sigma.fill_(sigma)
    return model


def test_r2r_input_and_target_noises_are_uncorrelated_only_with_the_noise_covariance():
    # R2R's identity E|f(y + a z) - (y - z / a)|^2 = E|f(y + a z) - x|^2 + const needs
    # Cov(n + a z, n - z / a) = Sigma_n - Sigma_z = 0, at every lag, not only at lag 0.
    model, g = r2r_model(), torch.Generator().manual_seed(0)
    n = model.sample_noise((512, 1, 24, 24), g)  # the image's own noise, drawn from the model
    alpha = model.alpha
    for z, lag1 in ((model.sample_noise(n.shape, g), 0.0), (0.15 * torch.randn(n.shape, generator=g), None)):
        source, target = n + alpha * z, n - z / alpha
        cross = [float((source[..., :, dx:] * target[..., :, :24 - dx]).mean()) / 0.15 ** 2 for dx in (0, 1)]
        assert abs(cross[0]) < 0.03  # the std alone gets lag 0 right...
        if lag1 is not None:
            assert abs(cross[1]) < 0.03
        else:  # ...but white z leaves the speckle's neighbour correlation in input and target
            assert cross[1] > 0.3


def test_r2r_expected_loss_is_clean_loss_plus_a_constant():
    model, g = r2r_model(), torch.Generator().manual_seed(1)
    clean = torch.linspace(0.2, 0.8, 16).repeat(16, 1)[None, None].expand(4096, 1, 16, 16)
    noisy = clean + model.sample_noise(clean.shape, g)
    z = model.sample_noise(clean.shape, g)
    source, target = noisy + 0.5 * z, noisy - z / 0.5
    smooth = lambda v: F.avg_pool2d(v, 3, stride=1, padding=1, count_include_pad=False)  # a fixed denoiser f
    r2r_loss = ((smooth(source) - target) ** 2).mean()
    clean_loss = ((smooth(source) - clean) ** 2).mean()
    constant = ((target - clean) ** 2).mean()  # does not depend on f
    torch.testing.assert_close(r2r_loss, clean_loss + constant, rtol=5e-3, atol=0)


def test_noise_model_measured_on_synthetic_speckle():
    pairs = [synthetic.noisy_clean_pair(seed) for seed in range(3)]
    sigma, kernel = trainers.estimate_noise_model([noisy for noisy, _ in pairs])
    noise = np.concatenate([(noisy - clean)[(clean > 0.4) & (clean < 0.8)] for noisy, clean in pairs])
    assert abs(sigma - noise.std()) < 0.05 * noise.std()  # tissue noise, though measured on background
    model = r2r_model()
    model.sigma.fill_(sigma)
    model.kernel.copy_(kernel)
    z = model.sample_noise((16, 1, 64, 64), torch.Generator().manual_seed(0))
    true_lateral = np.mean([correlation(torch.from_numpy(n - c)[None, None][..., 200:, :], 0, 1) for n, c in pairs])
    assert abs(z.std().item() - sigma) < 0.05 * sigma and abs(correlation(z, 0, 1) - true_lateral) < 0.1


def test_r2r_test_time_average_is_reproducible():
    model = r2r_model()
    model.net = torch.nn.Conv2d(1, 1, 3, padding=1)
    x = torch.rand(1, 1, 20, 24)
    with torch.no_grad():
        first, second = model(x), model(x)
        model.passes = 1
        single = model(x)
    assert torch.equal(first, second) and not torch.equal(first, single)


# ------------------------------------------------------------------ Neighbor2Neighbor

def test_subsampler_picks_two_distinct_4_neighbours_of_each_cell():
    n, height, width = 3, 8, 10
    index = torch.arange(n * height * width, dtype=torch.float32).reshape(n, 1, height, width)
    first, second = trainers.neighbour_masks(index.shape, torch.Generator().manual_seed(0))
    a, b = trainers.subsample(index, first).long(), trainers.subsample(index, second).long()
    assert a.shape == (n, 1, height // 2, width // 2)
    ya, xa = a % (height * width) // width, a % width
    yb, xb = b % (height * width) // width, b % width
    cell_y, cell_x = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    assert torch.equal(ya // 2, cell_y.expand_as(ya)) and torch.equal(xa // 2, cell_x.expand_as(xa))  # own cell
    assert torch.equal(yb // 2, ya // 2) and torch.equal(xb // 2, xa // 2)
    assert torch.equal((ya - yb).abs() + (xa - xb).abs(), torch.ones_like(ya))  # 4-neighbours, never diagonal
    assert torch.equal(a // (height * width), b // (height * width))  # same image of the batch
    pairs = {(int(f), int(s)) for f, s in zip(first.flatten(), second.flatten())}
    assert pairs == {tuple(p) for p in trainers.NEIGHBOUR_PAIRS.tolist()}  # all 8 ordered pairs drawn


class Scale(torch.nn.Module):
    """noise = c x: with a constant image y, f(v) = (1 - c) v, and N2N's regulariser c^2 |g2(y)|^2 equals its
    reconstruction term exactly, so loss = reconstruction x (1 + gamma) tells gamma."""

    def __init__(self):
        super().__init__()
        self.c = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        return self.c * x


def test_n2n_regulariser_weight_ramps_linearly_to_gamma(trainer_args, monkeypatch):
    args = trainer_args("--method", "n2n", "--niter", "2", "--epoch_size", "8", "--batch_size", "2", "--n2n_gamma", "3")
    monkeypatch.setattr(trainers.models, "build_generator", lambda backbone: Scale())
    trainer = trainers.N2NTrainer(args)
    total = 8  # K: 2 epochs x 8 // 2 steps
    assert trainer.total_steps == total
    flat = [torch.full((2, 1, 16, 16), 0.0) + torch.tensor([0.3, 0.6]).view(2, 1, 1, 1) for _ in range(3)]
    for k in range(1, total + 3):
        stats = trainer.step(*flat)
        gamma = stats["loss_g"] / stats["identity"] - 1
        assert gamma == pytest.approx(3 * min(k, total) / total, abs=1e-5), k  # n2n_gamma x k / K, then n2n_gamma
    assert trainer.steps == total + 2


# ------------------------------------------------------------------ DRGAN's noise patches

def test_noise_patches_come_from_background_only():
    rng = np.random.default_rng(0)
    image = rng.uniform(0.1, 0.4, (120, 90)).astype(np.float32)  # speckle-like background
    image[50:70] += 0.5  # a bright retina band
    corners = datasets.background_corners(image, 16, margin=8)
    assert len(corners) > 0
    tops = corners[:, 0]
    assert np.all((tops + 16 <= 50 - 8) | (tops >= 70 + 8))  # never on or next to the band
    assert {tuple(c) for c in corners} >= {(0, 0), (120 - 16, 90 - 16)}


def test_noise_patches_of_synthetic_scans_hold_no_retina():
    pairs = [synthetic.noisy_clean_pair(seed) for seed in range(3)]
    patches = datasets.NoisePatches([noisy for noisy, _ in pairs], 32)
    for i, top, left in patches.corners[::97]:
        clean = pairs[i][1][top:top + 32, left:left + 32]
        assert clean.std() < 0.03 and clean.max() < 0.35  # flat and dark: background, no layers
    sample = patches.sample(6, torch.Generator().manual_seed(0))
    assert sample.shape == (6, 1, 32, 32) and sample.mean(dim=(-2, -1)).abs().max() < 1e-5


def test_no_background_is_one_clear_error():
    with pytest.raises(DataError, match="no signal-free background patch of --patch_size 64"):
        datasets.NoisePatches([np.full((60, 200), 0.5, np.float32)], 64)


# ------------------------------------------------------------------ CNCL

def test_cncl_branches_are_the_chosen_backbone_and_fuse_starts_as_average():
    net = models.CNCLNet("unet")
    assert isinstance(net.content, models.UNet) and isinstance(net.noise, models.UNet)
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        content, noise, fused = net.branches(x)
        torch.testing.assert_close(fused, 0.5 * (content + x - noise))
        torch.testing.assert_close(net(x), x - fused)


def striped_subject(n, name):
    """Subject n's noisy scan is the constant 20 n with every other row + 5; its average is noisy // 2."""
    noisy = np.full((40, 48), n * 20, np.uint8)
    noisy[::2] += 5  # some texture, so crops can be checked for alignment
    return noisy if name == "test" else noisy // 2


def test_cncl_pairs_are_training_subjects_minus_validation_and_test(tmp_path, fake_duke28):
    fake_duke28(tmp_path, ids=range(1, 6), images=striped_subject, splits={"train": [1, 2, 3, 4], "test": [5]})
    val = [Sample("4", np.zeros((40, 48), np.float32))]
    pairs = datasets.paired_training_data("duke28", tmp_path, "train", val)
    assert sorted(round(float(noisy.min()) * 255 / 20) for noisy, _ in pairs) == [1, 2, 3]
    pairs = datasets.paired_training_data("duke28", tmp_path, "all", val)  # test subjects never, even for 'all'
    assert sorted(round(float(noisy.min()) * 255 / 20) for noisy, _ in pairs) == [1, 2, 3]
    dataset = datasets.PairedCropDataset(pairs, 16, 20, seed=0)
    for k in range(20):
        noisy, other, clean = dataset[k]
        torch.testing.assert_close(clean, torch.div(torch.round(noisy * 255), 2, rounding_mode="floor") / 255)  # same place, same flip
        assert other.min() != noisy.min()  # another subject's image


def test_cncl_refuses_unpaired_dataset(tmp_path):
    for kind in ("noisy", "clean"):
        (tmp_path / kind).mkdir()
        for i in range(2):
            tifffile.imwrite(tmp_path / kind / f"{i}.tif", np.random.default_rng(i).integers(0, 255, (40, 40), np.uint8))
    with pytest.raises(DataError, match="cncl trains on registered noisy/clean pairs; --dataset pku37 is unpaired"):
        train.main(["--method", "cncl", "--dataset", "pku37", "--data_root", str(tmp_path), "--patch_size", "32",
                    "--ckpt_dir", str(tmp_path / "ckpt"), "--img_dir", str(tmp_path / "img")])


# ------------------------------------------------------------------ each method's options

# A value away from the default for every method-specific option (trainers.METHOD_OPTIONS).
SET = {"gan": ["--gan", "vanilla"], "lam": ["--lam", "3"], "d_fake_weight": ["--d_fake_weight", "0.2"],
       "clip": ["--clip", "0.02"], "n_critic": ["--n_critic", "2"], "sigma_tv": ["--sigma_tv", "1"],
       "sigma_rep": ["--sigma_rep", "1"], "zero_mean": ["--no-zero_mean"], "pool_size": ["--pool_size", "4"],
       "noise_scale": ["--noise_scale", "0.5", "1.5"], "g_calls": ["--g_calls", "per_estimate"], "lr_d": ["--lr_d", "1e-4"], "backbone": ["--backbone", "unet"],
       "neighbours": ["--neighbours", "2"], "skip_blur": ["--skip_blur", "1", "2"],
       "skip_centre_weight": ["--skip_centre_weight", "0.5"], "skip_nlm": ["--skip_nlm", "20"], "skip_bm3d": ["--skip_bm3d", "2.5"],
       "skip_bm3d_profile": ["--skip_bm3d_profile", "lc"], "skip_blur_share": ["--skip_blur_share", "0.3"], "d_blur": ["--d_blur", "1"], "real_blur": ["--real_blur", "1"],
       "neighbour_target": ["--neighbour_target", "1", "--dataset", "duke28"], "bm3d_target": ["--bm3d_target", "1"],
       "ssim_weight": ["--ssim_weight", "1"],
       "r2r_alpha": ["--r2r_alpha", "0.3"], "r2r_passes": ["--r2r_passes", "2"], "n2n_gamma": ["--n2n_gamma", "1"]}


# What each method's step reads (trainers.py); every other method option is refused, not silently ignored.
READS = {"tcfl": {"gan", "lam", "d_fake_weight", "clip", "n_critic", "sigma_tv", "sigma_rep", "zero_mean", "pool_size",
                  "noise_scale", "g_calls", "lr_d", "backbone", "neighbours", "skip_blur", "skip_nlm",
                  "skip_centre_weight", "skip_bm3d", "skip_bm3d_profile", "skip_blur_share", "d_blur", "real_blur",
                  "neighbour_target", "bm3d_target", "ssim_weight"},
         "r2r": {"r2r_alpha", "r2r_passes", "backbone"},
         "n2n": {"n2n_gamma", "backbone"},
         "cncl": {"gan", "lr_d", "backbone"},
         "drgan": {"gan", "lr_d"}}


# Read by a method but refused together with another of its options (G starts from the Gaussian or from NLM
# and/or BM3D; the neighbour B-scans are inputs or targets; G's squared-error term has one target), or only
# with another.
ALTERNATIVES = {"skip_nlm", "skip_bm3d", "neighbour_target", "bm3d_target", "skip_blur_share", "skip_bm3d_profile"}
NEEDS = {"skip_blur_share": ["--skip_nlm", "12"], "skip_bm3d_profile": ["--skip_bm3d", "2.5"]}


def test_every_method_option_has_a_value_here():
    assert set(SET) == set(trainers.METHOD_OPTIONS) and set(READS) == set(trainers.TRAINERS)


@pytest.mark.parametrize("method", list(READS))
def test_parse_args_refuses_the_options_a_method_does_not_read(method):
    together = READS[method] - ALTERNATIVES
    own = [arg for name in sorted(together) for arg in SET[name]]
    args, defaults = train.parse_args(["--method", method, *own]), vars(train.parse_args([]))  # all its own: accepted
    assert args.method == method and all(getattr(args, name) != defaults[name] for name in together)
    for name in READS[method] & ALTERNATIVES:
        assert getattr(train.parse_args(["--method", method, *SET[name], *NEEDS.get(name, [])]), name) != defaults[name]
    for name in sorted(set(trainers.METHOD_OPTIONS) - READS[method]):
        with pytest.raises(DataError, match=f"--method {method} does not read --{name}") as error:
            train.parse_args(["--method", method, *own, *SET[name]])
        assert "\n" not in str(error.value)


def test_r2r_refuses_sigma_tv():
    with pytest.raises(DataError, match="--method r2r does not read --sigma_tv"):
        train.parse_args(["--method", "r2r", "--sigma_tv", "1"])
    assert train.parse_args(["--method", "r2r", "--r2r_alpha", "0.3"]).r2r_alpha == 0.3


# ------------------------------------------------------------------ train.py + evaluate.py

TINY = ["--patch_size", "32", "--batch_size", "2", "--epoch_size", "4", "--log_every", "1", "--n_val", "1"]
OWN = {"r2r": ["--r2r_passes", "2"], "n2n": [], "cncl": [], "drgan": []}  # each method's own options


@pytest.mark.parametrize("method", METHODS)
def test_train_two_steps_then_evaluate(tmp_path, method):
    train.main(["--method", method, *TINY, *OWN[method], "--niter", "1", "--ckpt_dir", str(tmp_path / "ckpt"), "--img_dir", str(tmp_path / "img")])
    state = torch.load(tmp_path / "ckpt" / "epoch_1.pth", weights_only=True)
    assert state["step"] == 2 and state["method"] == method and state["backbone"] == "dncnn"
    assert not any(k.startswith("module.") for k in state["generator"])
    assert {"discriminator", "opt_g", "opt_d"} <= set(state)
    with open(tmp_path / "ckpt" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(value not in ("", "nan") for value in rows[-1].values())  # every column filled
    generator = models.load_checkpoint(tmp_path / "ckpt" / "epoch_1.pth")[0].net
    expected = {"r2r": models.R2RDenoiser, "n2n": models.DnCNN, "cncl": models.CNCLNet, "drgan": models.DRGANDenoiser}
    assert isinstance(generator, expected[method])
    summary = evaluate.main(["--epoch", "1", "--ckpt_dir", str(tmp_path / "ckpt"), "--out_dir", str(tmp_path / "ev")])
    assert summary["n_images"] == 8 and np.isfinite(summary["mean"]["PSNR"])


@pytest.mark.slow
def test_n2n_resume_draws_the_same_masks(tmp_path):
    run = lambda d, *extra: train.main(["--method", "n2n", *TINY, "--epoch_size", "8", "--niter", "2",
                                        "--ckpt_dir", str(d / "ckpt"), "--img_dir", str(d / "img"), *extra])
    run(tmp_path / "a", "--max_steps", "5")
    run(tmp_path / "b", "--max_steps", "3")
    run(tmp_path / "b", "--max_steps", "5", "--resume")
    a = (tmp_path / "a" / "ckpt" / "log.csv").read_text().splitlines()
    b = (tmp_path / "b" / "ckpt" / "log.csv").read_text().splitlines()
    assert [r.split(",")[:7] for r in a] == [r.split(",")[:7] for r in b]


def test_unknown_method_in_checkpoint_is_one_clear_error(tmp_path):
    path = tmp_path / "g.pth"
    torch.save({"generator": {}, "backbone": "dncnn", "method": "noise2void"}, path)
    with pytest.raises(DataError, match="unknown training method 'noise2void'"):
        models.load_checkpoint(path)
