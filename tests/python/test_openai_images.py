"""sdserve spoken to by the official `openai` Python package, as OpenAI Images API clients call
it: generations, edits (inpainting and image-to-image), the model list, and OpenAI-shaped
errors. Each image is checked against the V2 route's image for the same settings."""

import base64
import io
from pathlib import Path

import openai
import pytest
import requests
from PIL import Image

TIMEOUT = 120.0
INPUT_IMAGE = Path(__file__).resolve().parents[2] / "models/reference/img2img/input_odd.png"
STEPS = {"num_inference_steps": 3}


@pytest.fixture(scope="module")
def client(base_url):
    # No retries: a refused request must surface as the error it is.
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)


def pngs(result) -> list[bytes]:
    files = [base64.b64decode(d.b64_json, validate=True) for d in result.data]
    for f in files:
        image = Image.open(io.BytesIO(f))
        assert image.format == "PNG", image.format
        image.load()
    return files


def png_size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


def v2_images(base_url, model, inputs: list[dict], parameters: dict) -> list[bytes]:
    """The same generation through the V2 route, for comparison."""
    body = {
        "inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["a red circle"]}]
        + inputs,
        "parameters": parameters,
    }
    reply = requests.post(f"{base_url}/v2/models/{model}/infer", json=body, timeout=TIMEOUT)
    assert reply.status_code == 200, reply.text
    image = next(o for o in reply.json()["outputs"] if o["name"] == "image")
    return [base64.b64decode(d) for d in image["data"]]


def file_input(name: str, data: bytes) -> dict:
    return {
        "name": name,
        "datatype": "BYTES",
        "shape": [1],
        "parameters": {"content_type": "base64"},
        "data": [base64.b64encode(data).decode()],
    }


def test_models_lists_what_is_loaded(client, model_name, sdxl_model_name):
    ids = {m.id for m in client.models.list()}
    assert {model_name, sdxl_model_name} <= ids, ids
    assert client.models.retrieve(model_name).id == model_name
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such-model")
    assert e.value.code == "model_not_found"


def test_generate_images_as_the_v2_route_makes_them(client, base_url, model_name):
    result = client.images.generate(
        model=model_name,
        prompt="a red circle",
        n=2,
        size="64x48",
        response_format="b64_json",
        extra_body={"seed": 11, **STEPS},
    )
    files = pngs(result)
    assert [png_size(f) for f in files] == [(64, 48), (64, 48)]
    assert [d.seed for d in result.data] == [11, 12]
    assert result.size == "64x48" and result.output_format == "png" and result.created > 0
    same = v2_images(
        base_url,
        model_name,
        [],
        {"seed": 11, "num_images_per_prompt": 2, "width": 64, "height": 48, **STEPS},
    )
    assert files == same


def test_errors_are_openai_shaped(client, model_name):
    with pytest.raises(openai.NotFoundError) as e:
        client.images.generate(model="no-such-model", prompt="x", response_format="b64_json")
    assert (e.value.status_code, e.value.type, e.value.code, e.value.param) == (
        404,
        "invalid_request_error",
        "model_not_found",
        "model",
    )
    for size in ["60x60", "64", "99999x64"]:
        with pytest.raises(openai.BadRequestError) as e:
            client.images.generate(model=model_name, prompt="x", size=size, response_format="b64_json")
        assert (e.value.type, e.value.param) == ("invalid_request_error", "size"), size
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model=model_name, prompt="x", response_format="url")
    assert e.value.param == "response_format"
    assert "b64_json" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model=model_name, prompt="x", n=1000, response_format="b64_json")
    assert e.value.param == "n"
    # Two models are loaded here: a request must say which.
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="x", response_format="b64_json")
    assert e.value.param == "model"


def openai_mask(width: int, height: int) -> bytes:
    """OpenAI's mask: the left half transparent (to be repainted), the rest opaque."""
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, width // 2, height))
    out = io.BytesIO()
    mask.save(out, format="PNG")
    return out.getvalue()


def diffusers_mask(width: int, height: int) -> bytes:
    """The same region as diffusers marks it: white repaints."""
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (0, 0, width // 2, height))
    out = io.BytesIO()
    mask.save(out, format="PNG")
    return out.getvalue()


def test_edit_with_a_mask_inpaints_as_the_v2_route(client, base_url, model_name):
    image = INPUT_IMAGE.read_bytes()
    result = client.images.edit(
        model=model_name,
        image=("input.png", image, "image/png"),
        mask=("mask.png", openai_mask(64, 64), "image/png"),
        prompt="a red circle",
        size="64x64",
        response_format="b64_json",
        extra_body={"seed": 5, **STEPS},
    )
    files = pngs(result)
    assert [png_size(f) for f in files] == [(64, 64)]
    same = v2_images(
        base_url,
        model_name,
        [file_input("image", image), file_input("mask_image", diffusers_mask(64, 64))],
        {"seed": 5, "width": 64, "height": 64, **STEPS},
    )
    assert files == same


def test_edit_without_a_mask_is_image_to_image(client, base_url, model_name):
    image = INPUT_IMAGE.read_bytes()
    result = client.images.edit(
        model=model_name,
        image=("input.png", image, "image/png"),
        prompt="a red circle",
        response_format="b64_json",
        extra_body={"seed": 9, "strength": 0.6, **STEPS},
    )
    files = pngs(result)
    same = v2_images(
        base_url, model_name, [file_input("image", image)], {"seed": 9, "strength": 0.6, **STEPS}
    )
    assert files == same
    with pytest.raises(openai.BadRequestError) as e:
        client.images.edit(
            model=model_name,
            image=("input.png", b"not an image", "image/png"),
            prompt="x",
            response_format="b64_json",
        )
    assert e.value.param == "image"
