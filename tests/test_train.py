"""TCFL trainer, train.py and evaluate.py --epoch: tiny images, a few steps, never real training."""
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate  # noqa: E402
import models  # noqa: E402
import scoring  # noqa: E402
import train  # noqa: E402
import trainers  # noqa: E402
import utils  # noqa: E402
from utils import DataError  # noqa: E402


def trainer_args(**overrides):
    args = train.parse_args([])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def triplet(batch=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, 1, size, size, generator=g) for _ in range(3)]


def make_trainer(**overrides):
    torch.manual_seed(0)
    return trainers.TCFLTrainer(trainer_args(**overrides))


# ------------------------------------------------------------------ the flow

def test_batched_flow_equals_six_separate_calls():
    trainer = make_trainer(frozen_bn=True, zero_mean=False)
    trainers.freeze_batchnorm(trainer.model)
    a, b, c = triplet()
    with torch.no_grad():
        fakes, (noise_a, noise_b) = trainer.fuse(a, b, c)
        G = trainer.model
        n_a, n_b = G(a), G(b)
        c_a1, c_b1 = a - n_a, b - n_b
        i_a2, i_b2, i_c1, i_c2 = c_a1 + n_b, c_b1 + n_a, c + n_a, c + n_b
        expected = [c_a1, c_b1, i_a2 - G(i_a2), i_b2 - G(i_b2), i_c1 - G(i_c1), i_c2 - G(i_c2)]
        for got, want in zip(fakes, expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        # D once on the six concatenated fakes == the sum of six per-fake LSGAN losses.
        batched = 6 * trainers.gan_loss(trainer.D(torch.cat(fakes)), True, "lsgan")
        separate = sum(trainers.gan_loss(trainer.D(f), True, "lsgan") for f in expected)
        torch.testing.assert_close(batched, separate, rtol=1e-5, atol=1e-6)


def test_noise_scale_rescales_the_noise_that_p2p_and_c2p_add_back():
    trainer = make_trainer(noise_scale=[2.0, 2.0], zero_mean=False)
    seen = []
    real_noise = trainer.noise
    trainer.noise = lambda images: seen.append(images) or real_noise(images)
    a, b, c = triplet()
    with torch.no_grad():
        trainer.fuse(a, b, c)
        noise_a, noise_b = real_noise(torch.cat([a, b])).chunk(2)
    stage2 = torch.cat([a - noise_a + 2 * noise_b, b - noise_b + 2 * noise_a, c + 2 * noise_a, c + 2 * noise_b])
    torch.testing.assert_close(seen[1], stage2)
    drawn = make_trainer(noise_scale=[0.25, 1.5]).noise_scales(torch.zeros(1000, 1, 4, 4))
    assert drawn.shape == (1000, 1, 1, 1) and 0.25 <= drawn.min() < 0.3 and 1.45 < drawn.max() <= 1.5
    with pytest.raises(DataError, match="--noise_scale"):
        train.parse_args(["--noise_scale", "1.5", "0.5"])


def test_discriminator_step_sends_no_gradient_into_generator():
    trainer = make_trainer()
    a, b, c = triplet()
    fakes, _ = trainer.fuse(a, b, c)
    trainer.model.zero_grad(set_to_none=True)
    trainer.discriminator_step(c, torch.cat(fakes))
    assert all(p.grad is None for p in trainer.model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.D.parameters())


def test_generator_step_leaves_discriminator_weights_alone():
    trainer = make_trainer()
    before = [p.clone() for p in trainer.D.parameters()]
    trainer.generator_step(*triplet())
    assert all(torch.equal(x, p) for x, p in zip(before, trainer.D.parameters()))
    assert all(p.requires_grad for p in trainer.D.parameters())


def test_wgan_clipping_bounds_every_discriminator_weight():
    trainer = make_trainer(gan="wgan", clip=0.005, lr_d=0.5)  # a huge lr would push weights far out
    trainer.step(*triplet())
    weights = torch.cat([p.detach().flatten() for p in trainer.D.parameters()])
    assert weights.abs().max() <= 0.005 + 1e-12
    assert weights.abs().max() > 0.004  # clipping bit: the big step went past the bound


class ConstantNoise(nn.Module):
    def __init__(self):
        super().__init__()
        self.value = nn.Parameter(torch.full((1, 1, 1, 1), 0.1))

    def forward(self, x):
        return self.value.expand_as(x)


class BlurResidual(nn.Module):
    """A crude but input-dependent denoiser: noise = x - blur(x)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.scale * (x - F.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False))


@pytest.mark.parametrize("generator, fires", [(ConstantNoise, True), (BlurResidual, False)])
def test_collapse_guard(generator, fires):
    trainer = trainers.TCFLTrainer(trainer_args(), generator=generator())
    stats = trainer.step(*triplet())
    assert (trainers.collapse_warning(stats) is not None) == fires


def test_collapse_guard_silent_for_trained_checkpoint_generator():
    # DnCNN after a few real steps on speckle must not look collapsed.
    trainer = make_trainer()
    for seed in range(3):
        stats = trainer.step(*triplet(seed=seed))
    assert trainers.collapse_warning(stats) is None


def test_ema_follows_generator():
    trainer = make_trainer(ema=0.5)
    trainer.step(*triplet())
    live = torch.cat([p.flatten() for p in trainer.model.parameters()])
    ema = torch.cat([p.flatten() for p in trainer.ema.parameters()])
    assert not torch.equal(live, ema) and (live - ema).abs().max() < 1


# ------------------------------------------------------------------ train.py

TINY = ["--patch_size", "32", "--batch_size", "2", "--epoch_size", "8", "--log_every", "1", "--n_val", "1"]


def run_train(tmp_path, *extra):
    train.main([*TINY, "--ckpt_dir", str(tmp_path / "ckpt"), "--img_dir", str(tmp_path / "img"), *extra])


def log_rows(tmp_path):
    with open(tmp_path / "ckpt" / "log.csv") as f:
        return list(csv.DictReader(f))


def test_train_writes_checkpoint_figure_log_and_evaluates(tmp_path):
    run_train(tmp_path, "--niter", "1")
    path = tmp_path / "ckpt" / "epoch_1.pth"
    state = torch.load(path, weights_only=True)
    assert state["epoch"] == 1 and state["step"] == 4 and state["backbone"] == "dncnn" and state["method"] == "tcfl"
    assert {"generator", "discriminator", "opt_g", "opt_d", "rng", "args", "history"} <= set(state)
    assert isinstance(state["args"], dict) and state["args"]["batch_size"] == 2
    assert not any(k.startswith("module.") for k in state["generator"])
    assert (tmp_path / "img" / "epoch_1.png").is_file() and (tmp_path / "ckpt" / "opt.txt").is_file()
    assert len(log_rows(tmp_path)) == 4 and state["history"][-1]["val_psnr"] > 0
    assert 0 < state["history"][-1]["val_ssim"] <= 1 and float(log_rows(tmp_path)[-1]["val_ssim"]) > 0
    summary = evaluate.main(["--epoch", "1", "--ckpt_dir", str(tmp_path / "ckpt"), "--out_dir", str(tmp_path / "ev"),
                             "--json", str(tmp_path / "ev.json")])
    assert summary["n_images"] == 8 and np.isfinite(summary["mean"]["PSNR"])
    assert (tmp_path / "ev.json").is_file() and (tmp_path / "ev" / "comparison.png").is_file()


def test_resume_reproduces_uninterrupted_run(tmp_path):
    straight, resumed = tmp_path / "a", tmp_path / "b"
    run_train(straight, "--max_steps", "6", "--niter", "2")
    run_train(resumed, "--max_steps", "3", "--niter", "2")
    run_train(resumed, "--max_steps", "6", "--niter", "2", "--resume")
    rows_a, rows_b = log_rows(straight), log_rows(resumed)
    assert [r["step"] for r in rows_b] == [str(s) for s in range(1, 7)]
    for a, b in zip(rows_a, rows_b):
        assert (a["loss_g"], a["loss_d"], a["identity"]) == (b["loss_g"], b["loss_d"], b["identity"])
    ga = torch.load(straight / "ckpt" / "epoch_2.pth", weights_only=True)["generator"]
    gb = torch.load(resumed / "ckpt" / "epoch_2.pth", weights_only=True)["generator"]
    assert all(torch.equal(ga[k], gb[k]) for k in ga)


def test_resume_keeps_the_columns_of_a_log_begun_without_val_ssim(tmp_path):
    run_train(tmp_path, "--max_steps", "3", "--niter", "2")
    with open(tmp_path / "ckpt" / "log.csv") as f:
        old = [{k: v for k, v in row.items() if k != "val_ssim"} for row in csv.DictReader(f)]
    with open(tmp_path / "ckpt" / "log.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(old[0]))
        writer.writeheader()
        writer.writerows(old)
    run_train(tmp_path, "--max_steps", "6", "--niter", "2", "--resume")
    rows = log_rows(tmp_path)
    assert [r["step"] for r in rows] == [str(s) for s in range(1, 7)] and "val_ssim" not in rows[0]
    assert all(float(r["seconds"]) >= 0 for r in rows) and float(rows[-1]["val_psnr"]) > 0


def test_lateral_bin_trains_on_binned_scans_and_denoises_at_full_size(tmp_path, monkeypatch):
    seen = []
    real_dataset = train.datasets.TripletDataset
    monkeypatch.setattr(train.datasets, "TripletDataset",
                        lambda noisy, clean, *a, **k: seen.append((noisy, clean)) or real_dataset(noisy, clean, *a, **k))
    run_train(tmp_path, "--niter", "1", "--lateral_bin", "2")
    (noisy, clean), = seen
    assert {x.shape for x in noisy + clean} == {(256, 128)}  # the synthetic set is 256 x 256
    path = tmp_path / "ckpt" / "epoch_1.pth"
    denoiser, state = models.load_checkpoint(path)
    assert state["args"]["lateral_bin"] == 2 and denoiser.lateral_bin == 2
    image = np.random.default_rng(0).random((64, 96), dtype=np.float32)
    full = denoiser(image)
    unbinned = models.Denoiser(denoiser.net, lateral_bin=1, zero_mean=denoiser.zero_mean)
    by_hand = np.clip(utils.at_lateral_scale(unbinned, image, 2), 0, 1)
    assert full.shape == image.shape
    np.testing.assert_allclose(full, by_hand, atol=1e-6)
    assert not np.allclose(full, unbinned(image), atol=1e-3)
    summary = evaluate.main(["--ckpt", str(path), "--out_dir", str(tmp_path / "ev")])
    assert np.isfinite(summary["mean"]["PSNR"])


def test_lateral_bin_below_one_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="--lateral_bin"):
        train.parse_args(["--lateral_bin", "0"])
    with pytest.raises(DataError, match="--lateral_bin 16 leaves training images 16 px wide, narrower than --patch_size 32"):
        run_train(tmp_path / "narrow", "--lateral_bin", "16")
    run_train(tmp_path, "--max_steps", "1")
    with pytest.raises(DataError, match="--lateral_bin"):
        evaluate.main(["--ckpt", str(tmp_path / "ckpt" / "epoch_1.pth"), "--lateral_bin", "0"])


def test_existing_checkpoints_are_not_overwritten(tmp_path):
    run_train(tmp_path, "--max_steps", "1")
    with pytest.raises(DataError, match="--resume .* or --overwrite"):
        run_train(tmp_path, "--max_steps", "1")
    run_train(tmp_path, "--max_steps", "1", "--overwrite")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real_step, calls = trainers.TCFLTrainer.step, []

    def step(self, *batch):
        stats = real_step(self, *batch)
        calls.append(1)
        if len(calls) == 6:
            stats["loss_g"] = float("nan")
        return stats

    monkeypatch.setattr(trainers.TCFLTrainer, "step", step)
    with pytest.raises(train.TrainingStopped, match="non-finite loss at step 6"):
        run_train(tmp_path, "--niter", "3")
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("epoch_*.pth")) == ["epoch_1.pth"]


def test_ctrl_c_saves_a_checkpoint_then_exits(tmp_path, monkeypatch):
    real_step, calls = trainers.TCFLTrainer.step, []

    def step(self, *batch):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(self, *batch)

    monkeypatch.setattr(trainers.TCFLTrainer, "step", step)
    with pytest.raises(train.TrainingStopped, match="interrupted at step 2"):
        run_train(tmp_path, "--niter", "2")
    assert torch.load(tmp_path / "ckpt" / "epoch_1.pth", weights_only=True)["step"] == 2


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_real_signal_stops_a_running_train_py_with_a_checkpoint(tmp_path, signum):
    """A real process and a real signal. SIGINT starts ignored, as in a shell's background job."""
    ckpt = tmp_path / "ckpt"
    command = [sys.executable, str(Path(train.__file__)), *TINY, "--niter", "1000",
               "--ckpt_dir", str(ckpt), "--img_dir", str(tmp_path / "img")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (ckpt / "log.csv").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, process.communicate()[1][-2000:]
    process.send_signal(signum)
    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"train.py kept running for 60 s after signal {signum.name}")
    assert process.returncode == 1, stderr[-2000:]
    assert "interrupted at step" in stderr and "continue with --resume" in stderr
    state = torch.load(sorted(ckpt.glob("epoch_*.pth"))[-1], weights_only=True)
    assert state["step"] >= 1


# ------------------------------------------------------------------ checkpoints given to evaluate.py

def test_missing_checkpoint_lists_available_epochs(tmp_path):
    (tmp_path / "epoch_3.pth").write_bytes(b"")
    (tmp_path / "epoch_7.pth").write_bytes(b"")
    with pytest.raises(DataError, match="available epochs: 3, 7"):
        evaluate.main(["--epoch", "5", "--ckpt_dir", str(tmp_path)])


def test_corrupt_checkpoint_is_one_clear_error(tmp_path):
    path = tmp_path / "epoch_1.pth"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(DataError, match="not a readable checkpoint"):
        models.load_checkpoint(path)


def test_wrong_architecture_checkpoint_is_one_clear_error(tmp_path):
    path = tmp_path / "g.pth"
    torch.save({"generator": models.build_generator("unet").state_dict(), "backbone": "dncnn"}, path)
    with pytest.raises(DataError, match=r"do not fit a tcfl \(dncnn\) generator"):
        models.load_checkpoint(path)


def test_identity_losses_are_blind_to_a_constant_offset_which_zero_mean_removes():
    """Why --zero_mean exists: G + c gives the same identity loss, so only D would pin c."""
    torch.manual_seed(0)
    base = BlurResidual()

    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.base = base

        def forward(self, x):
            return self.base(x) + 0.2

    a, b, c = triplet()
    results = {}
    for zero_mean in (False, True):
        for name, generator in (("base", base), ("shifted", Shifted())):
            trainer = trainers.TCFLTrainer(trainer_args(zero_mean=zero_mean), generator=generator)
            with torch.no_grad():
                fakes, _ = trainer.fuse(a, b, c)
            results[zero_mean, name] = (trainer.identity_loss(fakes, c).item(), torch.cat(fakes).mean().item())
    assert results[False, "base"][0] == pytest.approx(results[False, "shifted"][0], abs=1e-5)
    assert results[False, "shifted"][1] < results[False, "base"][1] - 0.1  # the offset darkens every estimate
    assert results[True, "shifted"][1] == pytest.approx(results[True, "base"][1], abs=1e-5)
    x = torch.rand(1, 1, 40, 50)
    assert models.predict_noise(Shifted(), x, tile=16, zero_mean=True).mean().abs() < 1e-6  # whole-image mean, after tiling


def test_epoch_best_picks_the_highest_validation_psnr(tmp_path):
    (tmp_path / "log.csv").write_text("epoch,step,val_psnr\n1,5,\n1,10,20.5\n2,20,22.25\n3,30,21.0\n")
    assert models.best_epoch(tmp_path) == 2
    (tmp_path / "log.csv").write_text("epoch,step,val_psnr\n1,5,\n")
    with pytest.raises(DataError, match="no validation PSNR"):
        models.best_epoch(tmp_path)
    with pytest.raises(DataError, match="epoch_2.pth: checkpoint not found"):
        (tmp_path / "log.csv").write_text("epoch,step,val_psnr\n2,20,22.25\n")
        evaluate.main(["--epoch", "best", "--ckpt_dir", str(tmp_path)])



def test_evaluate_split_val_scores_the_images_train_py_validates_on():
    from argparse import Namespace
    from datasets import load_unpaired
    samples = scoring.load_scoring_pairs(Namespace(dataset="synthetic", data_root=None, split="val"))
    validation = load_unpaired("synthetic", None, "train", n_val=2)[2]
    assert [s.id for s in samples] == [s.id for s in validation] == ["val_0", "val_1"]
    for got, want in zip(samples, validation):
        np.testing.assert_array_equal(got.noisy, want.noisy)
        np.testing.assert_array_equal(got.clean, want.clean)
