"""Convert a diffusers/PEFT LoRA file to the kohya / A1111 layout.

    .venv/bin/python models/scripts/lora_to_kohya.py IN.safetensors OUT.safetensors UNET_CONFIG.json

The mapping, key by key:
  unet.<module>.lora_A.weight            -> lora_unet_<name>.lora_down.weight
  unet.<module>.lora_B.weight            -> lora_unet_<name>.lora_up.weight
  (per module)                           -> lora_unet_<name>.alpha  (0-d, the module's lora_alpha)
  text_encoder.<module>.*   (SD 1.x/2.x) -> lora_te_text_model_<module, dots as underscores>.*
                                            (the module path from CLIPTextModel's root)
  text_encoder.<module>.*   (SDXL)       -> lora_te1_<...>.*
  text_encoder_2.<module>.* (SDXL)       -> lora_te2_<...>.*
where <name> is the diffusers module path with dots as underscores for SD 1.x/2.x (kohya trains
those on the diffusers UNet), and for SDXL (a UNet with addition_embed_type "text_time") the
path in the original SGM UNet kohya trains SDXL on, dots as underscores:
  conv_in -> input_blocks.0.0, conv_out -> out.2,
  time_embedding.linear_1/2 -> time_embed.0/2, add_embedding.linear_1/2 -> label_emb.0.0/0.2,
  down_blocks.b.resnets.j -> input_blocks.(1 + b(L+1) + j).0,
  down_blocks.b.attentions.j -> input_blocks.(1 + b(L+1) + j).1,
  mid_block.resnets.0/1 -> middle_block.0/2, mid_block.attentions.0 -> middle_block.1,
  up_blocks.u.resnets.j -> output_blocks.(u(L+1) + j).0,
  up_blocks.u.attentions.j -> output_blocks.(u(L+1) + j).1,
  and inside a resnet: conv1 -> in_layers.2, time_emb_proj -> emb_layers.1,
  conv2 -> out_layers.3, conv_shortcut -> skip_connection
(L = layers_per_block). lora_alpha comes from the file's lora_adapter_metadata
(<component>.lora_alpha, <component>.alpha_pattern); without it alpha = rank (scale 1).
"""

import json
import re
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file

RESNET = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
          "conv_shortcut": "skip_connection"}


def sgm_name(path, cfg):
    """The SGM UNet's module path of diffusers module `path`."""
    L = cfg["layers_per_block"]
    p = path.split(".")
    top = {"conv_in": "input_blocks.0.0", "conv_out": "out.2",
           "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    if ".".join(p[:2]) in top or p[0] in top:
        return top.get(".".join(p[:2]), top.get(p[0]))
    if p[0] == "down_blocks":
        b, kind, j, rest = int(p[1]), p[2], int(p[3]), p[4:]
        block = f"input_blocks.{1 + b * (L + 1) + j}"
    elif p[0] == "up_blocks":
        u, kind, j, rest = int(p[1]), p[2], int(p[3]), p[4:]
        block = f"output_blocks.{u * (L + 1) + j}"
    elif p[0] == "mid_block":
        kind, j, rest = p[1], int(p[2]), p[3:]
        block = f"middle_block.{2 * j if kind == 'resnets' else 1}"
    else:
        raise ValueError(f"no SGM name for {path}")
    if kind == "resnets":
        return f"{block}.0.{RESNET[rest[0]]}" if p[0] != "mid_block" else f"{block}.{RESNET[rest[0]]}"
    if kind == "attentions":
        return f"{block}.1.{'.'.join(rest)}" if p[0] != "mid_block" else f"{block}.{'.'.join(rest)}"
    raise ValueError(f"no SGM name for {path}")


def alpha_for(module, meta, rank):
    """PEFT's lora_alpha for `module`: the alpha_pattern entry matching it, else lora_alpha."""
    if not meta:
        return float(rank)
    for pattern, alpha in (meta.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(alpha)
    return float(meta.get("lora_alpha", rank))


def convert(tensors, metadata, unet_cfg):
    sdxl = unet_cfg.get("addition_embed_type") == "text_time"
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if sdxl else "lora_te_",
                "text_encoder_2": "lora_te2_"}
    packed = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    out = {}
    for key, t in tensors.items():
        m = re.fullmatch(r"(unet|text_encoder|text_encoder_2)\.(.+)\.lora_([AB])\.weight", key)
        if not m:
            raise ValueError(f"{key}: not a PEFT LoRA key")
        component, module, which = m.groups()
        if component == "unet":
            name = sgm_name(module, unet_cfg) if sdxl else module
        else:
            # kohya names the text encoders' modules from CLIPTextModel's root.
            name = module if module.startswith("text_model.") else "text_model." + module
        kohya = prefixes[component] + name.replace(".", "_")
        out[f"{kohya}.lora_{'down' if which == 'A' else 'up'}.weight"] = t.contiguous()
        if which == "A":
            meta = {k.removeprefix(component + "."): v for k, v in packed.items()
                    if k.startswith(component + ".")}
            out[f"{kohya}.alpha"] = torch.tensor(alpha_for(module, meta, t.shape[0]))
    return out


def convert_file(src, dst, unet_config):
    with open(unet_config) as f:
        cfg = json.load(f)
    with safe_open(src, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata() or {}
    save_file(convert(tensors, metadata, cfg), dst, metadata={"format": "pt"})


if __name__ == "__main__":
    convert_file(*sys.argv[1:4])
