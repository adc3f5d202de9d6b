"""Speed of one TCFL training step (G and D update): the plain published flow vs train.py's flows.

    python bench/train_speed.py            # batch 2 and 8, 128 x 128 crops, DnCNN
    python bench/train_speed.py --quick

naive: the published flow written plainly: one G call per estimate (six per step), one D call
    per image, D's weight gradients computed (then discarded) in G's update; fp32, default memory.
per_estimate / batched: trainers.TCFLTrainer.step with --g_calls per_estimate (six G calls, the
    same BatchNorm statistics as naive) or batched (two G calls of 2x and 4x the batch; train.py's
    default, 0.4 dB better on validation);
+channels_last, +bf16: the same with those switches (bf16 only where the hardware has it).
train.py's flow on this device (--channels_last/--precision auto) is named in the summary.
Each flow's first-step losses are compared with naive's from the same weights: equal to
float rounding where only the scheduling differs, not for batched (BatchNorm over bigger calls).
Also: the achieved GFLOP/s of the generator's convolutions against torch.matmul's.
"""
import argparse

import torch

from common import bf16_probe, machine, matmul_gflops, save, timeit

import models
import options
import trainers
from utils import bf16_is_native, resolve_device


def naive_step(trainer, a, b, c):
    """The data flow written the obvious way: one G call per estimate, one D call per image,
    and D's weight gradients computed (then discarded) in the generator's backward pass.
    Returns (loss_g, loss_d)."""
    G, D, args = trainer.model, trainer.D, trainer.args
    gan = lambda scores, real: trainers.gan_loss(scores, real, args.gan)

    def noise(x):
        estimate = G(x)
        return estimate - estimate.mean(dim=(-2, -1), keepdim=True) if trainer.zero_mean else estimate

    G.train()
    n_a, n_b = noise(a), noise(b)
    c_a1, c_b1 = a - n_a, b - n_b
    i_a2, i_b2, i_c1, i_c2 = c_a1 + n_b, c_b1 + n_a, c + n_a, c + n_b
    fakes = [c_a1, c_b1, i_a2 - noise(i_a2), i_b2 - noise(i_b2), i_c1 - noise(i_c1), i_c2 - noise(i_c2)]
    adversarial = sum(gan(D(f), True) for f in fakes)
    loss_g = adversarial + args.lam * trainer.identity_loss(fakes, c)
    trainer.opt_g.zero_grad()
    loss_g.backward()
    trainer.opt_g.step()
    loss_d = gan(D(c), True) + trainer.d_fake_weight * sum(gan(D(f.detach()), False) for f in fakes)
    trainer.opt_d.zero_grad()
    loss_d.backward()
    trainer.opt_d.step()
    return loss_g.item(), loss_d.item()


def conv_flops(model, shape):
    """Forward FLOPs (2 x multiply-adds) of the model's convolutions for an input shape."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        k = module.kernel_size[0] * module.kernel_size[1]
        total += 2 * output.numel() * module.in_channels // module.groups * k

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model.eval()(torch.zeros(shape))
    for h in handles:
        h.remove()
    model.train()
    return total


def profile_step(step, top=8):
    """Where one training step's time goes: the operators with the largest self CPU time."""
    from torch.profiler import ProfilerActivity, profile
    step()  # warm-up outside the profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    table = [{"op": e.key, "share": e.self_cpu_time_total / total, "calls": e.count} for e in events[:top]]
    print("profile of one step of train.py's flow (self CPU time): "
          + ", ".join(f"{row['op']} {row['share']:.0%}" for row in table))
    return table


def flows(device):
    """({name: train.py options} of the flows timed, the name of the one train.py picks on this device)."""
    fp32 = {"naive": ["--no-channels_last"],
            "batched": ["--g_calls", "batched", "--no-channels_last"],
            "per_estimate": ["--g_calls", "per_estimate", "--no-channels_last"],
            "batched+channels_last": ["--g_calls", "batched", "--channels_last"],
            "per_estimate+channels_last": ["--g_calls", "per_estimate", "--channels_last"]}
    variants = {name: ["--gan", "lsgan", "--precision", "fp32"] + flags for name, flags in fp32.items()}
    if bf16_is_native(device):
        variants.update({f"{name}+bf16": ["--gan", "lsgan", "--precision", "bf16"] + flags
                         for name, flags in fp32.items() if name != "naive"})
    chosen = trainers.resolve_for_device(options.parse_args([]), device)
    auto = chosen.g_calls + "+channels_last" * chosen.channels_last + "+bf16" * chosen.bf16
    return variants, auto


def time_flow(name, flags, batch, size, device, repeats):
    """(seconds per step, first-step (loss_g, loss_d), the step function) of one flow, from seed-0 weights and data."""
    torch.manual_seed(0)
    opts = options.parse_args(flags)
    G, D = models.build_generator("dncnn").to(device), models.build_discriminator().to(device)
    trainer = trainers.TCFLTrainer(opts, device, generator=G, discriminator=D)
    memory = torch.channels_last if trainer.args.channels_last else torch.contiguous_format
    generator = torch.Generator().manual_seed(1)
    a, b, c = (torch.rand(batch, 1, size, size, generator=generator).to(device).contiguous(memory_format=memory)
               for _ in range(3))
    if name == "naive":
        step, losses = (lambda: naive_step(trainer, a, b, c)), naive_step(trainer, a, b, c)
    else:
        stats = trainer.step(a, b, c)
        step, losses = (lambda: trainer.step(a, b, c)), (stats["loss_g"], stats["loss_d"])
    return timeit(step, repeats, warmup=0, device=device.type), losses, step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, batch 2 only")
    parser.add_argument("--patch_size", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--no_save", action="store_true")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    batches, repeats = ([2], 2) if args.quick else (args.batches, args.repeats)
    info = machine()
    matmul = matmul_gflops(device)
    native = bf16_is_native(device)
    print(f"torch.matmul fp32: {matmul:.1f} GFLOP/s; bf16 native here: {native}"
          + ("" if native else " (bf16 rows skipped: emulated, see the probe)"))
    probe = None if native else bf16_probe(device)
    variants, auto = flows(device)
    print(f"train.py's flow on {device.type} (--g_calls batched, --channels_last/--precision auto): {auto}")

    rows, profile, size = [], None, args.patch_size
    for batch in batches:
        seconds, losses = {}, {}
        for name, flags in variants.items():
            seconds[name], losses[name], step = time_flow(name, flags, batch, size, device, repeats)
            if name == auto and batch == batches[0]:
                profile = profile_step(step)
            print(f"batch {batch:2d} {name:<34} {seconds[name]:7.3f} s/step  {seconds['naive'] / seconds[name]:5.2f}x naive  "
                  f"first-step loss_g {losses[name][0]:.6f} loss_d {losses[name][1]:.6f}")
        loss_gap = {k: max(abs(x - y) / abs(y) for x, y in zip(v, losses["naive"])) for k, v in losses.items()}
        rows.append({"batch": batch, "patch_size": size, "seconds_per_step": seconds,
                     "speedup_vs_naive": {k: seconds["naive"] / v for k, v in seconds.items()},
                     "first_step_losses": losses, "max_relative_loss_difference_vs_naive": loss_gap,
                     "train_py_flow": auto, "generator_conv_gflops": generator_gflops(batch, size, device, repeats)})
        print(f"batch {batch:2d} train.py's flow ({auto}): {rows[-1]['speedup_vs_naive'][auto]:.2f}x the naive flow; "
              f"relative loss difference to naive {loss_gap[auto]:.1e}; G's convolutions "
              f"{rows[-1]['generator_conv_gflops']:.0f} GFLOP/s ({rows[-1]['generator_conv_gflops'] / matmul:.0%} of matmul)")
    if not args.no_save:
        save("train_speed_quick" if args.quick else "train_speed",
             {"machine": info, "matmul_gflops": matmul, "bf16_native": native, "bf16_probe": probe,
              "train_py_flow": auto, "profile_train_py_step": profile, "rows": rows})
    return rows


def generator_gflops(batch, size, device, repeats):
    """Achieved GFLOP/s of G's convolutions, forward + backward on one estimate's batch, in train.py's layout."""
    G = models.build_generator("dncnn").train()
    flops = 3 * conv_flops(G, (batch, 1, size, size))  # backward ~ 2x forward
    layout = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    G = G.to(device).to(memory_format=layout)
    images = torch.rand(batch, 1, size, size, device=device).contiguous(memory_format=layout)
    return flops / timeit(lambda: G(images).square().mean().backward(), repeats, device=device.type) / 1e9


if __name__ == "__main__":
    main()
