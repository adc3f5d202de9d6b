"""train.py --skip_blur / --skip_nlm / --skip_bm3d: a TCFL generator that starts as the blur floor
(models.BlurSkip), NLM.py's non-local means (models.NLMSkip) or BM3D.py's BM3D (models.BM3DSkip) and learns a
correction to it."""
import numpy as np
import pytest
import torch
from scipy import ndimage

import baselines
import evaluate
import models
import train
import trainers
import utils
from utils import DataError


def blurred(image, sigmas):
    """The reference: scipy's Gaussian, borders replicated ("nearest"), truncated at 3 sigma like BlurSkip's taps."""
    return ndimage.gaussian_filter(image, sigmas, mode="nearest", truncate=3.0)


@pytest.mark.parametrize("backbone", list(models.GENERATORS))
def test_a_new_blur_skip_generator_denoises_as_the_gaussian_blur(backbone):
    torch.manual_seed(0)
    net = models.build_generator(backbone, skip_blur=(1.0, 3.0)).eval()
    x = torch.rand(1, 1, 24, 40)
    with torch.no_grad():
        denoised = (x - net(x))[0, 0].numpy()
    np.testing.assert_allclose(denoised, blurred(x[0, 0].numpy(), (1.0, 3.0)), atol=1e-5)


def test_the_blur_reads_the_b_scan_only_and_a_zero_sigma_leaves_an_axis_alone():
    torch.manual_seed(0)
    net = models.build_generator("dncnn", in_channels=3, skip_blur=(0.0, 2.0)).eval()
    x = torch.rand(1, 3, 16, 30)
    with torch.no_grad():
        denoised = x[:, :1] - net(x)
        x[:, 1:] = torch.rand(1, 2, 16, 30)  # other neighbours: same output
        torch.testing.assert_close(x[:, :1] - net(x), denoised)
    np.testing.assert_allclose(denoised[0, 0].numpy(), blurred(x[0, 0].numpy(), (0.0, 2.0)), atol=1e-5)


@pytest.mark.parametrize("weight", [0.6, 0.0])
def test_a_centre_weight_blurs_the_blend_of_the_b_scan_and_its_neighbours_mean(weight):
    torch.manual_seed(0)
    net = models.build_generator("dncnn", in_channels=3, skip_blur=(1.0, 3.0), skip_centre_weight=weight).eval()
    x = torch.rand(2, 3, 24, 40)
    with torch.no_grad():
        denoised = (x[:, :1] - net(x)).numpy()
        lone = (x[:, :1] - net(x[:, :1].repeat(1, 3, 1, 1))).numpy()  # a lone B-scan: neighbours = copies
    for stack, out, alone in zip(x.numpy(), denoised[:, 0], lone[:, 0]):
        blend = weight * stack[0] + (1 - weight) * (stack[1] + stack[2]) / 2
        np.testing.assert_allclose(out, blurred(blend, (1.0, 3.0)), atol=1e-5)
        np.testing.assert_allclose(alone, blurred(stack[0], (1.0, 3.0)), atol=1e-5)


def test_a_checkpoint_and_the_trainer_build_the_centre_weight(trainer_args):
    trainer = trainers.TCFLTrainer(trainer_args(neighbours=2, skip_blur=[1.0, 2.0], skip_centre_weight=0.6))
    assert isinstance(trainer.G_train, models.BlurSkip) and trainer.G_train.centre_weight == 0.6
    args = {"neighbours": 2, "skip_blur": [1.0, 2.0], "skip_centre_weight": 0.6}
    net = models.build_denoiser("tcfl", "dncnn", args)
    assert isinstance(net, models.BlurSkip) and net.centre_weight == 0.6
    assert models.build_denoiser("tcfl", "dncnn", {"neighbours": 2, "skip_blur": [1.0, 2.0]}).centre_weight == 1.0


def test_a_lone_b_scan_starts_from_lone_blur_and_a_stack_from_the_blend():
    torch.manual_seed(0)
    net = models.build_generator("dncnn", in_channels=3, skip_blur=(1.0, 3.0), skip_centre_weight=0.6).eval()
    volume = np.random.default_rng(0).random((3, 24, 40)).astype(np.float32)
    denoiser = models.Denoiser(net, zero_mean=False, neighbours=2, lone_blur=(1.25, 4.0))
    blend = 0.6 * volume[1] + 0.4 * (volume[0] + volume[2]) / 2
    np.testing.assert_allclose(denoiser(volume, 1), np.clip(blurred(blend, (1.0, 3.0)), 0, 1), atol=1e-5)
    np.testing.assert_allclose(denoiser(volume[1]), np.clip(blurred(volume[1], (1.25, 4.0)), 0, 1), atol=1e-5)
    np.testing.assert_allclose(denoiser(volume[1:2]), denoiser(volume[1]))  # a stack of one page is lone too
    np.testing.assert_allclose(denoiser(volume, 1), np.clip(blurred(blend, (1.0, 3.0)), 0, 1), atol=1e-5)  # restored
    without = denoiser.replace(lone_blur=None)  # the checkpoint's own Gaussian for lone B-scans, as before
    np.testing.assert_allclose(without(volume[1]), np.clip(blurred(volume[1], (1.0, 3.0)), 0, 1), atol=1e-5)


def test_a_quieter_scan_starts_from_a_narrower_blur_and_a_quieter_b_scan_alone_does_not():
    """Denoiser with noise_sigma: the start's sigmas x (the median noise estimate of the B-scans read / the
    quietest training scan's, quiet_sigma, else noise_sigma) ** QUIET_EXPONENT, only where that is below 1."""
    torch.manual_seed(0)
    net = models.build_generator("dncnn", in_channels=3, skip_blur=(1.0, 3.0), skip_centre_weight=0.6).eval()
    rng = np.random.default_rng(0)
    volume = (0.5 + 0.1 * rng.standard_normal((3, 32, 48))).astype(np.float32)
    level = float(np.median([utils.noise_sigma(page) for page in volume]))
    blend = lambda v: 0.6 * v[1] + 0.4 * (v[0] + v[2]) / 2
    at_training = models.Denoiser(net, zero_mean=False, neighbours=2, noise_sigma=level)
    np.testing.assert_allclose(at_training(volume, 1), np.clip(blurred(blend(volume), (1.0, 3.0)), 0, 1), atol=1e-5)
    assert at_training.last_start_scale == 1.0
    trained_noisier = at_training.replace(noise_sigma=2 * level)  # the scan is half as noisy as the training scans
    scale = 0.5 ** models.QUIET_EXPONENT
    np.testing.assert_allclose(trained_noisier(volume, 1),
                               np.clip(blurred(blend(volume), (scale, 3.0 * scale)), 0, 1), atol=1e-5)
    assert trained_noisier.last_start_scale == pytest.approx(scale, rel=1e-6)
    np.testing.assert_allclose(trained_noisier.replace(noise_sigma=None)(volume, 1), at_training(volume, 1))  # off
    trained_quieter = at_training.replace(noise_sigma=level / 2)  # a noisier scan: the start stays
    trained_quieter(volume, 1)
    assert trained_quieter.last_start_scale == 1.0
    within_range = at_training.replace(noise_sigma=2 * level, quiet_sigma=level)  # as quiet as the quietest training scan
    within_range(volume, 1)
    assert within_range.last_start_scale == 1.0
    below_range = at_training.replace(noise_sigma=3 * level, quiet_sigma=2 * level)
    below_range(volume, 1)
    assert below_range.last_start_scale == pytest.approx(scale, rel=1e-6)
    quiet_centre = volume.copy()
    quiet_centre[1] = 0.5 + 0.3 * (volume[1] - 0.5)  # one B-scan averaged quieter; its neighbours as recorded
    np.testing.assert_allclose(at_training(quiet_centre, 1), np.clip(blurred(blend(quiet_centre), (1.0, 3.0)), 0, 1),
                               atol=1e-5)
    assert at_training.last_start_scale == 1.0
    # a lone B-scan is its own blend: its noise against the training blend's, 2 level x sqrt(0.6^2 + 0.4^2 / 2)
    assert net.blend_noise(2) == pytest.approx(np.sqrt(0.36 + 0.08)) and net.blend_noise(0) == 1.0
    lone = trained_noisier.replace(noise_sigma=4 * level, lone_blur=(1.25, 4.0))  # the lone start narrowed
    own = utils.noise_sigma(volume[1]) / (4 * level * np.sqrt(0.36 + 0.08))
    assert own < 1
    np.testing.assert_allclose(lone(volume[1]), np.clip(blurred(volume[1], (1.25 * own ** models.QUIET_EXPONENT,
                                                                         4.0 * own ** models.QUIET_EXPONENT)), 0, 1), atol=1e-5)
    assert lone.last_start_scale == pytest.approx(own ** models.QUIET_EXPONENT, rel=1e-6)
    as_quiet_as_the_blend = lone.replace(noise_sigma=utils.noise_sigma(volume[1]) / np.sqrt(0.36 + 0.08))
    as_quiet_as_the_blend(volume[1])
    assert as_quiet_as_the_blend.last_start_scale == pytest.approx(1.0)  # a lone B-scan at the training blend's noise


def test_lone_blur_is_recorded_at_export_and_checked(tmp_path, fake_duke28):
    root = fake_duke28(tmp_path / "data", ids=range(1, 4), size=(48, 96), neighbours=(1, 2, 3, 4),
                       splits={"train": [1, 2], "test": [3]})
    ckpt, data = tmp_path / "ckpt", ["--dataset", "duke28", "--data_root", str(root)]
    train.main([*data, "--patch_size", "32", "--batch_size", "2", "--epoch_size", "2", "--niter", "1", "--n_val", "1",
                "--neighbours", "2", "--skip_blur", "1", "3", "--skip_centre_weight", "0.6",
                "--ckpt_dir", str(ckpt), "--img_dir", str(tmp_path / "img")])
    assert models.load_checkpoint(ckpt / "epoch_1.pth")[0].lone_blur is None  # the start it trained with
    evaluate.main(["--ckpt", str(ckpt / "epoch_1.pth"), "--export", str(tmp_path / "G.pth"), "--lone_blur", "1.25", "4"])
    denoiser, state = models.load_checkpoint(tmp_path / "G.pth")
    assert denoiser.lone_blur == (1.25, 4.0) and state["inference"]["lone_blur"] == [1.25, 4.0]
    scores = {}
    for name, extra in (("recorded", []), ("own", ["--lone_blur", "1", "3"])):
        scores[name] = evaluate.main(["--ckpt", str(tmp_path / "G.pth"), *data, "--split", "test", "--lone_bscan",
                                      "--precision", "fp32", "--out_dir", str(tmp_path / name), *extra])["mean"]["PSNR"]
    assert scores["recorded"] != scores["own"]  # --lone_blur overrides what the checkpoint records
    with pytest.raises(DataError, match="--lone_blur needs two sigmas >= 0, not both 0, got 0.0 0.0"):
        evaluate.main(["--ckpt", str(tmp_path / "G.pth"), *data, "--split", "test", "--lone_blur", "0", "0"])
    plain = tmp_path / "plain"
    train.main(["--patch_size", "32", "--batch_size", "2", "--epoch_size", "2", "--niter", "1", "--n_val", "1",
                "--skip_blur", "1", "3", "--ckpt_dir", str(plain), "--img_dir", str(tmp_path / "img2")])
    with pytest.raises(DataError, match="--lone_blur sets the blur start of a generator trained with --neighbours"):
        evaluate.main(["--ckpt", str(plain / "epoch_1.pth"), "--export", str(tmp_path / "P.pth"), "--lone_blur", "1", "2"])


def test_the_correction_trains_and_the_checkpoint_rebuilds_the_blur(tmp_path):
    ckpt = tmp_path / "ckpt"
    train.main(["--patch_size", "32", "--batch_size", "2", "--epoch_size", "4", "--niter", "1", "--n_val", "1",
                "--skip_blur", "1", "2", "--ckpt_dir", str(ckpt), "--img_dir", str(tmp_path / "img")])
    state = torch.load(ckpt / "epoch_1.pth", weights_only=True)
    assert state["args"]["skip_blur"] == [1.0, 2.0]
    assert state["generator"]["net.body.9.weight"].abs().max() > 0  # the zero-initialised last layer has learned
    exported = tmp_path / "G.pth"
    evaluate.main(["--ckpt", str(ckpt / "epoch_1.pth"), "--export", str(exported)])
    denoiser = models.load_checkpoint(exported)[0]
    assert isinstance(denoiser.net, models.BlurSkip)
    assert denoiser.net.taps_axial.numel() == 7 and denoiser.net.taps_lateral.numel() == 13  # 3 sigma each side
    # The loaded generator is the trained one: the same weights in a fresh BlurSkip give the same noise.
    fresh = models.build_generator("dncnn", skip_blur=(1.0, 2.0))
    fresh.load_state_dict(state["generator_ema"])
    x = torch.rand(1, 1, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(denoiser.net(x.contiguous(memory_format=torch.channels_last)), fresh.eval()(x),
                                   atol=1e-5, rtol=1e-4)


def test_skip_blur_options_are_checked():
    with pytest.raises(DataError, match="does not read --skip_blur"):
        train.parse_args(["--method", "cncl", "--skip_blur", "1", "2"])
    with pytest.raises(DataError, match="--skip_blur needs sigmas >= 0, got -1.0 2.0"):
        train.parse_args(["--skip_blur", "-1", "2"])
    with pytest.raises(DataError, match="--skip_nlm needs h >= 0, got -1.0"):
        train.parse_args(["--skip_nlm", "-1"])
    for both in (["--skip_blur", "1", "2", "--skip_nlm", "20"], ["--skip_blur", "1", "2", "--skip_bm3d", "2.5"]):
        with pytest.raises(DataError, match="give the Gaussian or NLM and/or BM3D"):
            train.parse_args(both)
    args = train.parse_args(["--skip_nlm", "20", "--skip_bm3d", "2.5", "--skip_bm3d_profile", "lc"])  # their mean
    assert (args.skip_nlm, args.skip_bm3d, args.skip_bm3d_profile) == (20.0, 2.5, "lc")
    for start in ([], ["--skip_nlm", "12"]):
        with pytest.raises(DataError, match="--skip_bm3d_profile picks the BM3D of a BM3D start: it needs --skip_bm3d"):
            train.parse_args(["--skip_bm3d_profile", "lc", *start])
    with pytest.raises(DataError, match="--skip_bm3d needs a sigma factor >= 0, got -1.0"):
        train.parse_args(["--skip_bm3d", "-1"])
    with pytest.raises(DataError, match="does not read --skip_bm3d"):
        train.parse_args(["--method", "r2r", "--skip_bm3d", "2.5"])
    with pytest.raises(DataError, match="does not read --skip_nlm"):
        train.parse_args(["--method", "n2n", "--skip_nlm", "20"])
    with pytest.raises(DataError, match=r"--skip_centre_weight needs a weight in \[0, 1\], got 1.5"):
        train.parse_args(["--skip_centre_weight", "1.5", "--neighbours", "2", "--skip_blur", "1", "2"])
    for missing in (["--neighbours", "2"], ["--skip_blur", "1", "2"], ["--skip_nlm", "12"], ["--skip_bm3d", "2.5"]):
        with pytest.raises(DataError, match="--skip_centre_weight blends the neighbours into the filter G starts from"):
            train.parse_args(["--skip_centre_weight", "0.6", *missing])
    for start in (["--skip_blur", "1", "2"], ["--skip_nlm", "12"], ["--skip_bm3d", "2.5"]):
        assert train.parse_args(["--skip_centre_weight", "0.6", "--neighbours", "2", *start]).skip_centre_weight == 0.6
    for share in ("-0.1", "1"):
        with pytest.raises(DataError, match=rf"--skip_blur_share needs a share in \[0, 1\), got {float(share)}"):
            train.parse_args(["--skip_nlm", "12", "--skip_blur_share", share])
    for start in ([], ["--skip_blur", "1", "3"]):
        with pytest.raises(DataError, match="--skip_blur_share mixes the Gaussian into an NLM or BM3D start"):
            train.parse_args(["--skip_blur_share", "0.3", *start])


def nlm_of(image, h):
    """The reference: NLM.py's filter on one 2-D image, 8-bit path, NLM.py's windows."""
    return baselines.nlm(image, h, baselines.TEMPLATE, baselines.SEARCH, eight_bit=True)


@pytest.mark.parametrize("backbone", list(models.GENERATORS))
def test_a_new_nlm_skip_generator_denoises_as_nlm_py_and_reads_the_b_scan_only(backbone):
    torch.manual_seed(0)
    net = models.build_generator(backbone, in_channels=3, skip_nlm=25).eval()
    ramp = torch.linspace(0.2, 0.8, 40).expand(2, 3, 24, 40)
    x = (ramp + 0.05 * torch.randn(2, 3, 24, 40)).clamp(0, 1)  # noise NLM can see (uniform noise over [0, 1] it leaves)
    with torch.no_grad():
        denoised = x[:, :1] - net(x)
        x[:, 1:] = torch.rand(2, 2, 24, 40)  # other neighbours: same output
        torch.testing.assert_close(x[:, :1] - net(x), denoised)
    for image, out in zip(x[:, 0].numpy(), denoised[:, 0].numpy()):  # each image of the batch on its own
        np.testing.assert_allclose(out, nlm_of(image, 25), atol=1e-6)
    assert np.abs(denoised[0, 0].numpy() - x[0, 0].numpy()).mean() > 0.02  # it filtered
    assert np.abs(nlm_of(x[0, 0].numpy(), 25) - nlm_of(x[0, 0].numpy(), 5)).mean() > 0.01  # h matters


def test_the_nlm_correction_trains_and_the_checkpoint_rebuilds_the_filter(tmp_path):
    ckpt = tmp_path / "ckpt"
    train.main(["--patch_size", "32", "--batch_size", "2", "--epoch_size", "4", "--niter", "1", "--n_val", "1",
                "--skip_nlm", "15", "--ckpt_dir", str(ckpt), "--img_dir", str(tmp_path / "img")])
    state = torch.load(ckpt / "epoch_1.pth", weights_only=True)
    assert state["args"]["skip_nlm"] == 15.0
    assert state["generator"]["net.body.9.weight"].abs().max() > 0  # the zero-initialised last layer has learned
    denoiser = models.load_checkpoint(ckpt / "epoch_1.pth")[0]
    assert isinstance(denoiser.net, models.NLMSkip) and denoiser.net.h == 15.0
    fresh = models.build_generator("dncnn", skip_nlm=15)
    fresh.load_state_dict(state["generator_ema"])
    x = torch.rand(1, 1, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(denoiser.net(x.contiguous(memory_format=torch.channels_last)), fresh.eval()(x),
                                   atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("start, reference", [
    ({"skip_bm3d": 2.5}, lambda image: baselines.bm3d_hard_threshold(image, 2.5)),
    ({"skip_bm3d": 2.5, "skip_bm3d_profile": "lc"}, lambda image: baselines.bm3d_low_complexity(image, 2.5)),
    ({"skip_nlm": 12}, lambda image: nlm_of(image, 12)),
    ({"skip_nlm": 12, "skip_bm3d": 2.5, "skip_bm3d_profile": "lc"},
     lambda image: (nlm_of(image, 12) + baselines.bm3d_low_complexity(image, 2.5)) / 2)])
def test_a_numpy_filter_skip_generator_denoises_each_image_as_its_filter_of_the_neighbour_blend(start, reference):
    torch.manual_seed(0)
    net = models.build_generator("dncnn", in_channels=3, skip_centre_weight=0.6, **start).eval()
    ramp = torch.linspace(0.2, 0.8, 40).expand(2, 3, 32, 40)
    x = (ramp + 0.05 * torch.randn(2, 3, 32, 40)).clamp(0, 1)
    with torch.no_grad():
        denoised = (x[:, :1] - net(x)).numpy()
        lone = (x[:, :1] - net(x[:, :1].repeat(1, 3, 1, 1))).numpy()  # a lone B-scan: neighbours = copies
    for stack, out, alone in zip(x.numpy(), denoised[:, 0], lone[:, 0]):  # each image with its own noise estimate
        blend = 0.6 * stack[0] + 0.4 * (stack[1] + stack[2]) / 2
        np.testing.assert_allclose(out, reference(blend), atol=1e-5)
        np.testing.assert_allclose(alone, reference(stack[0]), atol=1e-5)
    assert np.abs(denoised[0, 0] - x[0, 0].numpy()).mean() > 0.02  # it filtered
    assert np.abs(reference(x[0, 0].numpy()) - denoised[0, 0]).mean() > 0.003  # the neighbours count


def test_a_bm3d_skip_generator_without_a_centre_weight_reads_the_b_scan_alone():
    torch.manual_seed(0)
    x = (torch.linspace(0.2, 0.8, 40).expand(1, 3, 32, 40) + 0.05 * torch.randn(1, 3, 32, 40)).clamp(0, 1)
    single = models.build_generator("dncnn", in_channels=3, skip_bm3d=1.0).eval()
    with torch.no_grad():  # centre weight 1 (the default): the B-scan alone, here with a lower threshold
        np.testing.assert_allclose((x[:, :1] - single(x))[0, 0].numpy(),
                                   baselines.bm3d_hard_threshold(x[0, 0].numpy(), 1.0), atol=1e-5)


@pytest.mark.parametrize("start", [{"skip_bm3d": 2.5}, {"skip_nlm": 12}])
def test_a_numpy_filter_skip_passes_the_gradient_of_the_blur_start_it_stands_in_for(start):
    torch.manual_seed(0)
    filter_net = models.build_generator("dncnn", in_channels=3, skip_centre_weight=0.6, **start)
    torch.manual_seed(0)
    blur_net = models.build_generator("dncnn", in_channels=3, skip_blur=(1.0, 3.0), skip_centre_weight=0.6)
    weights = torch.rand(2, 1, 32, 40)
    stack = (torch.linspace(0.2, 0.8, 40).expand(2, 3, 32, 40) + 0.05 * torch.randn(2, 3, 32, 40)).clamp(0, 1)
    grads = []
    for net in (filter_net, blur_net):
        x = stack.clone().requires_grad_()
        (net(x) * weights).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0][:, 1:].abs().sum() > 0  # the neighbours' share of the blend gets its gradient too


def test_the_nlm_bm3d_correction_trains_and_the_checkpoint_rebuilds_the_filter(tmp_path, fake_duke28):
    root = fake_duke28(tmp_path / "data", ids=range(1, 4), size=(48, 96), neighbours=(1, 2, 3, 4),
                       splits={"train": [1, 2], "test": [3]})
    ckpt = tmp_path / "ckpt"
    train.main(["--dataset", "duke28", "--data_root", str(root), "--patch_size", "32", "--batch_size", "2",
                "--epoch_size", "2", "--niter", "1", "--n_val", "1",
                "--neighbours", "2", "--skip_nlm", "12", "--skip_bm3d", "2.5", "--skip_bm3d_profile", "lc",
                "--skip_centre_weight", "0.6",
                "--ckpt_dir", str(ckpt), "--img_dir", str(tmp_path / "img")])
    state = torch.load(ckpt / "epoch_1.pth", weights_only=True)
    assert (state["args"]["skip_bm3d"], state["args"]["skip_bm3d_profile"]) == (2.5, "lc")
    assert state["generator"]["net.body.9.weight"].abs().max() > 0  # the zero-initialised last layer has learned
    denoiser = models.load_checkpoint(ckpt / "epoch_1.pth")[0]
    net = denoiser.net
    assert isinstance(net, models.NLMBM3DSkip) and (net.h, net.sigma_factor, net.profile) == (12.0, 2.5, "lc")
    assert net.centre_weight == 0.6
    fresh = models.build_generator("dncnn", in_channels=3, skip_nlm=12, skip_bm3d=2.5, skip_bm3d_profile="lc",
                                   skip_centre_weight=0.6)
    fresh.load_state_dict(state["generator_ema"])
    x = torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(net(x.contiguous(memory_format=torch.channels_last)), fresh.eval()(x),
                                   atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- --d_blur / --real_blur: what the critic sees

class Recorder(torch.nn.Module):
    """A discriminator that keeps what it was shown."""

    def __init__(self):
        super().__init__()
        self.seen, self.scale = [], torch.nn.Parameter(torch.ones(()))

    def forward(self, images):
        self.seen.append(images.detach().clone())
        return self.scale * images.mean(dim=(1, 2, 3))


@pytest.mark.parametrize("d_blur, real_blur", [(0.0, 0.0), (1.5, 0.0), (0.0, 1.0), (1.5, 1.0)])
def test_the_critic_sees_real_and_fake_images_through_d_blur_and_real_blur(trainer_args, d_blur, real_blur):
    torch.manual_seed(0)
    trainer = trainers.TCFLTrainer(trainer_args(d_blur=d_blur, real_blur=real_blur), discriminator=Recorder())
    noisy_a, noisy_b, clean_c = (torch.rand(2, 1, 32, 32) for _ in range(3))
    fakes, _ = trainer.generator_step(noisy_a, noisy_b, clean_c)
    trainer.discriminator_step(clean_c, fakes)
    shown_g, shown_d = trainer.D.seen
    real = clean_c.numpy()
    if real_blur:  # the references only
        real = np.stack([blurred(image[0], (real_blur, real_blur)) for image in real])[:, None]
    expected = np.concatenate([real, fakes.detach().numpy()])
    if d_blur:  # then both
        expected = np.stack([blurred(image[0], (d_blur, d_blur)) for image in expected])[:, None]
    np.testing.assert_allclose(shown_d.numpy(), expected, atol=1e-5)  # the real image and the six fakes
    np.testing.assert_allclose(shown_g.numpy(), expected[len(clean_c):], atol=1e-5)  # G's adversarial term


@pytest.mark.parametrize("name", ["d_blur", "real_blur"])
def test_the_critic_blurs_are_checked(name):
    with pytest.raises(DataError, match=f"--{name} needs a sigma >= 0, got -1.0"):
        train.parse_args([f"--{name}", "-1"])
    with pytest.raises(DataError, match=f"does not read --{name}"):
        train.parse_args(["--method", "cncl", f"--{name}", "1"])


@pytest.mark.parametrize("start", [{"skip_bm3d": 2.5}, {"skip_nlm": 12}])
def test_a_blur_share_mixes_the_blur_start_into_the_filter_forward_and_keeps_its_gradient(start):
    stack = (torch.linspace(0.2, 0.8, 40).expand(2, 3, 32, 40) + 0.05 * torch.randn(2, 3, 32, 40)).clamp(0, 1)
    nets = {}
    for name, options in (("mix", {**start, "skip_blur_share": 0.3}), ("filter", start), ("blur", {"skip_blur": (1.0, 3.0)})):
        torch.manual_seed(0)
        nets[name] = models.build_generator("dncnn", in_channels=3, skip_centre_weight=0.6, **options).eval()
    with torch.no_grad():
        out = {name: stack[:, :1] - net(stack) for name, net in nets.items()}
    torch.testing.assert_close(out["mix"], 0.3 * out["blur"] + 0.7 * out["filter"], atol=1e-6, rtol=0)
    assert (out["mix"] - out["filter"]).abs().mean() > 1e-3  # the share counts
    weights = torch.rand(2, 1, 32, 40)
    grads = []
    for name in ("mix", "blur"):
        x = stack.clone().requires_grad_()
        (nets[name].train()(x) * weights).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_a_checkpoint_rebuilds_the_blur_share(tmp_path):
    ckpt = tmp_path / "ckpt"
    train.main(["--patch_size", "32", "--batch_size", "2", "--epoch_size", "2", "--niter", "1", "--n_val", "1",
                "--skip_nlm", "15", "--skip_blur_share", "0.25", "--ckpt_dir", str(ckpt), "--img_dir", str(tmp_path / "img")])
    denoiser = models.load_checkpoint(ckpt / "epoch_1.pth")[0]
    assert isinstance(denoiser.net, models.NLMSkip) and denoiser.net.blur_share == 0.25
