"""Build the Turbo-style tiny folders: tiny-sd-turbo (tiny-sd2's components under SD-Turbo's
scheduler config) and tiny-sdxl-turbo (tiny-sdxl's under SDXL-Turbo's).

    .venv/bin/python models/scripts/make_turbo_folders.py [--models models]

Turbo models differ from their bases only in their weights and their scheduler config
(`timestep_spacing: "trailing"`, run with 1-4 steps and guidance 0), so each folder holds its
own scheduler/ and model_index.json and relative symbolic links to the base's other components
(git stores the links; no weights are copied). Run make_tiny_models.py and make_tiny_sdxl.py
first.
"""

import argparse
import json
import os
import shutil

from make_tiny_models import REPO

# Published scheduler configs of stabilityai/sd-turbo and stabilityai/sdxl-turbo, as diffusers
# 0.42.1 writes them.
COMMON = {
    "_diffusers_version": "0.42.1",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "trailing",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
FOLDERS = {
    "tiny-sd-turbo": ("tiny-sd2", "EulerDiscreteScheduler"),
    "tiny-sdxl-turbo": ("tiny-sdxl", "EulerAncestralDiscreteScheduler"),
}


def write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
        f.write("\n")


def build(models, folder, base, scheduler_class):
    dest = os.path.join(models, folder)
    if os.path.exists(dest):
        shutil.rmtree(dest)
    os.makedirs(os.path.join(dest, "scheduler"))
    for entry in sorted(os.listdir(os.path.join(models, base))):
        if entry in ("scheduler", "model_index.json", "model-settings.json"):
            continue
        os.symlink(os.path.join("..", base, entry), os.path.join(dest, entry))
    write_json(os.path.join(dest, "scheduler", "scheduler_config.json"), {"_class_name": scheduler_class, **COMMON})
    with open(os.path.join(models, base, "model_index.json"), encoding="utf-8") as f:
        index = json.load(f)
    index["scheduler"] = ["diffusers", scheduler_class]
    write_json(os.path.join(dest, "model_index.json"), index)
    print(f"{dest}: {base} with {scheduler_class} (trailing)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=os.path.join(REPO, "models"))
    args = parser.parse_args()
    for folder, (base, scheduler_class) in FOLDERS.items():
        build(args.models, folder, base, scheduler_class)


if __name__ == "__main__":
    main()
