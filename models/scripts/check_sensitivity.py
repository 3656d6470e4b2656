"""Show that the references can tell a correct implementation from a buggy one.

    .venv/bin/python models/scripts/check_sensitivity.py [--out models/reference/sensitivity.json]

For each tiny model it reruns the reference configuration ("ddim" unless noted)
with one deliberate mistake at a time and reports how far the 8-bit images move
(mean and max absolute difference in 0..255 units) from the correct float32
run. The "float64" row is the same pipeline in float64: the size of honest
float32 rounding differences, i.e. the floor a comparison tolerance must sit
above. Every bug row should be far above that floor.
"""

import argparse
import contextlib
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from diffusers import (
    DDIMScheduler,
    EulerDiscreteScheduler,
    UNet2DConditionModel,
)

import make_references as ref

REPO = ref.REPO


class SdpaPatch:
    """Swaps torch's scaled_dot_product_attention while `mode` is set."""

    def __init__(self):
        self.mode = None
        self.original = F.scaled_dot_product_attention

    def __enter__(self):
        original = self.original

        def patched(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
            if self.mode == "no_scale":
                scale = 1.0
            elif self.mode == "no_causal_mask":
                attn_mask, is_causal = None, False
            return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)

        F.scaled_dot_product_attention = patched
        torch.nn.functional.scaled_dot_product_attention = patched
        return self

    def __exit__(self, *exc):
        F.scaled_dot_product_attention = self.original
        torch.nn.functional.scaled_dot_product_attention = self.original


@contextlib.contextmanager
def float32_noise():
    """Stochastic schedulers draw their noise in float32 and cast it, so a
    float64 run replays the same noise as the float32 one."""
    patched = []
    for name in ref.SCHEDULER_MODULES:
        module = __import__(name, fromlist=["randn_tensor"])
        original = getattr(module, "randn_tensor", None)
        if original is None:
            continue

        def drawn32(shape, *args, _original=original, dtype=None, **kwargs):
            return _original(shape, *args, dtype=torch.float32, **kwargs).to(dtype)

        module.randn_tensor = drawn32
        patched.append((module, original))
    try:
        yield
    finally:
        for module, original in patched:
            module.randn_tensor = original


@contextlib.contextmanager
def replay_noise(noise):
    """randn_tensor in the scheduler modules returns the recorded draws in order.
    Yields the list of draws not yet used."""
    left = list(noise.unbind(0))
    patched = []
    for name in ref.SCHEDULER_MODULES:
        module = __import__(name, fromlist=["randn_tensor"])
        original = getattr(module, "randn_tensor", None)
        if original is None:
            continue

        def recorded(shape, *args, dtype=None, **kwargs):
            draw = left.pop(0)
            assert tuple(draw.shape) == tuple(shape), (draw.shape, shape)
            return draw.to(dtype)

        module.randn_tensor = recorded
        patched.append((module, original))
    try:
        yield left
    finally:
        for module, original in patched:
            module.randn_tensor = original


@contextlib.contextmanager
def active_in(module, patch, mode, method="forward"):
    """Set patch.mode only while module.<method> runs."""
    original = getattr(module, method)

    def wrapped(*args, **kwargs):
        patch.mode = mode
        try:
            return original(*args, **kwargs)
        finally:
            patch.mode = None

    setattr(module, method, wrapped)
    try:
        yield
    finally:
        delattr(module, method)


def u8(images):
    return ref.to_uint8(images).astype(np.float64)


@torch.no_grad()
def generate(pipe, latents, scheduler=None, **kw):
    pipe.scheduler = scheduler or DDIMScheduler.from_config(pipe.base_config)
    args = dict(
        prompt=ref.PROMPTS,
        negative_prompt=ref.NEGATIVE_PROMPTS,
        latents=latents.clone(),
        num_inference_steps=ref.STEPS,
        guidance_scale=ref.GUIDANCE,
        height=ref.HEIGHT,
        width=ref.WIDTH,
        output_type="np",
    )
    args.update(kw)
    if "prompt_embeds" in kw:
        args.pop("prompt")
        args.pop("negative_prompt")
    return pipe(**args).images


@torch.no_grad()
def embeds(pipe, prompts, pad_id=None, final_norm=True):
    tok = pipe.tokenizer
    ids = ref.tokenize_for_pipeline(tok, prompts)
    if pad_id is not None:
        # re-pad after the EOS with another token
        for row in ids:
            eos = (row == tok.eos_token_id).nonzero()[0, 0]
            row[eos + 1 :] = pad_id
    out = pipe.text_encoder(ids, output_hidden_states=True)
    return out.last_hidden_state if final_norm else out.hidden_states[-1]


def diff(a, b):
    d = np.abs(u8(a) - u8(b))
    return {
        "float_max_abs": round(float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max() * 255), 4),
        "mean_abs": round(float(d.mean()), 3),
        "max_abs": int(d.max()),
        "frac_pixels_off_by_more_than_1": round(float((d > 1).mean()), 4),
        "per_image_mean_abs": [round(float(x.mean()), 3) for x in d],
    }


def check_model(key, models_root, ref_root):
    folder, latents_seed = ref.MODELS[key]
    model_dir = os.path.join(models_root, folder)
    pipe = ref.load_pipe(model_dir)
    pipe.base_config = dict(pipe.scheduler.config)
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(latents_seed))
    base = generate(pipe, latents)
    rows = {}
    ref_dir = os.path.join(ref_root, key)
    stored = np.stack([np.asarray(Image.open(os.path.join(ref_dir, f"ddim_{i}.png"))) for i in range(2)])
    if not np.array_equal(stored, ref.to_uint8(base)):
        raise SystemExit(f"{ref_dir}/ddim_*.png do not match a fresh run; regenerate the references")
    for name, cls, overrides, eta, guidance in ref.RUNS:
        noise_file = os.path.join(ref_dir, f"noise_{name}.safetensors")
        if not os.path.exists(noise_file):
            continue
        # Replaying the recorded draws (with a generator that would draw
        # something else) must give the stored image exactly.
        with replay_noise(load_file(noise_file)["noise"]) as left:
            replayed = generate(
                pipe,
                latents,
                cls.from_config(pipe.base_config, **overrides),
                eta=eta,
                guidance_scale=guidance,
                generator=torch.Generator().manual_seed(ref.NOISE_SEED + 1),
            )
        stored_images = load_file(os.path.join(ref_dir, f"{name}.safetensors"))["images"].numpy()
        if left or not np.array_equal(stored_images, replayed):
            raise SystemExit(f"{noise_file}: replaying the noise does not reproduce {name}.safetensors")
        rows[f"replay of noise_{name} vs stored run"] = diff(stored_images, replayed)

    pipe64 = ref.load_pipe(model_dir).to(torch.float64)
    pipe64.base_config = pipe.base_config
    rows["float64 (rounding floor)"] = diff(base, generate(pipe64, latents.to(torch.float64)))
    for name, cls, overrides, eta, guidance in ref.RUNS:
        if name == "ddim":
            continue
        s32 = cls.from_config(pipe.base_config, **overrides)
        s64 = cls.from_config(pipe.base_config, **overrides)
        g = dict(guidance_scale=guidance, eta=eta, generator=torch.Generator().manual_seed(ref.NOISE_SEED))
        a = generate(pipe, latents, s32, **g)
        g["generator"] = torch.Generator().manual_seed(ref.NOISE_SEED)
        with float32_noise():
            b = generate(pipe64, latents.to(torch.float64), s64, **g)
        rows[f"float64 (rounding floor, {name})"] = diff(a, b)

    with SdpaPatch() as patch:
        with active_in(pipe.unet, patch, "no_scale"):
            rows["UNet attention without 1/sqrt(head_dim)"] = diff(base, generate(pipe, latents))
        with active_in(pipe.text_encoder, patch, "no_scale"):
            rows["text encoder attention without 1/sqrt(head_dim)"] = diff(base, generate(pipe, latents))
        with active_in(pipe.text_encoder, patch, "no_causal_mask"):
            rows["text encoder without causal mask"] = diff(base, generate(pipe, latents))
        with active_in(pipe.vae, patch, "no_scale", method="decode"):
            rows["VAE mid-block attention without 1/sqrt(head_dim)"] = diff(base, generate(pipe, latents))

    # GELU with the tanh approximation instead of the exact erf form.
    exact_gelu = F.gelu

    def tanh_gelu(x, approximate="none"):
        return exact_gelu(x, approximate="tanh")

    F.gelu = tanh_gelu
    try:
        rows["UNet GEGLU with tanh-approximated GELU"] = diff(base, generate(pipe, latents))
    finally:
        F.gelu = exact_gelu
    if pipe.text_encoder.config.hidden_act == "gelu":
        acts = [m for m in pipe.text_encoder.modules() if hasattr(m, "act") and m.act is exact_gelu]
        for m in acts:
            m.act = tanh_gelu
        try:
            rows["text encoder with tanh-approximated GELU"] = diff(base, generate(pipe, latents))
        finally:
            for m in acts:
                m.act = exact_gelu

    # Head count: the diffusers name attention_head_dim means "number of heads" here.
    heads = pipe.unet.config.attention_head_dim
    wrong = [h * 2 for h in heads] if isinstance(heads, list) else heads // 2
    unet = pipe.unet
    pipe.unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", attention_head_dim=wrong)
    rows[f"UNet heads {wrong} instead of {heads}"] = diff(base, generate(pipe, latents))
    pipe.unet = unet

    swapped = generate(pipe, latents, prompt=ref.PROMPTS[::-1])
    rows["prompts swapped between the two latents"] = diff(base, swapped)
    rows["prompt ignored (empty prompts)"] = diff(base, generate(pipe, latents, prompt=["", ""]))
    rows["negative prompt ignored (image 0 has 'blurry')"] = diff(
        base, generate(pipe, latents, negative_prompt=["", ""])
    )
    rows["guidance 7.0 instead of 7.5"] = diff(base, generate(pipe, latents, guidance_scale=7.0))

    cond = embeds(pipe, ref.PROMPTS)
    uncond = embeds(pipe, ref.NEGATIVE_PROMPTS)
    check = generate(pipe, latents, prompt_embeds=cond, negative_prompt_embeds=uncond)
    assert np.array_equal(u8(check), u8(base)), "prompt_embeds path differs from the prompt path"
    rows["text encoder output without final layer norm"] = diff(
        base,
        generate(
            pipe,
            latents,
            prompt_embeds=embeds(pipe, ref.PROMPTS, final_norm=False),
            negative_prompt_embeds=embeds(pipe, ref.NEGATIVE_PROMPTS, final_norm=False),
        ),
    )
    other_pad = 49407 if pipe.tokenizer.pad_token_id == 0 else 0
    rows[f"padded with id {other_pad} instead of {pipe.tokenizer.pad_token_id}"] = diff(
        base,
        generate(
            pipe,
            latents,
            prompt_embeds=embeds(pipe, ref.PROMPTS, pad_id=other_pad),
            negative_prompt_embeds=embeds(pipe, ref.NEGATIVE_PROMPTS, pad_id=other_pad),
        ),
    )

    cfg = pipe.base_config
    rows["DDIM steps_offset 0 (timesteps off by one)"] = diff(
        base, generate(pipe, latents, DDIMScheduler.from_config(cfg, steps_offset=0))
    )
    rows["DDIM set_alpha_to_one true"] = diff(
        base, generate(pipe, latents, DDIMScheduler.from_config(cfg, set_alpha_to_one=True))
    )
    rows["DDIM timestep_spacing trailing instead of leading"] = diff(
        base, generate(pipe, latents, DDIMScheduler.from_config(cfg, timestep_spacing="trailing"))
    )
    rows["DDIM beta_schedule linear instead of scaled_linear"] = diff(
        base, generate(pipe, latents, DDIMScheduler.from_config(cfg, beta_schedule="linear"))
    )
    other_pred = "epsilon" if cfg["prediction_type"] == "v_prediction" else "v_prediction"
    rows[f"DDIM prediction_type {other_pred}"] = diff(
        base, generate(pipe, latents, DDIMScheduler.from_config(cfg, prediction_type=other_pred))
    )
    euler = generate(pipe, latents, EulerDiscreteScheduler.from_config(cfg))
    rows["Euler: timestep_spacing linspace vs leading"] = diff(
        euler, generate(pipe, latents, EulerDiscreteScheduler.from_config(cfg, timestep_spacing="linspace"))
    )
    rows["Euler (leading) vs DDIM (mathematically the same ODE step)"] = diff(base, euler)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=os.path.join(REPO, "models"))
    parser.add_argument("--references", default=os.path.join(REPO, "models", "reference"))
    parser.add_argument("--out", default=os.path.join(REPO, "models", "reference", "sensitivity.json"))
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    result = {"doc": __doc__.strip(), "units": "8-bit pixel values (0..255)", "models": {}}
    for key in ref.MODELS:
        rows = check_model(key, args.models, args.references)
        result["models"][key] = rows
        print(f"== {key}")
        for name, r in rows.items():
            print(f"  {r['mean_abs']:8.3f} mean  {r['max_abs']:4d} max  {name}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
