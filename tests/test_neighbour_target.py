"""train.py --neighbour_target W (TCFL + a Noise2Noise term) and --bm3d_target W (+ a term towards BM3D.py's
output): the (B-scan, target) crops, the loss term, the single-B-scan generator they train, and the option checks."""
from argparse import Namespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import baselines
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


def test_the_target_is_the_mean_of_the_genuine_neighbours():
    rng = np.random.default_rng(1)
    stack = np.stack([rng.random((6, 7), dtype=np.float32) for _ in range(5)])
    stack[3:] = stack[0]  # two copies of the B-scan (a subject with two neighbours only)
    np.testing.assert_allclose(datasets.neighbour_mean(stack), (stack[1] + stack[2]) / 2, rtol=1e-6)  # never the copies


def target_args(neighbour_target=0.0, bm3d_target=0.0, lateral_bin=4, neighbours=0):
    return Namespace(neighbour_target=neighbour_target, bm3d_target=bm3d_target, lateral_bin=lateral_bin, neighbours=neighbours)


def test_triplets_with_neighbour_targets_keep_the_neighbours_and_crop_them_together():
    stacks = [tagged_stack([10 * i, 10 * i + 1, 10 * i + 2]) for i in range(3)]
    clean = [np.random.default_rng(2).random((40, 50), dtype=np.float32)]
    noisy, targets = train.training_targets(target_args(neighbour_target=1.0), stacks)
    assert [image.shape for image in noisy] == [(40, 50)] * 3
    dataset = datasets.TripletDataset(noisy, clean, patch_size=16, length=300, targets=targets)
    triplets = [dataset[i] for i in range(len(dataset))]
    assert {(a.shape, b.shape, c.shape) for a, b, c in triplets} == {((2, 16, 16), (2, 16, 16), (1, 16, 16))}
    for a, b, _ in triplets:
        for pair in (a.numpy(), b.numpy()):
            # the mean of the two neighbours (tags + 1, + 2) at the same place: no dropout to copies
            np.testing.assert_allclose(pair[1] - pair[0], 15.0, atol=1e-4)


def test_neighbour_targets_need_neighbours():
    for stacks in ([np.zeros((40, 50), np.float32)] * 2, [tagged_stack([1, 2]), tagged_stack([3, 3, 3])]):
        with pytest.raises(DataError, match="has no registered neighbour B-scan for --neighbour_target"):
            train.training_targets(target_args(neighbour_target=1.0), stacks)


@pytest.mark.parametrize("lateral_bin, bm3d_bin", [(4, 1), (1, 4), (2, 2)])
def test_bm3d_targets_are_bm3d_py_at_its_own_overall_binning(monkeypatch, lateral_bin, bm3d_bin):
    rng = np.random.default_rng(3)
    noisy = [rng.random((24, 32), dtype=np.float32) for _ in range(2)]
    calls = []
    real = baselines.bm3d_denoise
    monkeypatch.setattr(baselines, "bm3d_denoise", lambda image, **kw: calls.append(kw) or real(image, **kw))
    images, targets = train.training_targets(target_args(bm3d_target=1.0, lateral_bin=lateral_bin), noisy)
    assert images is noisy and calls == [{"lateral_bin": bm3d_bin}] * 2  # 4:1 overall, as BM3D.py denoises
    for image, target in zip(noisy, targets):
        np.testing.assert_array_equal(target, real(image, lateral_bin=bm3d_bin))
    assert train.training_targets(target_args(), noisy) == (noisy, None)


def test_with_neighbours_the_stacks_stay_whole_for_the_trainer_to_mask():
    stacks = [tagged_stack([0, 1, 2, 3, 4])]
    noisy, targets = train.training_targets(target_args(neighbour_target=1.0, neighbours=4), stacks)
    assert noisy is stacks and targets is None


def test_triplets_crop_each_image_with_its_own_target_at_the_same_place():
    noisy = [tagged_stack([i])[0] for i in range(3)]
    targets = [image + 100 + i for i, image in enumerate(noisy)]
    dataset = datasets.TripletDataset(noisy, [noisy[0]], patch_size=16, length=50, targets=targets)
    for a, b, _ in (dataset[i] for i in range(len(dataset))):
        for pair in (a.numpy(), b.numpy()):
            offset = pair[1] - pair[0]
            np.testing.assert_allclose(offset, offset.flat[0], atol=1e-4)  # the same place
            assert round(float(offset.flat[0])) - 100 == round(float(pair[0].mean() - 0.5) / 10)  # its own target


@pytest.mark.parametrize("option", ["neighbour_target", "bm3d_target"])
def test_the_loss_adds_w_times_the_squared_error_of_both_stage_1_estimates(trainer_args, option):
    torch.manual_seed(0)
    trainer = trainers.TCFLTrainer(trainer_args("--dataset", "duke28", frozen_bn=True, **{option: 3.0}))
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


@pytest.mark.parametrize("option", ["--neighbour_target", "--bm3d_target"])
def test_train_with_a_target_ships_a_single_b_scan_generator(tmp_path, fake_duke28, option):
    root = fake_duke28(tmp_path / "data", ids=range(1, 5), size=(48, 96), neighbours=(1, 2, 3, 4),
                       splits={"train": [1, 2, 3], "test": [4]})
    ckpt = tmp_path / "ckpt"
    train.main(["--dataset", "duke28", "--data_root", str(root), "--n_val", "1", option, "10",
                "--patch_size", "32", "--batch_size", "2", "--epoch_size", "4", "--niter", "1",
                "--ckpt_dir", str(ckpt), "--img_dir", str(tmp_path / "img")])
    denoiser = models.load_checkpoint(ckpt / "epoch_1.pth")[0]
    assert denoiser.neighbours == 0


@pytest.mark.parametrize("argv, message", [
    (["--neighbour_target", "-1"], "--neighbour_target needs a weight >= 0, got -1.0"),
    (["--neighbour_target", "1", "--neighbours", "1"], "it needs --neighbours >= 2"),
    (["--neighbour_target", "1", "--method", "n2n"], "does not read --neighbour_target"),
    (["--neighbour_target", "1"], "--neighbour_target needs registered neighbour B-scans: --dataset duke28, not synthetic"),
    (["--bm3d_target", "-1"], "--bm3d_target needs a weight >= 0, got -1.0"),
    (["--bm3d_target", "1", "--neighbour_target", "1"], "--bm3d_target and --neighbour_target both name the target"),
    (["--bm3d_target", "1", "--neighbours", "2"], "--bm3d_target denoises single B-scans: not with --neighbours"),
    (["--bm3d_target", "1", "--method", "r2r"], "does not read --bm3d_target"),
])
def test_neighbour_target_option_checks(argv, message):
    argv = argv if "--dataset" in argv or "synthetic" in message else ["--dataset", "duke28"] + argv
    with pytest.raises(DataError, match=message):
        train.parse_args(argv)




# ---------------------------------------------------------------- with --neighbours: a masked Noise2Noise

def tagged_batch(tags_per_stack, size=8):
    """(B, len(tags), size, size): slice j of stack i is constant tags_per_stack[i][j]."""
    return torch.tensor(tags_per_stack, dtype=torch.float32)[:, :, None, None].expand(-1, -1, size, size).clone()


def test_one_neighbour_leaves_the_input_for_the_target_and_its_partner_fills_the_slot():
    torch.manual_seed(0)
    stacks = tagged_batch([[0, 1, 2, 3, 4]] * 400)
    held_in, targets, mask = trainers.TCFLTrainer.hold_out_neighbour(stacks)
    assert held_in.shape == stacks.shape and targets.shape == (400, 1, 8, 8) and mask.flatten().tolist() == [1.0] * 400
    assert torch.equal(stacks, tagged_batch([[0, 1, 2, 3, 4]] * 400))  # the caller's batch is untouched
    partner = {1: 2, 2: 1, 3: 4, 4: 3}  # the other neighbour of the same rank (nearest first)
    seen = set()
    for stack, target in zip(held_in[:, :, 0, 0].tolist(), targets[:, 0, 0, 0].tolist()):
        held = int(target)
        seen.add(held)
        assert held not in stack  # G never reads its target
        assert stack[0] == 0 and sorted(stack[1:]) == sorted([v for v in (1, 2, 3, 4) if v != held] + [partner[held]])
    assert seen == {1, 2, 3, 4}  # each neighbour is drawn


def test_an_odd_number_of_neighbours_pairs_the_last_with_the_one_before():
    torch.manual_seed(1)
    held_in, targets, _ = trainers.TCFLTrainer.hold_out_neighbour(tagged_batch([[0, 1, 2, 3]] * 200))
    for stack, target in zip(held_in[:, :, 0, 0].tolist(), targets[:, 0, 0, 0].tolist()):
        assert target not in stack and stack.count({1: 2, 2: 1, 3: 2}[int(target)]) == 2


def test_a_held_out_copy_of_the_b_scan_is_masked():
    torch.manual_seed(2)
    # dropped neighbours (all copies) and a subject with two neighbours only (slots 3-4 are copies)
    stacks = tagged_batch([[5, 5, 5, 5, 5]] * 50 + [[0, 1, 2, 0, 0]] * 200)
    _, targets, mask = trainers.TCFLTrainer.hold_out_neighbour(stacks)
    mask, targets = mask.flatten(), targets[:, 0, 0, 0]
    assert mask[:50].sum() == 0
    assert torch.equal(mask[50:], (targets[50:] != 0).float()) and 0 < mask[50:].sum() < 200


def test_the_masked_term_averages_over_the_unmasked_targets_only(trainer_args):
    trainer = trainers.TCFLTrainer(trainer_args("--dataset", "duke28", frozen_bn=True, neighbour_target=2.0))
    fakes, clean_c = torch.zeros(12, 1, 32, 32), torch.zeros(2, 1, 32, 32)
    noise = torch.zeros(2, 1, 32, 32)
    targets = torch.tensor([1.0, 3.0, 100.0, 5.0])[:, None, None, None].expand(-1, 1, 32, 32)
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0])[:, None, None, None]
    with torch.no_grad():
        with_term = trainer.generator_loss(fakes, clean_c, noise, noise, targets, mask)[0]
        without = trainer.generator_loss(fakes, clean_c, noise, noise)[0]
    torch.testing.assert_close(with_term - without, torch.tensor(2.0 * (1 + 9 + 25) / 3))


def test_the_masked_step_never_shows_g_its_target(trainer_args):
    torch.manual_seed(0)
    args = trainer_args("--dataset", "duke28", neighbours=4, neighbour_target=1e4, frozen_bn=True, ema=0.0, gan="wgan")
    trainer = trainers.TCFLTrainer(args)
    stage_1 = []
    trainer.model.register_forward_pre_hook(lambda module, inputs: stage_1.append(inputs[0].detach().clone()))
    stacks = torch.rand(4, 5, 32, 32) + torch.arange(5.0)[None, :, None, None] * 10  # slice j near 10 j
    trainer.step(stacks, stacks.flip(0), torch.rand(4, 1, 32, 32))
    first_call = stage_1[0]  # I_A and I_B, stacked
    assert first_call.shape == (8, 5, 32, 32)
    levels = (first_call.mean(dim=(-2, -1)) / 10).round()
    for row in levels.tolist():
        assert row[0] == 0 and len(set(row[1:])) == 3  # one neighbour missing, its partner twice


def test_train_with_neighbours_and_a_neighbour_target_ships_a_stack_generator(tmp_path, fake_duke28):
    root = fake_duke28(tmp_path / "data", ids=range(1, 5), size=(48, 96), neighbours=(1, 2, 3, 4),
                       splits={"train": [1, 2, 3], "test": [4]})
    ckpt = tmp_path / "ckpt"
    train.main(["--dataset", "duke28", "--data_root", str(root), "--n_val", "1", "--neighbour_target", "10",
                "--neighbours", "4", "--patch_size", "32", "--batch_size", "2", "--epoch_size", "4", "--niter", "1",
                "--ckpt_dir", str(ckpt), "--img_dir", str(tmp_path / "img")])
    assert models.load_checkpoint(ckpt / "epoch_1.pth")[0].neighbours == 4
