"""Build the tiny, seeded, randomly initialised SDXL test model.

    .venv/bin/python models/scripts/make_tiny_sdxl.py [--out models]

Writes <out>/tiny-sdxl: a StableDiffusionXLPipeline folder with SDXL's structure at toy sizes:
two text encoders over the real CLIP vocabulary (CLIPTextModel with quick_gelu, padding with
<|endoftext|>; CLIPTextModelWithProjection with gelu, padding with "!", its config's legacy
eos_token_id 2 as SDXL's), a UNet with the `text_time` added conditioning (a non-default
`addition_time_embed_dim` of 8), per-block `transformer_layers_per_block` [1, 2], head counts
from an `attention_head_dim` list, linear projections, SDXL's block layout (DownBlock2D first,
UpBlock2D last), a VAE with SDXL's scaling factor and `force_upcast`, and SDXL's
EulerDiscreteScheduler config. Weights are redrawn as in make_tiny_models.py. Running the script
twice gives byte-identical files.
"""

import argparse
import os
import shutil

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from make_tiny_models import (
    GAIN,
    REPO,
    UNET_OUT_GAIN,
    VAE_ATTN_OUT_GAIN,
    VAE_OUT_GAIN,
    folder_size,
    reinit,
    write_tokenizer,
)

SEED = 3003
FOLDER = "tiny-sdxl"
HIDDEN = (32, 32)  # text encoder 1, text encoder 2: the UNet context is their sum
PROJECTION_DIM = 32  # text_encoder_2's pooled projection
TIME_EMBED_DIM = 8  # addition_time_embed_dim (SDXL: 256)
TIME_IDS = 6  # original size, crop top-left, target size


def unet():
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        transformer_layers_per_block=[1, 2],
        attention_head_dim=[2, 4],
        cross_attention_dim=sum(HIDDEN),
        use_linear_projection=True,
        norm_num_groups=32,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=TIME_IDS * TIME_EMBED_DIM + PROJECTION_DIM,
    )


def vae():
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=0.13025,
        force_upcast=True,
    )


def text_config(hidden, act, pad_token_id, eos_token_id):
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=PROJECTION_DIM,
        bos_token_id=49406,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def scheduler():
    # SDXL base 1.0's scheduler_config.json, foreign keys included.
    return EulerDiscreteScheduler.from_config(
        {
            "num_train_timesteps": 1000,
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "trained_betas": None,
            "prediction_type": "epsilon",
            "interpolation_type": "linear",
            "use_karras_sigmas": False,
            "timestep_spacing": "leading",
            "steps_offset": 1,
            "sample_max_value": 1.0,
            "set_alpha_to_one": False,
            "skip_prk_steps": True,
            "clip_sample": False,
        }
    )


def build(out_root):
    dest = os.path.join(out_root, FOLDER)
    if os.path.exists(dest):
        shutil.rmtree(dest)
    tokenizers = {}
    for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        tmp = f"{dest}.{name}.tmp"
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        tokenizers[name] = (tmp, write_tokenizer(tmp, pad))

    torch.manual_seed(SEED)
    u, v = unet(), vae()
    tok1, tok2 = tokenizers["tokenizer"][1], tokenizers["tokenizer_2"][1]
    t1 = CLIPTextModel(text_config(HIDDEN[0], "quick_gelu", tok1.pad_token_id, 49407))
    # SDXL's text_encoder_2 config keeps CLIP's legacy eos_token_id 2: transformers then pools
    # at the largest id of each row (the first <|endoftext|>).
    t2 = CLIPTextModelWithProjection(text_config(HIDDEN[1], "gelu", tok2.pad_token_id, 2))
    gen = torch.Generator().manual_seed(SEED)
    reinit(t1, gen, None, GAIN)
    reinit(t2, gen, None, GAIN)
    reinit(u, gen, "conv_out", UNET_OUT_GAIN)
    reinit(v, gen, "decoder.conv_out", VAE_OUT_GAIN, VAE_ATTN_OUT_GAIN)
    for m in (u, v, t1, t2):
        m.eval()

    pipe = StableDiffusionXLPipeline(
        vae=v,
        text_encoder=t1,
        text_encoder_2=t2,
        tokenizer=tok1,
        tokenizer_2=tok2,
        unet=u,
        scheduler=scheduler(),
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(dest, safe_serialization=True)
    for name, (tmp, _) in tokenizers.items():
        shutil.rmtree(os.path.join(dest, name))
        shutil.move(tmp, os.path.join(dest, name))
    check(dest)


def check(dest):
    pipe = StableDiffusionXLPipeline.from_pretrained(dest)
    ids = pipe.tokenizer_2("a photo of a cat").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407], ids
    assert pipe.tokenizer.pad_token == "<|endoftext|>" and pipe.tokenizer_2.pad_token == "!"
    assert pipe.vae_scale_factor == 8, pipe.vae_scale_factor
    assert pipe.text_encoder_2.config.eos_token_id == 2
    total = folder_size(dest)
    # Two encoders and tokenizers over the real 49,408-token vocabulary are 15 MB of it.
    if total > 25 * 1024 * 1024:
        raise SystemExit(f"{dest} is {total} bytes, over 25 MB")
    print(f"{dest}: {total / 1e6:.2f} MB, scheduler {type(pipe.scheduler).__name__}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(REPO, "models"), help="folder to write tiny-sdxl/ into")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    build(args.out)


if __name__ == "__main__":
    main()
