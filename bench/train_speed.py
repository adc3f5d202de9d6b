"""Speed of one TCFL training step (G and D update): naive flow vs the project's flow.

    python bench/train_speed.py            # batch 2 and 8, 128 x 128 crops, DnCNN
    python bench/train_speed.py --quick

naive:  six separate G calls and seven separate D calls, fp32, default memory format
batched: trainers.TCFLTrainer.step (two G calls, one D call per phase), fp32
+channels_last, +bf16: the same with those switches (bf16 autocast on CPU or CUDA).
Also: the achieved GFLOP/s of the generator's convolutions (forward + backward of G on
a batch the size of one step's six evaluations) against torch.matmul's on this machine.
"""
import argparse

import torch

from common import bf16_is_native, bf16_probe, machine, matmul_gflops, save, timeit

import models
import options
import trainers


def naive_step(trainer, a, b, c):
    """The data flow written the obvious way: one G call per estimate, one D call per image,
    and D's weight gradients computed (then discarded) in the generator's backward pass."""
    G, D, args = trainer.model, trainer.D, trainer.args
    gan = lambda scores, real: trainers.gan_loss(scores, real, args.gan)
    G.train()
    n_a, n_b = G(a), G(b)
    c_a1, c_b1 = a - n_a, b - n_b
    i_a2, i_b2, i_c1, i_c2 = c_a1 + n_b, c_b1 + n_a, c + n_a, c + n_b
    fakes = [c_a1, c_b1, i_a2 - G(i_a2), i_b2 - G(i_b2), i_c1 - G(i_c1), i_c2 - G(i_c2)]
    adversarial = sum(gan(D(f), True) for f in fakes)
    loss_g = adversarial + args.lam * trainer.identity_loss(fakes, c)
    trainer.opt_g.zero_grad()
    loss_g.backward()
    trainer.opt_g.step()
    loss_d = gan(D(c), True) + 0.1 * sum(gan(D(f.detach()), False) for f in fakes)
    trainer.opt_d.zero_grad()
    loss_d.backward()
    trainer.opt_d.step()


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
    print("profile of one batched step (self CPU time): "
          + ", ".join(f"{row['op']} {row['share']:.0%}" for row in table))
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, batch 2 only")
    parser.add_argument("--patch_size", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--force_bf16", action="store_true", help="time bf16 even where it is emulated (hours on such CPUs)")
    parser.add_argument("--no_save", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    batches, repeats = ([2], 2) if args.quick else (args.batches, args.repeats)
    info = machine()
    matmul = matmul_gflops(device)
    print(f"torch.matmul fp32: {matmul:.1f} GFLOP/s")
    skip_bf16 = not bf16_is_native(device) and not args.force_bf16
    probe = bf16_probe(device) if skip_bf16 else None

    rows, profile = [], None
    for batch in batches:
        size = args.patch_size
        a, b, c = (torch.rand(batch, 1, size, size, device=device) for _ in range(3))
        variants = {"naive": {}, "batched": {}, "batched+channels_last": {"channels_last": True},
                    "batched+channels_last+bf16": {"channels_last": True, "bf16": True}}
        results = {}
        for name, switches in variants.items():
            if switches.get("bf16") and skip_bf16:
                results[name] = None
                print(f"batch {batch:2d} {name:<28} skipped: bf16 is emulated here (see above)")
                continue
            torch.manual_seed(0)
            opts = options.parse_args(["--gan", "lsgan"] + (["--bf16"] if switches.get("bf16") else []))  # published loss
            G, D = models.build_generator("dncnn").to(device), models.build_discriminator().to(device)
            x = (a, b, c)
            if switches.get("channels_last"):
                G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
                x = tuple(t.contiguous(memory_format=torch.channels_last) for t in x)
            trainer = trainers.TCFLTrainer(opts, device, generator=G, discriminator=D)
            step = (lambda: naive_step(trainer, *x)) if name == "naive" else (lambda: trainer.step(*x))
            seconds = timeit(step, repeats, device=device.type)
            if name == "batched" and batch == batches[0]:
                profile = profile_step(step)
            results[name] = seconds
            print(f"batch {batch:2d} {name:<28} {seconds:7.3f} s/step  {batch / seconds:7.2f} triplets/s  "
                  f"{3 * batch * size * size / seconds / 1e6:6.3f} MP/s")
        # The generator's share: forward + backward of G on the 6 x batch images of one step.
        G = models.build_generator("dncnn").to(device).train()
        images = torch.rand(6 * batch, 1, size, size, device=device)
        flops = 3 * conv_flops(G.cpu(), (6 * batch, 1, size, size))  # backward ~ 2x forward
        G = G.to(device)
        g_seconds = timeit(lambda: G(images).square().mean().backward(), repeats, device=device.type)
        measured = {k: v for k, v in results.items() if v is not None}
        rows.append({"batch": batch, "patch_size": size, "seconds_per_step": results,
                     "triplets_per_s": {k: batch / v for k, v in measured.items()},
                     "speedup_vs_naive": {k: results["naive"] / v for k, v in measured.items()},
                     "generator_conv_gflops": flops / g_seconds / 1e9})
        print(f"batch {batch:2d} generator convolutions: {flops / g_seconds / 1e9:.1f} GFLOP/s "
              f"({flops / g_seconds / 1e9 / matmul:.0%} of matmul); speed-up over naive: "
              + ", ".join(f"{k} {v:.2f}x" for k, v in rows[-1]["speedup_vs_naive"].items() if k != "naive"))
    if not args.no_save:
        save("train_speed_quick" if args.quick else "train_speed", {"machine": info, "matmul_gflops": matmul, "bf16_probe": probe, "profile_batched_step": profile, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
