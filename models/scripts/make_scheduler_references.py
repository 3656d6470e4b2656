"""Reference trajectories of the diffusers schedulers for crates/pipeline/tests/schedulers.rs.

Run from the repository root with the project venv:

    .venv/bin/python models/scripts/make_scheduler_references.py

Writes crates/pipeline/tests/fixtures/schedulers/{cases.json,references.safetensors}.

Each trajectory case builds a scheduler the way a user swaps one in
(`Class.from_config(config)`, optionally after the fix-ups `StableDiffusionPipeline.__init__`
applies to the folder's own scheduler), then runs a short deterministic loop: the model output at
step k is `MODEL_A * scaled_input + MODEL_B * sin(FREQ_I * i + FREQ_K * k)` (i = flat element
index), computed in float32. Noise drawn by stochastic schedulers is recorded so the Rust side can
replay it. Timestep tables record `scheduler.timesteps` for many step counts.
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

import diffusers
from diffusers.configuration_utils import FrozenDict
from diffusers.schedulers import (
    scheduling_ddim,
    scheduling_dpmsolver_multistep,
    scheduling_euler_ancestral_discrete,
    scheduling_euler_discrete,
)
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "crates" / "pipeline" / "tests" / "fixtures" / "schedulers"

SHAPE = (2, 4, 2, 4)
MODEL_A = 0.7
MODEL_B = 0.5
FREQ_I = 0.37
FREQ_K = 1.3

KIND_CLASS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "dpmpp_2m_karras": "DPMSolverMultistepScheduler",
    "lms": "LMSDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
}
KINDS = list(KIND_CLASS)
# What the kind itself sets on top of the config.
KIND_OVERRIDES = {"dpmpp_2m": {"use_karras_sigmas": False}, "dpmpp_2m_karras": {"use_karras_sigmas": True}}

# The scheduler_config.json of Stable Diffusion 1.5, written by diffusers 0.6.0 (few keys).
SD15_OLD = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
# Stable Diffusion 2.1 (768, v-prediction).
SD21_V = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def saved_config(class_name, **kwargs):
    """The config dict a current diffusers writes for `Class(**kwargs)` (every key present)."""
    sched = getattr(diffusers, class_name)(**kwargs)
    return json.loads(sched.to_json_string())


def saved_from(config):
    """What a current diffusers writes after loading `config` with its own class."""
    sched = getattr(diffusers, config["_class_name"]).from_config(config)
    return json.loads(sched.to_json_string())


SD15_FULL = saved_from(SD15_OLD)
TINY_PNDM = saved_config("PNDMScheduler", skip_prk_steps=True, **SD_BETAS)  # steps_offset 0
DDIM_DEFAULT = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.42.1"}
DDIM_MINIMAL_SD = {"_class_name": "DDIMScheduler", "steps_offset": 0, **SD_BETAS}  # no clip_sample
ZSNR = saved_config(
    "DDIMScheduler",
    clip_sample=False,
    set_alpha_to_one=False,
    prediction_type="v_prediction",
    timestep_spacing="trailing",
    rescale_betas_zero_snr=True,
    steps_offset=1,
    **SD_BETAS,
)
TRAILING = saved_config("EulerDiscreteScheduler", timestep_spacing="trailing", **SD_BETAS)
LINSPACE_DDIM = saved_config("DDIMScheduler", timestep_spacing="linspace", clip_sample=False, **SD_BETAS)
COSINE = {"_class_name": "PNDMScheduler", "beta_schedule": "squaredcos_cap_v2", "skip_prk_steps": True, "steps_offset": 1}
TRAINED = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 100,
    "trained_betas": [round(0.0008 + 0.02 * (i / 99) ** 1.5, 8) for i in range(100)],
    "clip_sample": False,
    "steps_offset": 1,
}
EULER_KARRAS = saved_config("EulerDiscreteScheduler", use_karras_sigmas=True, timestep_spacing="leading", steps_offset=1, **SD_BETAS)
DPM_KARRAS_SDXL = saved_config(
    "DPMSolverMultistepScheduler", use_karras_sigmas=True, timestep_spacing="leading", steps_offset=1, **SD_BETAS
)
USE_DEFAULTS = dict(SD15_FULL, _use_default_values=["timestep_spacing", "prediction_type"], timestep_spacing="trailing", prediction_type="v_prediction")


def with_(config, **kwargs):
    out = dict(config)
    out.update(kwargs)
    return out


def euler_cfg(**kwargs):
    return saved_config("EulerDiscreteScheduler", **dict(SD_BETAS, **kwargs))


def dpm_cfg(**kwargs):
    return saved_config("DPMSolverMultistepScheduler", **dict(SD_BETAS, **kwargs))


def unipc_cfg(**kwargs):
    return saved_config("UniPCMultistepScheduler", **dict(SD_BETAS, **kwargs))


def lms_cfg(**kwargs):
    return saved_config("LMSDiscreteScheduler", **dict(SD_BETAS, **kwargs))


# (name, config, kind, steps, eta, pipeline fix-ups)
CASES = []
for kind in KINDS:
    for steps in (1, 4, 10, 25):
        CASES.append((f"sd15_old_{kind}_{steps}", SD15_OLD, kind, steps, 0.0, False))
    CASES.append((f"sd15_full_{kind}_10", SD15_FULL, kind, 10, 0.0, False))
    CASES.append((f"tiny_pndm_{kind}_4", TINY_PNDM, kind, 4, 0.0, False))
    CASES.append((f"tiny_pndm_fixups_{kind}_4", TINY_PNDM, kind, 4, 0.0, True))
    CASES.append((f"use_defaults_{kind}_6", USE_DEFAULTS, kind, 6, 0.0, False))
    CASES.append((f"trailing_{kind}_7", TRAILING, kind, 7, 0.0, False))
    CASES.append((f"cosine_{kind}_8", COSINE, kind, 8, 0.0, False))
    CASES.append((f"trained_t100_{kind}_9", TRAINED, kind, 9, 0.0, False))
CASES += [
    ("ddim_default_clip_10", DDIM_DEFAULT, "ddim", 10, 0.0, False),
    ("ddim_minimal_fixups_10", DDIM_MINIMAL_SD, "ddim", 10, 0.0, True),
    ("ddim_minimal_fixups_euler_10", DDIM_MINIMAL_SD, "euler", 10, 0.0, True),
    ("ddim_minimal_nofixups_10", DDIM_MINIMAL_SD, "ddim", 10, 0.0, False),
    ("ddim_sd21v_10", SD21_V, "ddim", 10, 0.0, False),
    ("ddim_sd21v_25", SD21_V, "ddim", 25, 0.0, False),
    ("ddim_sd15_eta05_10", SD15_OLD, "ddim", 10, 0.5, False),
    ("ddim_sd21v_eta1_4", SD21_V, "ddim", 4, 1.0, False),
    ("ddim_zsnr_10", ZSNR, "ddim", 10, 0.0, False),
    ("ddim_zsnr_1", ZSNR, "ddim", 1, 0.0, False),
    ("ddim_linspace_10", LINSPACE_DDIM, "ddim", 10, 0.0, False),
    ("ddim_sample_pred_6", with_(LINSPACE_DDIM, prediction_type="sample", clip_sample=True, clip_sample_range=1.5), "ddim", 6, 0.0, False),
    ("ddim_trailing61_62", with_(ZSNR, rescale_betas_zero_snr=False), "ddim", 61, 0.0, False),
    ("pndm_prk_4", with_(SD15_OLD, skip_prk_steps=False), "pndm", 4, 0.0, False),
    ("pndm_prk_10", with_(SD15_OLD, skip_prk_steps=False), "pndm", 10, 0.0, False),
    ("pndm_prk_25", with_(SD15_OLD, skip_prk_steps=False), "pndm", 25, 0.0, False),
    ("pndm_v_10", with_(SD21_V, _class_name="PNDMScheduler"), "pndm", 10, 0.0, False),
    ("pndm_linspace_prk_6", with_(LINSPACE_DDIM, _class_name="PNDMScheduler", skip_prk_steps=False), "pndm", 6, 0.0, False),
    ("pndm_set_alpha_one_5", with_(SD15_OLD, set_alpha_to_one=True), "pndm", 5, 0.0, False),
    ("euler_karras_10", EULER_KARRAS, "euler", 10, 0.0, False),
    ("euler_karras_25", EULER_KARRAS, "euler", 25, 0.0, False),
    ("euler_karras_sigma_range_8", with_(EULER_KARRAS, sigma_min=0.1, sigma_max=10.0), "euler", 8, 0.0, False),
    ("euler_linspace_10", euler_cfg(), "euler", 10, 0.0, False),
    ("euler_continuous_v_10", euler_cfg(prediction_type="v_prediction", timestep_type="continuous"), "euler", 10, 0.0, False),
    ("euler_log_linear_6", euler_cfg(interpolation_type="log_linear"), "euler", 6, 0.0, False),
    ("euler_sigma_min_final_8", euler_cfg(final_sigmas_type="sigma_min"), "euler", 8, 0.0, False),
    ("euler_exponential_8", euler_cfg(use_exponential_sigmas=True), "euler", 8, 0.0, False),
    ("euler_zsnr_trailing_v_8", euler_cfg(prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True), "euler", 8, 0.0, False),
    ("euler_sample_pred_5", euler_cfg(prediction_type="sample"), "euler", 5, 0.0, False),
    ("euler_a_v_10", with_(SD21_V, timestep_spacing="linspace"), "euler_ancestral", 10, 0.0, False),
    ("euler_a_zsnr_8", ZSNR, "euler_ancestral", 8, 0.0, False),
    ("dpm_sigma_min_10", dpm_cfg(final_sigmas_type="sigma_min"), "dpmpp_2m", 10, 0.0, False),
    ("dpm_no_lower_final_20", dpm_cfg(lower_order_final=False, final_sigmas_type="sigma_min"), "dpmpp_2m", 20, 0.0, False),
    ("dpm_lower_final_14", dpm_cfg(final_sigmas_type="sigma_min"), "dpmpp_2m", 14, 0.0, False),
    ("dpm_order3_12", dpm_cfg(solver_order=3), "dpmpp_2m", 12, 0.0, False),
    ("dpm_order3_sigma_min_16", dpm_cfg(solver_order=3, final_sigmas_type="sigma_min"), "dpmpp_2m", 16, 0.0, False),
    ("dpm_order1_5", dpm_cfg(solver_order=1), "dpmpp_2m", 5, 0.0, False),
    ("dpm_heun_10", dpm_cfg(solver_type="heun"), "dpmpp_2m", 10, 0.0, False),
    ("dpm_v_karras_10", with_(dpm_cfg(prediction_type="v_prediction")), "dpmpp_2m_karras", 10, 0.0, False),
    ("dpm_sample_pred_6", dpm_cfg(prediction_type="sample"), "dpmpp_2m", 6, 0.0, False),
    ("dpm_dpmsolver_sigma_min_10", dpm_cfg(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"), "dpmpp_2m", 10, 0.0, False),
    ("dpm_dpmsolver_order3_heun_12", dpm_cfg(algorithm_type="dpmsolver", solver_order=3, final_sigmas_type="sigma_min", solver_type="heun"), "dpmpp_2m", 12, 0.0, False),
    ("dpm_sde_10", dpm_cfg(algorithm_type="sde-dpmsolver++"), "dpmpp_2m", 10, 0.0, False),
    ("dpm_sde_order3_karras_9", dpm_cfg(algorithm_type="sde-dpmsolver++", solver_order=3), "dpmpp_2m_karras", 9, 0.0, False),
    ("dpm_sde_heun_7", dpm_cfg(algorithm_type="sde-dpmsolver++", solver_type="heun"), "dpmpp_2m", 7, 0.0, False),
    ("dpm_sde_dpmsolver_7", dpm_cfg(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min"), "dpmpp_2m", 7, 0.0, False),
    ("dpm_euler_at_final_8", dpm_cfg(euler_at_final=True, final_sigmas_type="sigma_min"), "dpmpp_2m", 8, 0.0, False),
    ("dpm_lambda_clip_10", dpm_cfg(lambda_min_clipped=-5.1), "dpmpp_2m", 10, 0.0, False),
    ("dpm_lambda_clip_trailing_10", dpm_cfg(lambda_min_clipped=-5.1, timestep_spacing="trailing"), "dpmpp_2m", 10, 0.0, False),
    ("dpm_lu_lambdas_10", dpm_cfg(use_lu_lambdas=True), "dpmpp_2m", 10, 0.0, False),
    ("dpm_exponential_10", dpm_cfg(use_exponential_sigmas=True), "dpmpp_2m", 10, 0.0, False),
    ("dpm_karras_cosine_10", dpm_cfg(beta_schedule="squaredcos_cap_v2"), "dpmpp_2m_karras", 10, 0.0, False),
    ("dpm_zsnr_trailing_v_10", dpm_cfg(prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True), "dpmpp_2m", 10, 0.0, False),
    ("dpm_sdxl_karras_25", DPM_KARRAS_SDXL, "dpmpp_2m_karras", 25, 0.0, False),
    ("dpm_hidden_sigma_min_karras_10", with_(EULER_KARRAS, sigma_min=0.05), "dpmpp_2m_karras", 10, 0.0, False),
    ("lms_karras_10", EULER_KARRAS, "lms", 10, 0.0, False),
    ("lms_karras_25", lms_cfg(use_karras_sigmas=True), "lms", 25, 0.0, False),
    ("lms_v_10", with_(SD21_V, timestep_spacing="linspace"), "lms", 10, 0.0, False),
    ("lms_sample_pred_6", lms_cfg(prediction_type="sample"), "lms", 6, 0.0, False),
    ("lms_exponential_8", lms_cfg(use_exponential_sigmas=True), "lms", 8, 0.0, False),
    ("unipc_karras_10", unipc_cfg(use_karras_sigmas=True), "unipc", 10, 0.0, False),
    ("unipc_bh1_sigma_min_10", unipc_cfg(solver_type="bh1", final_sigmas_type="sigma_min"), "unipc", 10, 0.0, False),
    ("unipc_order3_12", unipc_cfg(solver_order=3), "unipc", 12, 0.0, False),
    ("unipc_order3_bh1_sigma_min_12", unipc_cfg(solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min"), "unipc", 12, 0.0, False),
    ("unipc_noise_pred_10", unipc_cfg(predict_x0=False, final_sigmas_type="sigma_min"), "unipc", 10, 0.0, False),
    ("unipc_noise_pred_v_order3_9", unipc_cfg(predict_x0=False, solver_order=3, prediction_type="v_prediction", final_sigmas_type="sigma_min"), "unipc", 9, 0.0, False),
    ("unipc_disable_corrector_8", unipc_cfg(disable_corrector=[0, 3]), "unipc", 8, 0.0, False),
    ("unipc_no_lower_final_sigma_min_8", unipc_cfg(lower_order_final=False, final_sigmas_type="sigma_min"), "unipc", 8, 0.0, False),
    ("unipc_v_trailing_10", unipc_cfg(prediction_type="v_prediction", timestep_spacing="trailing"), "unipc", 10, 0.0, False),
    ("unipc_karras_sigma_min_final_10", unipc_cfg(use_karras_sigmas=True, final_sigmas_type="sigma_min", sigma_min=0.05), "unipc", 10, 0.0, False),
    ("unipc_exponential_8", unipc_cfg(use_exponential_sigmas=True), "unipc", 8, 0.0, False),
    ("unipc_zsnr_v_10", unipc_cfg(prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True), "unipc", 10, 0.0, False),
]

TABLE_STEPS = list(range(1, 41)) + [50, 61, 64, 100, 103, 121, 250, 1000]
TABLE_CONFIGS = [
    ("sd15_old", SD15_OLD, KINDS),
    ("sd15_full", SD15_FULL, KINDS),
    ("trailing", TRAILING, KINDS),
    ("linspace", LINSPACE_DDIM, KINDS),
    ("euler_karras", EULER_KARRAS, ["euler", "lms", "unipc", "dpmpp_2m_karras"]),
    ("cosine", COSINE, ["dpmpp_2m_karras", "unipc", "euler"]),
]


# alphas_cumprod of the train schedule, for (name, class, config).
SCHEDULES = [
    ("linear", "DDIMScheduler", {}),
    ("scaled_linear", "PNDMScheduler", SD15_OLD),
    ("squaredcos_cap_v2", "PNDMScheduler", COSINE),
    ("trained_t100", "DDIMScheduler", TRAINED),
    ("zsnr_ddim", "DDIMScheduler", ZSNR),
    ("zsnr_euler", "EulerDiscreteScheduler", ZSNR),
]


class NoiseRecorder:
    """Stands in for `randn_tensor` in the scheduler modules and keeps every draw."""

    def __init__(self):
        self.generator = torch.Generator().manual_seed(1234)
        self.draws = []

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        noise = torch.randn(shape, generator=self.generator, dtype=torch.float32)
        self.draws.append(noise.clone())
        return noise.to(dtype=dtype or torch.float32)


def pipeline_fixups(sched):
    """What `StableDiffusionPipeline.__init__` does to the folder's scheduler."""
    if getattr(sched.config, "steps_offset", 1) != 1:
        new_config = dict(sched.config)
        new_config["steps_offset"] = 1
        sched._internal_dict = FrozenDict(new_config)
    if getattr(sched.config, "clip_sample", False) is True:
        new_config = dict(sched.config)
        new_config["clip_sample"] = False
        sched._internal_dict = FrozenDict(new_config)


def make_scheduler(config, kind, fixups):
    cls_name = KIND_CLASS[kind]
    cls = getattr(diffusers, cls_name)
    overrides = KIND_OVERRIDES.get(kind, {})
    if fixups:
        own = getattr(diffusers, config["_class_name"]).from_config(config)
        pipeline_fixups(own)
        if own.__class__ is cls and not overrides:
            return own
        return cls.from_config(own.config, **overrides)
    return cls.from_config(config, **overrides)


def base_pattern(k):
    i = np.arange(int(np.prod(SHAPE)), dtype=np.float64)
    return torch.from_numpy(np.sin(FREQ_I * i + FREQ_K * k).astype(np.float32)).reshape(SHAPE)


def run_case(name, config, kind, steps, eta, fixups, init):
    recorder = NoiseRecorder()
    modules = [scheduling_ddim, scheduling_euler_ancestral_discrete, scheduling_euler_discrete, scheduling_dpmsolver_multistep]
    saved = [m.randn_tensor for m in modules]
    for m in modules:
        m.randn_tensor = recorder
    try:
        sched = make_scheduler(config, kind, fixups)
        sched.set_timesteps(steps)
        timesteps = sched.timesteps.clone()
        # A repeated first timestep makes diffusers look up the second occurrence and run off the
        # end of its sigmas; start at index 0 explicitly, as img2img pipelines do.
        first_repeats = len(timesteps) > 1 and bool((timesteps == timesteps[0]).sum() > 1)
        if first_repeats:
            sched.set_begin_index(0)
        init_sigma = sched.init_noise_sigma
        init_sigma_f = float(init_sigma)
        x = init * init_sigma
        scaled, prev = [], []
        for k, t in enumerate(timesteps):
            x_in = sched.scale_model_input(x, t)
            model_out = MODEL_A * x_in + MODEL_B * base_pattern(k)
            kwargs = {"eta": eta} if kind == "ddim" else {}
            x = sched.step(model_out, t, x, **kwargs).prev_sample
            scaled.append(x_in.clone())
            prev.append(x.clone())
    finally:
        for m, f in zip(modules, saved):
            m.randn_tensor = f
    if not torch.isfinite(torch.stack(prev)).all():
        raise SystemExit(f"{name}: diffusers produced non-finite values")
    meta = {
        "name": name,
        "config": config,
        "kind": kind,
        "steps": steps,
        "eta": eta,
        "pipeline_fixups": fixups,
        "init_noise_sigma": init_sigma_f,
        "num_timesteps": len(timesteps),
        "noise_draws": len(recorder.draws),
        "begin_index_set": first_repeats,
    }
    tensors = {
        f"{name}/timesteps": timesteps.to(torch.float64),
        f"{name}/scaled": torch.stack(scaled),
        f"{name}/prev": torch.stack(prev),
    }
    if recorder.draws:
        tensors[f"{name}/noise"] = torch.stack(recorder.draws)
    return meta, tensors


def run_table(name, config, kinds):
    metas, tensors = [], {}
    for kind in kinds:
        lengths, values, errors = [], [], []
        for steps in TABLE_STEPS:
            sched = make_scheduler(config, kind, False)
            try:
                sched.set_timesteps(steps)
            except ValueError:  # PNDM's Runge-Kutta warm-up needs at least 4 steps
                errors.append(steps)
                lengths.append(0)
                continue
            # Every timestep is an integer or a float32 value, so float32 stores it exactly.
            ts = sched.timesteps.to(torch.float32)
            assert bool((ts.to(torch.float64) == sched.timesteps.to(torch.float64)).all())
            t_max = config.get("num_train_timesteps", 1000)
            # DDIM and PNDM index alphas_cumprod by timestep: diffusers raises IndexError at
            # the first step when a timestep is past the end.
            if kind in ("ddim", "pndm") and bool((ts >= t_max).any()):
                errors.append(steps)
                lengths.append(0)
                continue
            lengths.append(len(ts))
            values.append(ts)
        key = f"table/{name}/{kind}"
        metas.append({"name": name, "config": config, "kind": kind, "steps": TABLE_STEPS, "lengths": lengths, "errors": errors, "tensor": key})
        tensors[key] = torch.cat(values)
    return metas, tensors


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(42), dtype=torch.float32)
    tensors = {"init": init}
    cases = []
    names = set()
    for case in CASES:
        if case[0] in names:
            raise SystemExit(f"duplicate case {case[0]}")
        names.add(case[0])
        meta, t = run_case(*case, init)
        cases.append(meta)
        tensors.update(t)
    tables = []
    for name, config, kinds in TABLE_CONFIGS:
        metas, t = run_table(name, config, kinds)
        tables += metas
        tensors.update(t)
    schedules = []
    for name, cls_name, config in SCHEDULES:
        sched = getattr(diffusers, cls_name).from_config(config)
        key = f"schedule/{name}"
        tensors[key] = sched.alphas_cumprod.clone()
        schedules.append({"name": name, "class": cls_name, "config": config, "tensor": key})
    manifest = {
        "generator": "models/scripts/make_scheduler_references.py",
        "diffusers_version": diffusers.__version__,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "shape": list(SHAPE),
        "model": {"a": MODEL_A, "b": MODEL_B, "freq_i": FREQ_I, "freq_k": FREQ_K},
        "cases": cases,
        "tables": tables,
        "schedules": schedules,
    }
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(OUT / "references.safetensors"))
    (OUT / "cases.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum((OUT / f).stat().st_size for f in ("references.safetensors", "cases.json"))
    print(f"{len(cases)} cases, {len(tables)} tables, {total / 1e6:.2f} MB in {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
