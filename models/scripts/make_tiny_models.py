"""Build the tiny, seeded, randomly initialised Stable Diffusion test models.

    .venv/bin/python models/scripts/make_tiny_models.py [--out models]

Writes <out>/tiny-sd1 (SD 1.x architecture, epsilon, PNDM) and <out>/tiny-sd2
(SD 2.x architecture, v_prediction, linear projections, per-block head counts,
DDIM) as diffusers folders. The tokenizer is the real 49,408-token CLIP BPE
vocabulary, so token ids match real Stable Diffusion checkpoints. Running the
script twice gives byte-identical files.
"""

import argparse
import gzip
import json
import math
import os
import shutil

import open_clip
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Same sizes for both variants; the differences are the SD1 vs SD2 config switches.
MODELS = {
    "sd1": dict(
        folder="tiny-sd1",
        seed=1001,
        pad_token="<|endoftext|>",
        hidden_act="quick_gelu",
        attention_head_dim=8,
        use_linear_projection=False,
    ),
    "sd2": dict(
        folder="tiny-sd2",
        seed=2002,
        pad_token="!",
        hidden_act="gelu",
        attention_head_dim=[2, 4],
        use_linear_projection=True,
    ),
}

# Re-initialisation (see reinit()). PyTorch's default init gives near-uniform
# attention and a tiny text-conditioning signal, so a reference made with it
# could not tell a wrong attention scale or an ignored prompt from a correct
# implementation. Every weight is redrawn from a seeded normal instead:
#   Linear/Conv weight  N(0, (GAIN / sqrt(fan_in))^2)   roughly variance preserving
#   attention q and k   N(0, (QK_GAIN / sqrt(fan_in))^2) so softmax logits have std ~QK_GAIN^2
#   biases              N(0, BIAS_STD^2)
#   norm weight / bias  1 + N(0, NORM_STD^2) / N(0, NORM_STD^2)  so a missing affine or wrong
#                       group layout is visible
#   token embeddings    N(0, TOKEN_STD^2), position embeddings N(0, POS_STD^2)
GAIN = 1.0
QK_GAIN = 1.4
BIAS_STD = 0.05
NORM_STD = 0.1
TOKEN_STD = 1.0
POS_STD = 0.5
# Output convolutions set the scale of what leaves each model: the UNet's
# noise prediction (kept near unit variance, as a trained model's is) and the
# VAE's image (kept mostly inside [-1, 1] so few pixels clamp).
UNET_OUT_GAIN = 1.0
VAE_OUT_GAIN = 1.0
# The VAE's single mid-block attention adds onto a residual stream that is
# several times larger than its output; a larger output projection makes a
# wrong attention there visible in the image.
VAE_ATTN_OUT_GAIN = 3.0

NUM_TRAIN_TIMESTEPS = 1000


def bytes_to_unicode():
    """CLIP/GPT-2 byte -> printable unicode character table, in CLIP's order."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_vocab_and_merges():
    """OpenAI CLIP's vocabulary, built from the BPE file open-clip-torch ships."""
    path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408 and len(set(vocab)) == 49408, len(vocab)
    return {tok: i for i, tok in enumerate(vocab)}, merges


def write_tokenizer(dest, pad_token):
    """tokenizer/ with vocab.json, merges.txt, tokenizer_config.json and
    special_tokens_map.json, the files real SD folders ship (no tokenizer.json)."""
    vocab, merges = clip_vocab_and_merges()
    os.makedirs(dest, exist_ok=True)
    vocab_path = os.path.join(dest, "vocab.json")
    merges_path = os.path.join(dest, "merges.txt")
    with open(vocab_path, "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(merges_path, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")

    tok = CLIPTokenizer(vocab=vocab_path, merges=merges_path, pad_token=pad_token, model_max_length=77)
    tok.save_pretrained(dest)
    # Recent transformers saves tokenizer.json instead of special_tokens_map.json.
    # Keep the folder in the classic layout and drop the derived tokenizer.json.
    json_path = os.path.join(dest, "tokenizer.json")
    if os.path.exists(json_path):
        os.remove(json_path)
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": pad_token,
        "unk_token": "<|endoftext|>",
    }
    with open(os.path.join(dest, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2)
        f.write("\n")

    reloaded = CLIPTokenizer.from_pretrained(dest)
    ids = reloaded("a photo of a cat").input_ids
    expected = [49406, 320, 1125, 539, 320, 2368, 49407]
    if ids != expected:
        raise SystemExit(f"{dest}: 'a photo of a cat' -> {ids}, expected {expected}")
    if reloaded.pad_token != pad_token or reloaded.model_max_length != 77:
        raise SystemExit(f"{dest}: pad {reloaded.pad_token!r} max {reloaded.model_max_length}")
    return reloaded


def unet(spec):
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=2,
        cross_attention_dim=32,
        attention_head_dim=spec["attention_head_dim"],
        use_linear_projection=spec["use_linear_projection"],
        norm_num_groups=32,
    )


def vae():
    # Four blocks: three 2x downsamplings, so the VAE scale factor is 8 as in real SD.
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
    )


def text_encoder(spec, pad_token_id):
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=spec["hidden_act"],
        projection_dim=32,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=pad_token_id,
    )
    return CLIPTextModel(config)


def scheduler(name):
    common = dict(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        trained_betas=None,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    # The published SD configs carry keys of other schedulers (clip_sample in
    # SD 1.5's PNDM config, skip_prk_steps in SD 2.1's DDIM config) so that
    # swapping schedulers with from_config behaves; from_config keeps them.
    if name == "sd1":
        return PNDMScheduler.from_config({**common, "skip_prk_steps": True, "clip_sample": False})
    return DDIMScheduler.from_config(
        {**common, "prediction_type": "v_prediction", "clip_sample": False, "skip_prk_steps": True}
    )


def _normal(gen, shape, std):
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std


@torch.no_grad()
def reinit(model, gen, out_layer, out_gain, attn_out_gain=GAIN):
    qk_names = ("to_q", "to_k", "q_proj", "k_proj")
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            fan_in = module.weight[0].numel()
            gain = QK_GAIN if leaf in qk_names else GAIN
            if name == out_layer:
                gain = out_gain
            elif ".attentions." in name and name.endswith("to_out.0"):
                gain = attn_out_gain
            module.weight.copy_(_normal(gen, module.weight.shape, gain / math.sqrt(fan_in)))
            if module.bias is not None:
                module.bias.copy_(_normal(gen, module.bias.shape, BIAS_STD))
        elif isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
            if module.weight is not None:
                module.weight.copy_(1.0 + _normal(gen, module.weight.shape, NORM_STD))
                module.bias.copy_(_normal(gen, module.bias.shape, NORM_STD))
        elif isinstance(module, nn.Embedding):
            std = POS_STD if "position" in name else TOKEN_STD
            module.weight.copy_(_normal(gen, module.weight.shape, std))
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise SystemExit(f"non-finite parameter {name}")


def build(key, out_root):
    spec = MODELS[key]
    dest = os.path.join(out_root, spec["folder"])
    if os.path.exists(dest):
        shutil.rmtree(dest)
    tmp_tok = dest + ".tokenizer.tmp"
    if os.path.exists(tmp_tok):
        shutil.rmtree(tmp_tok)
    tokenizer = write_tokenizer(tmp_tok, spec["pad_token"])

    torch.manual_seed(spec["seed"])
    u, v = unet(spec), vae()
    t = text_encoder(spec, tokenizer.pad_token_id)
    gen = torch.Generator().manual_seed(spec["seed"])
    reinit(t, gen, None, GAIN)
    reinit(u, gen, "conv_out", UNET_OUT_GAIN)
    reinit(v, gen, "decoder.conv_out", VAE_OUT_GAIN, VAE_ATTN_OUT_GAIN)
    for m in (u, v, t):
        m.eval()

    pipe = StableDiffusionPipeline(
        vae=v,
        text_encoder=t,
        tokenizer=tokenizer,
        unet=u,
        scheduler=scheduler(key),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(dest, safe_serialization=True)
    # The pipeline re-saves the tokenizer with this transformers' layout; put
    # back the classic one built above.
    shutil.rmtree(os.path.join(dest, "tokenizer"))
    shutil.move(tmp_tok, os.path.join(dest, "tokenizer"))

    check(dest, spec)
    return dest


def folder_size(dest):
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(dest) for f in files)


def check(dest, spec):
    pipe = StableDiffusionPipeline.from_pretrained(dest, safety_checker=None)
    ids = pipe.tokenizer("a photo of a cat").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407], ids
    assert pipe.vae_scale_factor == 8, pipe.vae_scale_factor
    assert pipe.tokenizer.pad_token == spec["pad_token"]
    total = folder_size(dest)
    if total > 20 * 1024 * 1024:
        raise SystemExit(f"{dest} is {total} bytes, over 20 MB")
    print(f"{dest}: {total / 1e6:.2f} MB, scheduler {type(pipe.scheduler).__name__}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(REPO, "models"), help="folder to write tiny-sd1/ and tiny-sd2/ into")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    for key in MODELS:
        build(key, args.out)


if __name__ == "__main__":
    main()
