"""train.py --neighbour_target W (TCFL + a Noise2Noise term): the (B-scan, neighbour) crops, the loss term,
the single-B-scan generator it trains, and the option checks."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datasets
import models
import train
import trainers
from utils import DataError


def tagged_stack(tags, shape=(40, 50)):
    """A (len(tags), H, W) stack whose slice i is noise plus 10 x tags[i] (tags repeat: context_stack's copies)."""
    rng = np.random.default_rng(0)
    base = rng.random(shape, dtype=np.float32)
    return np.stack([base + 10 * tag for tag in tags])


def test_a_crop_pairs_the_b_scan_with_the_mean_of_its_genuine_neighbours():
    rng = np.random.default_rng(1)
    stack = np.stack([rng.random((6, 7), dtype=np.float32) for _ in range(5)])
    stack[3:] = stack[0]  # two copies of the B-scan (a subject with two neighbours only)
    pair = datasets.with_neighbour_target(stack)
    assert pair.shape == (2, 6, 7)
    np.testing.assert_array_equal(pair[0], stack[0])
    np.testing.assert_allclose(pair[1], (stack[1] + stack[2]) / 2, rtol=1e-6)  # never the B-scan's copies


def test_triplets_with_neighbour_targets_keep_the_neighbours_and_crop_them_together():
    noisy = [tagged_stack([10 * i, 10 * i + 1, 10 * i + 2]) for i in range(3)]
    clean = [np.random.default_rng(2).random((40, 50), dtype=np.float32)]
    dataset = datasets.TripletDataset(noisy, clean, patch_size=16, length=300, neighbour_targets=True)
    triplets = [dataset[i] for i in range(len(dataset))]
    assert {(a.shape, b.shape, c.shape) for a, b, c in triplets} == {((2, 16, 16), (2, 16, 16), (1, 16, 16))}
    for a, b, _ in triplets:
        for pair in (a.numpy(), b.numpy()):
            # the mean of the two neighbours (tags + 1, + 2) at the same place: no dropout to copies
            np.testing.assert_allclose(pair[1] - pair[0], 15.0, atol=1e-4)


def test_neighbour_targets_need_neighbours():
    clean = [np.zeros((40, 50), np.float32)]
    for noisy in ([np.zeros((40, 50), np.float32)] * 2, [tagged_stack([1, 2]), tagged_stack([3, 3, 3])]):
        with pytest.raises(DataError, match="has no registered neighbour B-scan for --neighbour_target"):
            datasets.TripletDataset(noisy, clean, patch_size=16, length=4, neighbour_targets=True)


def test_the_loss_adds_w_times_the_squared_error_of_both_stage_1_estimates(trainer_args):
    torch.manual_seed(0)
    trainer = trainers.TCFLTrainer(trainer_args("--dataset", "duke28", neighbour_target=3.0, frozen_bn=True))
    noisy_a, noisy_b, clean_c = torch.rand(2, 2, 32, 32), torch.rand(2, 2, 32, 32), torch.rand(2, 1, 32, 32)
    targets = torch.cat([noisy_a[:, 1:], noisy_b[:, 1:]])
    with torch.no_grad():
        fakes, (noise_a, noise_b) = trainer.fuse(noisy_a[:, :1], noisy_b[:, :1], clean_c)
        fakes = torch.cat(fakes)
        with_term = trainer.generator_loss(fakes, clean_c, noise_a, noise_b, targets)[0]
        without = trainer.generator_loss(fakes, clean_c, noise_a, noise_b)[0]
    clean_a1, clean_b1 = noisy_a[:, :1] - noise_a, noisy_b[:, :1] - noise_b
    expected = 3.0 * F.mse_loss(torch.cat([clean_a1, clean_b1]), targets)
    torch.testing.assert_close(with_term - without, expected, rtol=1e-4, atol=1e-6)


def test_the_step_feeds_g_the_b_scan_only_and_moves_it_toward_the_neighbour(trainer_args):
    torch.manual_seed(0)
    args = trainer_args("--dataset", "duke28", neighbour_target=1e4, lam=0.0, frozen_bn=True, ema=0.0, lr_g=1e-4, gan="wgan")
    trainer = trainers.TCFLTrainer(args)
    seen = []
    trainer.model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].shape[1]))
    b_scan = torch.rand(4, 1, 32, 32)
    neighbour = (b_scan - 0.5) * 0.5 + 0.5  # reachable by G under --zero_mean: half the B-scan's contrast
    noisy = torch.cat([b_scan, neighbour], dim=1)
    distance = lambda: F.mse_loss(b_scan - trainer.noise(b_scan, 1).detach(), neighbour)
    before = distance()
    for _ in range(6):
        trainer.step(noisy, noisy.flip(0), torch.rand(4, 1, 32, 32))
    assert set(seen) == {1}  # every G call got single B-scans, as at inference
    assert distance() < 0.5 * before


def test_train_with_neighbour_target_ships_a_single_b_scan_generator(tmp_path, fake_duke28):
    root = fake_duke28(tmp_path / "data", ids=range(1, 5), size=(48, 96), neighbours=(1, 2, 3, 4),
                       splits={"train": [1, 2, 3], "test": [4]})
    ckpt = tmp_path / "ckpt"
    train.main(["--dataset", "duke28", "--data_root", str(root), "--n_val", "1", "--neighbour_target", "10",
                "--patch_size", "32", "--batch_size", "2", "--epoch_size", "4", "--niter", "1",
                "--ckpt_dir", str(ckpt), "--img_dir", str(tmp_path / "img")])
    denoiser = models.load_checkpoint(ckpt / "epoch_1.pth")[0]
    assert denoiser.neighbours == 0


@pytest.mark.parametrize("argv, message", [
    (["--neighbour_target", "-1"], "--neighbour_target needs a weight >= 0, got -1.0"),
    (["--neighbour_target", "1", "--neighbours", "2"], "--neighbour_target makes the neighbour B-scans targets"),
    (["--neighbour_target", "1", "--method", "n2n"], "does not read --neighbour_target"),
    (["--neighbour_target", "1"], "--neighbour_target needs registered neighbour B-scans: --dataset duke28, not synthetic"),
])
def test_neighbour_target_option_checks(argv, message):
    argv = argv if "--dataset" in argv or "synthetic" in message else ["--dataset", "duke28"] + argv
    with pytest.raises(DataError, match=message):
        train.parse_args(argv)


