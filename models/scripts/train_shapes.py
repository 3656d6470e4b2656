"""Train tiny-shapes, the default model: a tiny Stable Diffusion 1.x that draws coloured shapes.

    nice -n 19 .venv/bin/python models/scripts/train_shapes.py [--out models/tiny-shapes]

Two stages on the CPU, seeded, data drawn from `shapes_dataset.py`:
  1. an AutoencoderKL (64x64x3 <-> 16x16x4), reconstruction + a small KL term;
  2. a CLIP text encoder (real 49,408-token vocabulary) and a UNet2DConditionModel
     together, epsilon prediction on the frozen VAE's latents, 10% empty captions
     for classifier-free guidance.
Writes a diffusers StableDiffusionPipeline folder with a DPM++ 2M scheduler,
model-settings.json for sdserve and training_log.csv (loss curve), then
generates the test prompts with diffusers and reports how many match.
`--stage vae` / `--stage diffusion` run one stage (the VAE is kept in --work).
"""

import argparse
import json
import math
import os
import resource
import shutil
import sys
import time

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import shapes_dataset  # noqa: E402
import shapes_eval  # noqa: E402

MODEL_NAME = "tiny-shapes"
# SD 1.x noise schedule.
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
DEFAULTS = {"num_inference_steps": 20, "guidance_scale": 5.0, "scheduler": "dpmpp_2m"}
# Dataset seeds: the VAE and the diffusion stage see different pictures.
VAE_DATA_SEED = 1
DIFFUSION_DATA_SEED = 2


def build_vae(args):
    # Three blocks: two 2x downsamplings, so 64x64 images <-> 16x16 latents.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=tuple(args.vae_channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=args.vae_groups,
        sample_size=64,
    )


def build_unet(args):
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=tuple(args.unet_channels),
        layers_per_block=args.unet_layers,
        cross_attention_dim=args.text_hidden,
        attention_head_dim=args.unet_heads,
        norm_num_groups=32,
    )


def build_text_encoder(args, pad_token_id):
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=args.text_hidden,
            intermediate_size=args.text_hidden * 4,
            num_hidden_layers=args.text_layers,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=args.text_hidden,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=pad_token_id,
        )
    )


def cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def to_tensor(images):
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def lr_at(step, total, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class Log:
    def __init__(self, path):
        self.path = path
        self.file = open(path, "w")
        self.file.write("stage,step,samples,seconds,loss,lr\n")

    def row(self, stage, step, samples, seconds, loss, lr):
        self.file.write(f"{stage},{step},{samples},{seconds:.1f},{loss:.6f},{lr:.3g}\n")
        self.file.flush()
        print(f"[{stage}] step {step:6d}  {seconds:7.0f}s  loss {loss:.5f}  lr {lr:.2g}", flush=True)


def make_tokenizer(dest):
    """The real CLIP tokenizer in SD 1.x's layout (pad <|endoftext|>), built once into `dest`."""
    if os.path.exists(os.path.join(dest, "merges.txt")):
        return CLIPTokenizer.from_pretrained(dest)
    from make_tiny_models import write_tokenizer

    return write_tokenizer(dest, "<|endoftext|>")


def train_vae(args, log, t0):
    torch.manual_seed(args.seed)
    vae = build_vae(args).to(args.device)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    running = []
    for step in range(args.vae_steps):
        lr = lr_at(step, args.vae_steps, args.vae_lr, 100)
        for g in opt.param_groups:
            g["lr"] = lr
        first = step * args.vae_batch
        images, _ = shapes_dataset.batch(VAE_DATA_SEED, range(first, first + args.vae_batch))
        x = to_tensor(images).to(args.device)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen).to(args.device)
        recon = vae.decode(z).sample
        rec = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
        kl = posterior.kl().mean() / z[0].numel()
        loss = rec + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        running.append(rec.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.vae_steps:
            log.row("vae", step + 1, (step + 1) * args.vae_batch, time.time() - t0, float(np.mean(running)), lr)
            running_last, running = running, []
    vae = vae.cpu().eval()
    # Latents are scaled to unit variance for the diffusion stage, as SD does.
    with torch.no_grad():
        images, _ = shapes_dataset.batch(VAE_DATA_SEED + 100, range(1024))
        z = vae.encode(to_tensor(images)).latent_dist.sample(gen)
        scaling = float(1.0 / z.std())
        recon = vae.decode(vae.encode(to_tensor(images[:256])).latent_dist.mode()).sample
        err = (recon.clamp(-1, 1) - to_tensor(images[:256])).abs().mean().item() * 127.5
    vae.register_to_config(scaling_factor=round(scaling, 5))
    print(f"vae: latent std {1 / scaling:.4f}, scaling_factor {scaling:.5f}, mean |error| {err:.2f}/255", flush=True)
    path = os.path.join(args.work, "vae")
    vae.save_pretrained(path, safe_serialization=True)
    stats = {
        "wall_seconds": round(time.time() - t0),
        "cpu_seconds": round(cpu_seconds()),
        "final_loss": round(float(np.mean(running_last)), 5),
        "reconstruction_mean_abs_error_255": round(err, 2),
        "scaling_factor": round(scaling, 5),
    }
    with open(os.path.join(args.work, "vae_stats.json"), "w") as f:
        json.dump(stats, f, indent=2)
    return path


class LatentCache:
    """Posterior mean and std of `n` pictures, with their captions."""

    def __init__(self, vae, n, device, data_seed, chunk=256):
        means, stds, self.captions, self.facts = [], [], [], []
        with torch.no_grad():
            for first in range(0, n, chunk):
                idx = range(first, min(n, first + chunk))
                images, captions = shapes_dataset.batch(data_seed, idx)
                post = vae.encode(to_tensor(images).to(device)).latent_dist
                means.append(post.mean)
                stds.append(post.std)
                self.captions += captions
        self.mean = torch.cat(means)
        self.std = torch.cat(stds)


def train_diffusion(args, vae_path, log, t0):
    """Trains the text encoder and UNet from scratch on the frozen VAE's latents."""
    vae = AutoencoderKL.from_pretrained(vae_path).eval().to(args.device)
    scaling = vae.config.scaling_factor
    tokenizer = make_tokenizer(os.path.join(args.work, "tokenizer"))

    t_cache = time.time()
    cache = LatentCache(vae, args.cache, args.device, DIFFUSION_DATA_SEED + args.seed)
    print(f"encoded {args.cache} pictures in {time.time() - t_cache:.0f}s", flush=True)
    unique = sorted(set(cache.captions) | {""})
    ids = tokenizer(unique, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids.to(args.device)
    row_of = {c: i for i, c in enumerate(unique)}
    caption_rows = torch.tensor([row_of[c] for c in cache.captions])
    empty_row = row_of[""]

    torch.manual_seed(args.seed)
    unet = build_unet(args).to(args.device)
    text_encoder = build_text_encoder(args, tokenizer.pad_token_id).to(args.device)
    unet.train()
    text_encoder.train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    print(
        f"unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params, "
        f"text encoder {sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f}M",
        flush=True,
    )
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    ema = [p.detach().clone() for p in params]
    noise_sched = DDPMScheduler(**SCHEDULE)
    alphas = noise_sched.alphas_cumprod.to(args.device)
    snr = alphas / (1 - alphas)
    # Min-SNR-5 weighting of the epsilon loss: faster convergence for few steps.
    weights = torch.clamp(snr, max=5.0) / snr

    gen = torch.Generator().manual_seed(args.seed + 1)
    order = torch.randperm(args.cache, generator=gen)
    pos = 0
    running, last = [], float("nan")
    for step in range(args.steps):
        lr = lr_at(step, args.steps, args.lr, 200)
        for g in opt.param_groups:
            g["lr"] = lr
        if pos + args.batch > args.cache:
            order, pos = torch.randperm(args.cache, generator=gen), 0
        idx = order[pos : pos + args.batch]
        pos += args.batch
        b = len(idx)
        mean, std = cache.mean[idx.to(args.device)], cache.std[idx.to(args.device)]
        latents = (mean + std * torch.randn(mean.shape, generator=gen).to(args.device)) * scaling
        rows = caption_rows[idx].clone()
        rows[torch.rand(b, generator=gen) < args.drop] = empty_row
        noise = torch.randn(latents.shape, generator=gen) + args.offset_noise * torch.randn((b, 4, 1, 1), generator=gen)
        noise = noise.to(args.device)
        t = torch.randint(0, 1000, (b,), generator=gen).to(args.device)
        noisy = noise_sched.add_noise(latents, noise, t)
        context = text_encoder(ids[rows.to(args.device)])[0]
        pred = unet(noisy, t, context).sample
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (weights[t] * per_sample).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p.detach(), 1 - decay)
        running.append(per_sample.mean().item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            last = float(np.mean(running))
            log.row("diffusion", step + 1, (step + 1) * args.batch, time.time() - t0, last, lr)
            running = []
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    final = last
    return vae.cpu(), unet.cpu().eval(), text_encoder.cpu().eval(), tokenizer, final


def eval_loss(vae, unet, text_encoder, tokenizer, n=512, seed=99):
    """Unweighted epsilon MSE of the saved (EMA) weights on fresh pictures, fixed noise."""
    gen = torch.Generator().manual_seed(seed)
    noise_sched = DDPMScheduler(**SCHEDULE)
    with torch.no_grad():
        images, captions = shapes_dataset.batch(DIFFUSION_DATA_SEED + 1000, range(n))
        latents = vae.encode(to_tensor(images)).latent_dist.sample(gen) * vae.config.scaling_factor
        ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, 1000, (n,), generator=gen)
        losses = []
        for k in range(0, n, 64):
            s = slice(k, k + 64)
            pred = unet(noise_sched.add_noise(latents[s], noise[s], t[s]), t[s], text_encoder(ids[s])[0]).sample
            losses.append(F.mse_loss(pred, noise[s], reduction="none").mean(dim=(1, 2, 3)))
    return float(torch.cat(losses).mean())


def save(args, vae, unet, text_encoder, tokenizer, summary):
    out = args.out
    if os.path.exists(out):
        shutil.rmtree(out)
    scheduler = DPMSolverMultistepScheduler(**SCHEDULE, steps_offset=1, prediction_type="epsilon", timestep_spacing="linspace")
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    # Drop the machine-specific source paths diffusers and transformers record.
    for component in ("unet", "vae", "text_encoder"):
        path = os.path.join(out, component, "config.json")
        with open(path) as f:
            config = json.load(f)
        if config.pop("_name_or_path", None) is not None:
            with open(path, "w") as f:
                json.dump(config, f, indent=2, sort_keys=True)
                f.write("\n")
    # Keep the classic tokenizer layout of real SD folders (no tokenizer.json).
    shutil.rmtree(os.path.join(out, "tokenizer"))
    shutil.copytree(os.path.join(args.work, "tokenizer"), os.path.join(out, "tokenizer"))
    settings = {
        "name": MODEL_NAME,
        "implementation": "sdserve.StableDiffusion",
        "parameters": {"extra": {"defaults": DEFAULTS}},
    }
    with open(os.path.join(out, "model-settings.json"), "w") as f:
        json.dump(settings, f, indent=2)
        f.write("\n")
    shutil.copy(os.path.join(args.work, "training_log.csv"), os.path.join(out, "training_log.csv"))
    with open(os.path.join(out, "training.json"), "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(r, n)) for r, _, files in os.walk(out) for n in files)
    print(f"{out}: {total / 1e6:.2f} MB", flush=True)
    if total > 30 * 1024 * 1024:
        raise SystemExit(f"{out} is {total} bytes, over 30 MiB")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(REPO, "models", MODEL_NAME))
    parser.add_argument("--work", default="/tmp/tiny-shapes-work", help="VAE, tokenizer and log between stages")
    parser.add_argument("--stage", choices=["all", "vae", "diffusion"], default="all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-eval", action="store_true", help="skip generating the test prompts")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--vae-channels", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--vae-groups", type=int, default=16)
    parser.add_argument("--eval-repeats", type=int, default=1, help="seeds per test prompt")
    parser.add_argument("--vae-kl", type=float, default=1e-4, help="weight of the per-element KL term")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--drop", type=float, default=0.1, help="fraction of empty captions")
    parser.add_argument("--offset-noise", type=float, default=0.1)
    parser.add_argument("--cache", type=int, default=40000, help="pictures encoded once for the diffusion stage")
    parser.add_argument("--unet-channels", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--unet-layers", type=int, default=1)
    parser.add_argument("--unet-heads", type=int, default=4)
    parser.add_argument("--text-hidden", type=int, default=64)
    parser.add_argument("--text-layers", type=int, default=3)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    os.makedirs(args.work, exist_ok=True)
    t0 = time.time()
    log = Log(os.path.join(args.work, "training_log.csv" if args.stage != "vae" else "vae_log.csv"))
    vae_path = os.path.join(args.work, "vae")
    if args.stage in ("all", "vae"):
        vae_path = train_vae(args, log, t0)
        t0_diffusion, cpu0_diffusion = time.time(), cpu_seconds()
        if args.stage == "vae":
            return
    elif not os.path.isdir(vae_path):
        raise SystemExit(f"{vae_path}: no trained VAE; run --stage vae first")
    else:
        t0_diffusion, cpu0_diffusion = t0, 0.0
    if args.stage == "diffusion":
        # One log for the whole model: the VAE stage's rows first.
        log.file.close()
        with open(os.path.join(args.work, "vae_log.csv")) as f:
            vae_rows = f.read()
        log.file = open(log.path, "w")
        log.file.write(vae_rows)

    vae, unet, text_encoder, tokenizer, final = train_diffusion(args, vae_path, log, t0)
    held_out = eval_loss(vae, unet, text_encoder, tokenizer)
    with open(os.path.join(args.work, "vae_stats.json")) as f:
        vae_stats = json.load(f)
    summary = {
        "command": "python " + " ".join([os.path.relpath(__file__, REPO)] + sys.argv[1:]),
        "vae": vae_stats,
        "diffusion": {
            "wall_seconds": round(time.time() - t0_diffusion),
            "cpu_seconds": round(cpu_seconds() - cpu0_diffusion),
            "final_loss": round(final, 5),
            "held_out_eps_mse": round(held_out, 5),
        },
        "args": {**vars(args), "out": os.path.relpath(os.path.abspath(args.out), REPO)},
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": sys.version.split()[0]},
    }
    print(json.dumps(summary["diffusion"]), flush=True)
    save(args, vae, unet, text_encoder, tokenizer, summary)
    if not args.no_eval:
        shapes_eval.evaluate(args.out, sheet=os.path.join(args.work, "eval.png"), device=args.device, repeats=args.eval_repeats)


if __name__ == "__main__":
    main()
