"""Run diffusers (CPU, float32) on the tiny models and write reference outputs.

    .venv/bin/python models/scripts/make_tiny_models.py   # first
    .venv/bin/python models/scripts/make_references.py [--models models] [--out models/reference]

For each model (sd1, sd2) it writes into <out>/<model>/:
  latents.safetensors        "latents": the unscaled initial latents (2, 4, 8, 8) passed as latents=
  <run>_<i>.png              image i of the run, 8-bit, rounded like diffusers' numpy_to_pil
  <run>.safetensors          "images" (2, 64, 64, 3) float output_type="np" array,
                             "step_latents" (T, 2, 4, 8, 8) latents after each scheduler.step,
                             "timesteps" (T,) float64, "sigmas" (if the scheduler has them)
  noise_<run>.safetensors    "noise" (steps, 2, 4, 8, 8): every randn_tensor draw a stochastic
                             scheduler made, in order (draw k belongs to the k-th scheduler.step)
  intermediates.safetensors  stage-by-stage tensors of the "ddim" run (see INTERMEDIATES_DOC)
  index.json                 every file, with the exact settings and scheduler config used
and <out>/tokens.json with tokenizer ids for tricky prompts.
"""

import argparse
import importlib
import itertools
import json
import os
import platform
import shutil
import sys

import numpy as np
import PIL
import torch
import diffusers
import transformers
import safetensors
import tokenizers
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UniPCMultistepScheduler,
)
from PIL import Image
from safetensors.torch import save_file as _save_file

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODELS = {  # folder, latents seed
    "sd1": ("tiny-sd1", 101),
    "sd2": ("tiny-sd2", 202),
    "sdxl": ("tiny-sdxl", 303),
    "sd_turbo": ("tiny-sd-turbo", 404),
    "sdxl_turbo": ("tiny-sdxl-turbo", 505),
}
# The tokens.json tokenizers (sdxl's two are sd1's and sd2's tokenizer layouts).
TOKENIZER_MODELS = ("sd1", "sd2")
PROMPTS = ["a red circle on a blue background", "two green squares"]
NEGATIVE_PROMPTS = ["blurry", ""]
STEPS = 10
GUIDANCE = 7.5
HEIGHT = WIDTH = 64
NOISE_SEED = 7  # generator passed to the pipeline; only stochastic schedulers draw from it

# name, scheduler class, from_config overrides, pipeline eta, guidance scale
RUNS = [
    ("ddim", DDIMScheduler, {}, 0.0, GUIDANCE),
    ("ddim_eta0.5", DDIMScheduler, {}, 0.5, GUIDANCE),
    ("pndm", PNDMScheduler, {}, 0.0, GUIDANCE),
    ("euler", EulerDiscreteScheduler, {}, 0.0, GUIDANCE),
    ("euler_ancestral", EulerAncestralDiscreteScheduler, {}, 0.0, GUIDANCE),
    ("dpmpp_2m", DPMSolverMultistepScheduler, {}, 0.0, GUIDANCE),
    ("dpmpp_2m_karras", DPMSolverMultistepScheduler, {"use_karras_sigmas": True}, 0.0, GUIDANCE),
    ("lms", LMSDiscreteScheduler, {}, 0.0, GUIDANCE),
    ("unipc", UniPCMultistepScheduler, {}, 0.0, GUIDANCE),
    ("ddim_cfg1", DDIMScheduler, {}, 0.0, 1.0),
]
INTERMEDIATES_RUN = "ddim"

# SDXL only: the SDXL pipeline's own inputs. Run name, scheduler class, overrides, eta, guidance,
# extra pipeline arguments (None negative prompts: the pipeline's force_zeros_for_empty_prompt).
SDXL_RUNS = [
    ("euler_prompt_2_sizes", EulerDiscreteScheduler, {}, 0.0, GUIDANCE,
     dict(prompt_2=["a blue square", "three white circles"], original_size=(32, 48),
          crops_coords_top_left=(4, 8), target_size=(64, 64))),
    ("euler_no_negative", EulerDiscreteScheduler, {}, 0.0, GUIDANCE, dict(negative_prompt=None)),
]
# Turbo-style folders: their own (trailing) scheduler, 1 and 4 steps, guidance 0 (no CFG).
def turbo_runs(cls, name):
    return [(f"{name}_{n}step", cls, {}, 0.0, 0.0, dict(num_inference_steps=n)) for n in (1, 4)]


RUNS_BY_MODEL = {
    "sd1": RUNS,
    "sd2": RUNS,
    "sdxl": RUNS + SDXL_RUNS,
    "sd_turbo": turbo_runs(EulerDiscreteScheduler, "euler"),
    "sdxl_turbo": turbo_runs(EulerAncestralDiscreteScheduler, "euler_ancestral"),
}
PIPELINES = {
    "sd1": StableDiffusionPipeline,
    "sd2": StableDiffusionPipeline,
    "sdxl": StableDiffusionXLPipeline,
    "sd_turbo": StableDiffusionPipeline,
    "sdxl_turbo": StableDiffusionXLPipeline,
}

NOISE_DOC = (
    "noise[k] is the tensor diffusers' randn_tensor returned inside the k-th scheduler.step call "
    "(k = 0 is the first denoising step), shape (batch, 4, 8, 8), drawn from torch.Generator"
    f"().manual_seed({NOISE_SEED}) passed as the pipeline's generator. EulerAncestral: "
    "prev = sample + derivative * (sigma_down - sigma) + noise[k] * sigma_up (drawn on every step, "
    "including the last where sigma_up = 0). DDIM eta > 0: prev = ddim(eta) + std_dev_t * noise[k]."
)
INTERMEDIATES_DOC = {
    "input_ids": "(4, 77) int64: tokenizer ids, rows = negative prompts then prompts (uncond, cond)",
    "prompt_embeds": "(4, 77, 32): text encoder last_hidden_state as the pipeline builds it, "
    "cat([negative_prompt_embeds, prompt_embeds]) (the encoder_hidden_states of every UNet call)",
    "timesteps": "(T,) int64: scheduler.timesteps",
    "model_inputs": "(T, 4, 4, 8, 8): UNet sample input per step, cat([latents, latents]) after "
    "scale_model_input",
    "unet_outputs": "(T, 4, 4, 8, 8): raw UNet output per step (uncond half first)",
    "guided_outputs": "(T, 2, 4, 8, 8): uncond + guidance * (cond - uncond), the model_output given "
    "to scheduler.step",
    "step_latents": "(T, 2, 4, 8, 8): scheduler.step prev_sample per step",
    "vae_input": "(2, 4, 8, 8): final latents / vae.config.scaling_factor, the VAE decoder input",
    "vae_output": "(2, 3, 64, 64): vae.decode(...) sample before post-processing (about [-1, 1]); "
    "the image is (vae_output / 2 + 0.5).clamp(0, 1) in HWC",
    "input_ids_2": "sdxl only: (4, 77) int64, tokenizer_2's ids, rows as input_ids",
    "pooled_prompt_embeds": "sdxl only: (4, 32), added_cond_kwargs['text_embeds']: text_encoder_2's "
    "projected pooled output, rows as prompt_embeds (sdxl's prompt_embeds are (4, 77, 64): both "
    "encoders' hidden_states[-2] concatenated)",
    "add_time_ids": "sdxl only: (4, 6), added_cond_kwargs['time_ids']",
}

TRICKY_PROMPTS = [
    "a photo of a cat",
    "café crème",
    "naïve résumé façade Ünïcödé ÀÉÎÕÜ",
    "e\u0301cole combining accent",
    "!!!???...",
    "hello, world!!! what?! ...and so on;;",
    "🐱 cat 🐶 dog 🎉🎉",
    "一只猫",
    "日本語のテキスト and English",
    "Ελληνικά Русский العربية",
    "A PhOtO oF a CaT IN CAPS",
    "1234 56.7 3.14159 1,000,000",
    "it's don't they're I'm we've you'll he'd",
    "IT'S DON'T Won't",
    "don\u2019t \u201ccurly quotes\u201d",
    "   leading and trailing spaces   ",
    "multiple    inner     spaces",
    "tabs\tand\nnewlines\r\nhere",
    "a\u00a0nbsp and\u2003em space",
    "zero\u200bwidth space",
    "<b>bold</b> <i>html</i> &amp; &lt;entity&gt;",
    "a cat <|endoftext|> a dog",
    "<|startoftext|>start token in text",
    "https://example.com/path?q=1&x=y#frag",
    "state-of-the-art well-known x-ray",
    "snake_case and camelCase and kebab-case",
    "€100 £50 ¥30 $20 100% #hashtag @mention",
    "ﬁ ligature Ⅻ ① ²",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "",
    " ",
    "a highly detailed photograph of a majestic red fox standing in a snowy forest at dawn, "
    "soft golden light filtering through tall pine trees, mist rising from the ground, "
    "cinematic composition, shallow depth of field, 85mm lens, ultra realistic, 8k resolution, "
    "award winning wildlife photography, trending on artstation, volumetric lighting, "
    "intricate fur texture, crisp focus on the eyes, muted color palette with warm highlights",
]

SCHEDULER_MODULES = [
    "diffusers.schedulers.scheduling_ddim",
    "diffusers.schedulers.scheduling_pndm",
    "diffusers.schedulers.scheduling_euler_discrete",
    "diffusers.schedulers.scheduling_euler_ancestral_discrete",
    "diffusers.schedulers.scheduling_dpmsolver_multistep",
    "diffusers.schedulers.scheduling_lms_discrete",
    "diffusers.schedulers.scheduling_unipc_multistep",
]


class NoiseRecorder:
    """Replaces randn_tensor in `modules` (default: the scheduler modules) and keeps every draw,
    in order, with the name of the module that made it. A module without randn_tensor is
    skipped, or with `strict` an error."""

    def __init__(self, modules=SCHEDULER_MODULES, strict=False):
        self.modules = modules
        self.strict = strict
        self.draws = []
        self.sources = []
        self.patched = []

    def __enter__(self):
        for name in self.modules:
            module = importlib.import_module(name)
            original = getattr(module, "randn_tensor", None)
            if original is None:
                if self.strict:
                    raise SystemExit(f"{name} has no randn_tensor")
                continue

            def recording(*args, _original=original, _name=name, **kwargs):
                out = _original(*args, **kwargs)
                self.draws.append(out.detach().clone())
                self.sources.append(_name)
                return out

            module.randn_tensor = recording
            self.patched.append((module, original))
        return self

    def __exit__(self, *exc):
        for module, original in self.patched:
            module.randn_tensor = original


def save_file(tensors, path):
    _save_file({k: v.contiguous() for k, v in tensors.items()}, path)


def versions():
    try:
        import ftfy

        ftfy_version = ftfy.__version__
    except ImportError:
        ftfy_version = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "tokenizers": tokenizers.__version__,
        "ftfy_importable": ftfy_version is not None,
        "ftfy": ftfy_version,
    }


def to_uint8(images):
    # Exactly diffusers' numpy_to_pil rounding.
    return (images * 255).round().astype("uint8")


def scheduler_config_json(config):
    out = {}
    for k, v in dict(config).items():
        if isinstance(v, (np.ndarray, torch.Tensor)):
            v = v.tolist()
        elif isinstance(v, tuple):
            v = list(v)
        if k == "_use_default_values":
            v = sorted(v)  # built from a set: order varies between runs
        out[k] = v
    return out


def load_pipe(key, model_dir):
    cls = PIPELINES[key]
    kwargs = {"safety_checker": None} if cls is StableDiffusionPipeline else {}
    pipe = cls.from_pretrained(model_dir, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")


@torch.no_grad()
def run_one(pipe, base_config, run, latents, capture=False):
    name, cls, overrides, eta, guidance = run[:5]
    call = {
        "prompt": PROMPTS,
        "negative_prompt": NEGATIVE_PROMPTS,
        "num_inference_steps": STEPS,
        **(run[5] if len(run) > 5 else {}),
    }
    pipe.scheduler = cls.from_config(base_config, **overrides)
    step_latents = []

    def on_step_end(_pipe, _i, _t, kwargs):
        step_latents.append(kwargs["latents"].detach().clone())
        return kwargs

    cap = {"model_inputs": [], "unet_outputs": [], "guided_outputs": [], "prompt_embeds": None}
    hooks = []
    if capture:

        def unet_hook(_module, args, kwargs, output):
            cap["model_inputs"].append(args[0].detach().clone())
            cap["unet_outputs"].append(output[0].detach().clone())
            cap["prompt_embeds"] = kwargs["encoder_hidden_states"].detach().clone()
            added = kwargs.get("added_cond_kwargs")
            if added:
                cap["pooled_prompt_embeds"] = added["text_embeds"].detach().clone()
                cap["add_time_ids"] = added["time_ids"].detach().clone()

        hooks.append(pipe.unet.register_forward_hook(unet_hook, with_kwargs=True))
        original_step = pipe.scheduler.step

        def step(model_output, *args, **kwargs):
            cap["guided_outputs"].append(model_output.detach().clone())
            return original_step(model_output, *args, **kwargs)

        pipe.scheduler.step = step
        original_decode = pipe.vae.decode

        def decode(z, *args, **kwargs):
            cap["vae_input"] = z.detach().clone()
            out = original_decode(z, *args, **kwargs)
            cap["vae_output"] = out[0].detach().clone()
            return out

        pipe.vae.decode = decode

    generator = torch.Generator().manual_seed(NOISE_SEED)
    try:
        with NoiseRecorder() as rec:
            images = pipe(
                **call,
                latents=latents.clone(),
                guidance_scale=guidance,
                eta=eta,
                height=HEIGHT,
                width=WIDTH,
                generator=generator,
                output_type="np",
                callback_on_step_end=on_step_end,
                callback_on_step_end_tensor_inputs=["latents"],
            ).images
    finally:
        for h in hooks:
            h.remove()
        if capture:
            del pipe.vae.decode

    sched = pipe.scheduler
    arrays = {
        "images": torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)),
        "step_latents": torch.stack(step_latents),
        "timesteps": sched.timesteps.detach().to(torch.float64).clone(),
    }
    if getattr(sched, "sigmas", None) is not None:
        arrays["sigmas"] = torch.as_tensor(sched.sigmas).detach().to(torch.float64).clone()
    if capture:
        arrays_cap = {
            "prompt_embeds": cap["prompt_embeds"],
            "timesteps": sched.timesteps.detach().to(torch.int64).clone(),
            "model_inputs": torch.stack(cap["model_inputs"]),
            "unet_outputs": torch.stack(cap["unet_outputs"]),
            "guided_outputs": torch.stack(cap["guided_outputs"]),
            "step_latents": torch.stack(step_latents),
            "vae_input": cap["vae_input"],
            "vae_output": cap["vae_output"],
        }
        for key in ("pooled_prompt_embeds", "add_time_ids"):
            if key in cap:
                arrays_cap[key] = cap[key]
    else:
        arrays_cap = None
    return images, arrays, rec.draws, arrays_cap, scheduler_config_json(sched.config)


def tokenize_for_pipeline(tokenizer, prompts):
    # The exact call StableDiffusionPipeline.encode_prompt makes.
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def write_model(key, models_root, out_root, vers):
    folder, latents_seed = MODELS[key]
    model_dir = os.path.join(models_root, folder)
    out = os.path.join(out_root, key)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    pipe = load_pipe(key, model_dir)
    base_config = dict(pipe.scheduler.config)

    latents = torch.randn((2, 4, HEIGHT // 8, WIDTH // 8), generator=torch.Generator().manual_seed(latents_seed))
    save_file({"latents": latents}, os.path.join(out, "latents.safetensors"))

    index = {
        "model": key,
        "model_dir": os.path.relpath(model_dir, REPO),
        "pipeline_scheduler": type(pipe.scheduler).__name__,
        "versions": vers,
        "device": "cpu",
        "dtype": "float32",
        "latents": {
            "file": "latents.safetensors",
            "key": "latents",
            "shape": list(latents.shape),
            "how": f"torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed({latents_seed})); "
            "passed unscaled as latents= (the pipeline multiplies by init_noise_sigma)",
        },
        "png_rounding": "(images * 255).round().astype('uint8') of the float images, RGB, no alpha",
        "noise_doc": NOISE_DOC,
        "runs": [],
    }
    results = {}
    runs = RUNS_BY_MODEL[key]
    for run in runs:
        name, cls, overrides, eta, guidance = run[:5]
        extra = run[5] if len(run) > 5 else {}
        capture = name == INTERMEDIATES_RUN
        images, arrays, draws, cap, config = run_one(pipe, base_config, run, latents, capture)
        results[name] = images
        pngs = []
        for i, img in enumerate(to_uint8(images)):
            png = f"{name}_{i}.png"
            Image.fromarray(img, mode="RGB").save(os.path.join(out, png), format="PNG", optimize=False)
            pngs.append(png)
        arrays_file = f"{name}.safetensors"
        save_file(arrays, os.path.join(out, arrays_file))
        entry = {
            "name": name,
            "scheduler_class": cls.__name__,
            "scheduler_overrides": overrides,
            "scheduler_config": config,
            "prompts": PROMPTS,
            "negative_prompts": extra.get("negative_prompt", NEGATIVE_PROMPTS),
            "sdxl_inputs": {
                k: (list(v) if isinstance(v, tuple) else v)
                for k, v in extra.items()
                if k not in ("negative_prompt", "num_inference_steps")
            },
            "num_inference_steps": extra.get("num_inference_steps", STEPS),
            "guidance_scale": guidance,
            "eta": eta,
            "height": HEIGHT,
            "width": WIDTH,
            "unet_calls": int(arrays["step_latents"].shape[0]),
            "images": pngs,
            "arrays": arrays_file,
            "timesteps": [float(t) for t in arrays["timesteps"]],
            "pixel_std_255": [round(float(im.std() * 255), 3) for im in images],
        }
        if draws:
            if len(draws) != entry["unet_calls"]:
                raise SystemExit(f"{key}/{name}: {len(draws)} noise draws for {entry['unet_calls']} steps")
            noise_file = f"noise_{name}.safetensors"
            save_file({"noise": torch.stack(draws)}, os.path.join(out, noise_file))
            entry["noise"] = noise_file
            entry["noise_seed"] = NOISE_SEED
        elif eta > 0 or cls is EulerAncestralDiscreteScheduler:
            raise SystemExit(f"{key}/{name}: expected noise draws, recorded none")
        if cap is not None:
            tokenizers = [("input_ids", pipe.tokenizer)]
            if getattr(pipe, "tokenizer_2", None) is not None:
                tokenizers.append(("input_ids_2", pipe.tokenizer_2))
            for ids_key, tok in tokenizers:
                cap[ids_key] = torch.cat(
                    [tokenize_for_pipeline(tok, NEGATIVE_PROMPTS), tokenize_for_pipeline(tok, PROMPTS)]
                ).to(torch.int64)
            save_file(cap, os.path.join(out, "intermediates.safetensors"))
            index["intermediates"] = {"file": "intermediates.safetensors", "run": name, "keys": INTERMEDIATES_DOC}
        index["runs"].append(entry)
        print(f"{key}/{name}: pixel std {entry['pixel_std_255']}", flush=True)

    index["stats"] = stats(results)
    with open(os.path.join(out, "index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return index["stats"]


def stats(results):
    """Differences in 0..255 units between runs and between the two prompts."""
    u8 = {k: to_uint8(v).astype(np.float64) for k, v in results.items()}
    pairs = {}
    for a, b in itertools.combinations(u8, 2):
        pairs[f"{a} vs {b}"] = round(float(np.abs(u8[a] - u8[b]).mean()), 3)
    prompts = {k: round(float(np.abs(v[0] - v[1]).mean()), 3) for k, v in u8.items()}
    return {
        "mean_abs_diff_between_runs": pairs,
        "min_mean_abs_diff_between_runs": min(pairs.values()),
        "mean_abs_diff_between_prompts": prompts,
        "pixel_std": {k: round(float(v.std()), 3) for k, v in u8.items()},
    }


def write_tokens(models_root, out_root, vers):
    entry = {
        "versions": vers,
        "call": "tokenizer(prompt, padding='max_length', max_length=tokenizer.model_max_length, "
        "truncation=True).input_ids (as StableDiffusionPipeline.encode_prompt); untruncated_ids = "
        "tokenizer(prompt).input_ids",
        "ftfy_note": "ftfy is importable, but the CLIPTokenizer of this transformers is backed by the "
        "tokenizers library (normalizer: NFC, \\s+ -> ' ', lowercase) and never calls ftfy; "
        "the slow Python CLIPTokenizer of transformers 4.x runs ftfy.fix_text first (which uncurls "
        "quotes, expands ligatures and may unescape HTML entities), so its ids can differ for such text.",
        "tokenizers": {},
    }
    for key in TOKENIZER_MODELS:
        folder = MODELS[key][0]
        pipe = StableDiffusionPipeline.from_pretrained(os.path.join(models_root, folder), safety_checker=None)
        tok = pipe.tokenizer
        cls = type(tok)
        uses_ftfy = "ftfy" in sys.modules and hasattr(importlib.import_module(cls.__module__), "ftfy")
        info = {
            "folder": f"models/{folder}/tokenizer",
            "class": f"{cls.__module__}.{cls.__qualname__}",
            "base_classes": [f"{b.__module__}.{b.__qualname__}" for b in cls.__mro__[1:3]],
            "uses_ftfy": uses_ftfy,
            "pad_token": tok.pad_token,
            "pad_token_id": tok.pad_token_id,
            "model_max_length": tok.model_max_length,
            "prompts": [],
        }
        for prompt in TRICKY_PROMPTS:
            ids = tokenize_for_pipeline(tok, [prompt])[0].tolist()
            full = tok(prompt).input_ids
            info["prompts"].append(
                {
                    "prompt": prompt,
                    "ids": ids,
                    "untruncated_ids": full,
                    "untruncated_tokens": tok.convert_ids_to_tokens(full),
                    "truncated": len(full) > tok.model_max_length,
                }
            )
        entry["tokenizers"][key] = info
    path = os.path.join(out_root, "tokens.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(entry, f, indent=1, ensure_ascii=False)
        f.write("\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=os.path.join(REPO, "models"), help="folder holding tiny-sd1/ and tiny-sd2/")
    parser.add_argument("--out", default=os.path.join(REPO, "models", "reference"))
    parser.add_argument("--only", choices=sorted(MODELS), help="only this model")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    vers = versions()
    for key in MODELS:
        if args.only and key != args.only:
            continue
        s = write_model(key, args.models, args.out, vers)
        print(json.dumps(s, indent=1))
    if not args.only:
        write_tokens(args.models, args.out, vers)


if __name__ == "__main__":
    main()
