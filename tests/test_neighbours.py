"""train.py --neighbours K (2.5-D TCFL): the context stack, the training stacks, the pseudo-noisy stacks of
P2P/C2P, the Denoiser's volume input and its single-B-scan fallback, and the checkpoint round trip."""
import numpy as np
import pytest
import torch

import datasets
import evaluate
import models
import train
import trainers
import utils
from utils import DataError

from test_datasets import SPLITS, make_duke28, tag_of  # noqa: F401 (make_duke28: a fixture)


def test_context_stack_puts_the_b_scan_first_then_its_nearest_slices():
    slices = [np.full((2, 3), v, np.float32) for v in range(5)]  # positions 0..4
    first = lambda stack: [int(s[0, 0]) for s in stack]
    assert first(utils.context_stack(slices, 2, 4)) == [2, 1, 3, 0, 4]  # ties: the earlier slice first
    assert first(utils.context_stack(slices, 0, 4)) == [0, 1, 2, 3, 4]
    assert first(utils.context_stack(slices, 4, 2)) == [4, 3, 2]
    assert first(utils.context_stack(slices, 1, 0)) == [1]
    # fewer slices than neighbours: copies of the B-scan fill the rest (the fallback)
    assert first(utils.context_stack(slices[:2], 1, 4)) == [1, 0, 1, 1, 1]
    assert first(utils.context_stack(slices[:1], 0, 2)) == [0, 0, 0]


def test_duke28_training_stacks_centre_every_b_scan_of_a_subject(tmp_path, make_duke28):
    make_duke28(tmp_path, splits=SPLITS)
    noisy, clean, val = datasets.load_unpaired("duke28", tmp_path, "train", n_val=1, neighbours=4)
    assert len(noisy) == 15 and {x.shape for x in noisy} == {(5, *noisy[0].shape[1:])}
    by_centre = {tag_of(stack[0]): [tag_of(s) for s in stack] for stack in noisy}
    # scanning order 1, 2, test, 3, 4 (tags 10n + k, test.tif 10n)
    assert by_centre[10] == [10, 12, 13, 11, 14]
    assert by_centre[11] == [11, 12, 10, 13, 14]
    assert by_centre[14] == [14, 13, 10, 12, 11]
    assert sorted(by_centre) == [10, 11, 12, 13, 14, 20, 21, 22, 23, 24, 30, 31, 32, 33, 34]
    assert [tag_of(x) for x in clean] == [19, 29, 39] and [s.id for s in val] == ["4"]
    two, _, _ = datasets.load_unpaired("duke28", tmp_path, "train", n_val=1, neighbours=2)
    assert {x.shape[0] for x in two} == {3}


def test_neighbours_need_a_data_set_with_registered_neighbours(tmp_path):
    with pytest.raises(DataError, match="--neighbours 2 needs registered neighbouring B-scans: --dataset duke28"):
        datasets.load_unpaired("synthetic", neighbours=2)


@pytest.mark.parametrize("backbone", list(models.GENERATORS))
def test_a_new_generator_ignores_the_neighbours_until_trained(backbone):
    torch.manual_seed(0)
    net = models.build_generator(backbone, in_channels=5).eval()
    x = torch.rand(1, 5, 32, 32)
    with torch.no_grad():
        same = net(x)
        x[:, 1:] = torch.rand(1, 4, 32, 32)
        torch.testing.assert_close(net(x), same)
        x[:, 0] += 0.1
        assert not torch.allclose(net(x), same)


def test_triplets_of_stacks_and_the_neighbour_dropout():
    rng = np.random.default_rng(0)
    noisy = [rng.random((3, 40, 50), dtype=np.float32) for _ in range(3)]
    clean = [rng.random((40, 50), dtype=np.float32)]
    dataset = datasets.TripletDataset(noisy, clean, patch_size=16, length=400)
    triplets = [dataset[i] for i in range(len(dataset))]
    assert {(a.shape, b.shape, c.shape) for a, b, c in triplets} == {((3, 16, 16), (3, 16, 16), (1, 16, 16))}
    # a stack's slices are cropped at the same place: its B-scan's crop occurs in the image it came from
    a = triplets[0][0].numpy()
    assert any(np.allclose(a[1], image[1, t:t + 16, l:l + 16]) or np.allclose(a[1], image[1, t:t + 16, l:l + 16][:, ::-1])
               for image in noisy for t in range(25) for l in range(35))
    dropped = np.mean([bool((x[1:] == x[:1]).all()) for a, b, _ in triplets for x in (a, b)])
    assert abs(dropped - datasets.NEIGHBOUR_DROPOUT) < 0.04


def test_p2p_and_c2p_stacks_carry_other_images_noise_as_neighbours(trainer_args):
    torch.manual_seed(0)
    trainer = trainers.TCFLTrainer(trainer_args(neighbours=2, zero_mean=False, frozen_bn=True))
    assert trainer.model.body[0].in_channels == 3
    trainer.train_mode()
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    b[1, 1:] = b[1, :1]  # a dropped stack: its neighbours are copies
    c = torch.rand(2, 1, 32, 32, generator=g)
    seen, real_noise = [], trainer.noise
    trainer.noise = lambda images, estimates: seen.append(images) or real_noise(images, estimates)
    with torch.no_grad():
        fakes, (noise_a, noise_b) = trainer.fuse(a, b, c)
        n = [trainer.model(x[None])[0] for x in (a[0], a[1], b[0], b[1])]  # the pool: a0, a1, b0, b1, then mirrored
    pool = n + [x.flip(-1) for x in n]
    stacks = [torch.cat([n[0], n[1], n[2]]), torch.cat([n[1], n[2], n[3]]),
              torch.cat([n[2], n[3], pool[4]]), torch.cat([n[3], n[3], n[3]])]  # b1 dropped: its own noise
    clean = [a[0, :1] - n[0], a[1, :1] - n[1], b[0, :1] - n[2], b[1, :1] - n[3]]
    stage2 = torch.stack([clean[0] + stacks[2], clean[1] + stacks[3], clean[2] + stacks[0], clean[3] + stacks[1],
                          c[0] + stacks[0], c[1] + stacks[1], c[0] + stacks[2], c[1] + stacks[3]])
    torch.testing.assert_close(seen[1], stage2, rtol=1e-4, atol=1e-4)
    assert [f.shape for f in fakes] == [(2, 1, 32, 32)] * 6 and noise_a.shape == (2, 1, 32, 32)
    # G(stack) = slice 0 - slice 1, the shortcut the neighbours' own residuals would let through, now misses C_C
    cheat = lambda x: x[:, :1] - x[:, 1:2]
    _, stacks_b = trainers.TCFLTrainer.noise_stacks(a, b, cheat(a), cheat(b))
    assert (c - cheat(c + stacks_b)).sub(c).abs().mean() > 0.1


class StackMeanResidual(torch.nn.Module):
    """noise = the B-scan - the stack's mean: denoising averages the B-scan with its neighbours."""

    def forward(self, x):
        return x[:, :1] - x.mean(dim=1, keepdim=True)


def test_denoiser_reads_the_volume_and_falls_back_to_copies():
    denoiser = models.Denoiser(StackMeanResidual(), neighbours=2)
    volume = np.random.default_rng(0).random((5, 40, 48), dtype=np.float32)
    np.testing.assert_allclose(denoiser(volume), volume[1:4].mean(0), atol=1e-6)  # the middle B-scan, 2 nearest
    np.testing.assert_allclose(denoiser(volume, centre=0), volume[:3].mean(0), atol=1e-6)
    np.testing.assert_allclose(denoiser(volume[2]), volume[2], atol=1e-6)  # alone: copies, nothing to average
    assert models.Denoiser(StackMeanResidual(), lateral_bin=4, neighbours=2)(volume).shape == (40, 48)
    # a single-B-scan net handed a volume denoises its middle B-scan alone
    single = models.Denoiser(models.build_generator("dncnn").eval(), lateral_bin=2)
    np.testing.assert_allclose(single(volume), single(volume[2]), atol=1e-6)
    net = models.build_generator("dncnn", in_channels=3).eval()
    x = torch.from_numpy(volume[None, 1:4])
    assert net(x).shape == (1, 1, 40, 48)
    assert models.predict_noise(net, x, tile=16, margin=8).shape == (1, 1, 40, 48)  # tiled: one channel out too


def test_train_and_evaluate_with_neighbours(tmp_path, fake_duke28, capsys):
    root = fake_duke28(tmp_path / "data", ids=range(1, 6), size=(48, 96), neighbours=(1, 2, 3, 4),
                       splits={"train": [1, 2, 3], "test": [4, 5]})
    ckpt = tmp_path / "ckpt"
    train.main(["--dataset", "duke28", "--data_root", str(root), "--n_val", "1", "--neighbours", "4", "--val_neighbours",
                "--patch_size", "32", "--batch_size", "2", "--epoch_size", "4", "--niter", "1",
                "--ckpt_dir", str(ckpt), "--img_dir", str(tmp_path / "img")])
    assert "5 validation pairs" in capsys.readouterr().out  # subject 3's B-scan and its 4 neighbours, each with the rest
    state = torch.load(ckpt / "epoch_1.pth", weights_only=True)
    assert state["inference"]["neighbours"] == 4
    first = state["generator_ema"]["body.0.weight"]  # the neighbours' weights, still ~0 after 2 steps, made to matter
    first[:, 1:] = torch.randn_like(first[:, 1:])
    torch.save(state, ckpt / "epoch_1.pth")
    denoiser = models.load_checkpoint(ckpt / "epoch_1.pth")[0]
    assert denoiser.neighbours == 4
    summary = evaluate.main(["--ckpt", str(ckpt / "epoch_1.pth"), "--dataset", "duke28", "--data_root", str(root),
                             "--split", "test", "--precision", "fp32", "--out_dir", str(tmp_path / "ev")])
    assert summary["bscans"] == 5 and summary["n_images"] == 2
    sample = datasets.load_pairs("duke28", root, "test")[0]
    # the denoiser runs in fp32, as evaluate.py --precision fp32 (auto picks bf16 on CPUs with native bf16)
    with_neighbours, alone = (utils.psnr(sample.clean, denoiser(x)) for x in (sample.volume(), sample.noisy))
    assert summary["per_image"][0]["PSNR"] == pytest.approx(with_neighbours, abs=1e-6)
    assert abs(with_neighbours - alone) > 1e-3  # measured 4e-3: the check can tell the two inputs apart
    fallback = evaluate.main(["--ckpt", str(ckpt / "epoch_1.pth"), "--dataset", "duke28", "--data_root", str(root),
                              "--split", "test", "--precision", "fp32", "--lone_bscan", "--out_dir", str(tmp_path / "ev_lone")])
    assert fallback["bscans"] == 1 and fallback["method"].endswith("-lone")
    assert fallback["per_image"][0]["PSNR"] == pytest.approx(alone, abs=1e-6)  # the B-scan as copies of itself
    exported = tmp_path / "G.pth"
    evaluate.main(["--ckpt", str(ckpt / "epoch_1.pth"), "--export", str(exported)])
    assert models.load_checkpoint(exported)[0].neighbours == 4
    with pytest.raises(DataError, match="does not read --neighbours"):
        train.parse_args(["--method", "n2n", "--neighbours", "2"])
    alone = fake_duke28(tmp_path / "alone", ids=(1, 2), size=(48, 96), splits={"train": [], "test": [1, 2]})
    lone = evaluate.main(["--ckpt", str(exported), "--dataset", "duke28", "--data_root", str(alone), "--split", "test",
                          "--out_dir", str(tmp_path / "ev_alone")])
    assert lone["bscans"] == 1 and "2 of 2 images have no registered neighbouring B-scans" in capsys.readouterr().out
