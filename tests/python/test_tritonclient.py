"""sdserve spoken to by independent V2 clients: NVIDIA's `tritonclient` (HTTP) and MLServer
1.7.1's own codecs, types and batch client, building requests the way their users do."""

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from mlserver.codecs import Base64Codec, StringCodec
from mlserver.types import InferenceRequest, InferenceResponse, Parameters
from PIL import Image
from tritonclient.utils import InferenceServerException

TIMEOUT = 120.0


@pytest.fixture(scope="module")
def triton(base_url):
    # tritonclient takes host:port without a scheme.
    return httpclient.InferenceServerClient(
        base_url.removeprefix("http://"),
        connection_timeout=TIMEOUT,
        network_timeout=TIMEOUT,
    )


@pytest.fixture(scope="module")
def native_size(triton, model_name):
    """(width, height) the model generates by default, from its metadata."""
    parameters = triton.get_model_metadata(model_name)["parameters"]
    return parameters["native_width"], parameters["native_height"]


def png_size(data: bytes) -> tuple[int, int]:
    """Decodes every pixel of a PNG file and returns (width, height)."""
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG", image.format
    image.load()
    return image.size


def prompt_input(prompts: list[str]) -> httpclient.InferInput:
    data = np.array(prompts, dtype=np.object_)
    tensor = httpclient.InferInput("prompt", list(data.shape), "BYTES")
    # JSON data: the V2 REST protocol of MLServer has no binary tensor extension.
    tensor.set_data_from_numpy(data, binary_data=False)
    return tensor


def image_output() -> list[httpclient.InferRequestedOutput]:
    return [httpclient.InferRequestedOutput("image", binary_data=False)]


def triton_images(result: httpclient.InferResult) -> list[bytes]:
    """The PNG files of the `image` output: raw bytes when the server sent the output as
    binary data (Triton's extension), else base64 text as MLServer sends it."""
    images = result.as_numpy("image")
    assert images is not None, result.get_response()
    assert images.dtype == np.object_
    output = result.get_output("image")
    if "binary_data_size" in (output.get("parameters") or {}):
        return [bytes(e) for e in images.reshape(-1)]
    assert output["parameters"]["content_type"] == "base64", output
    return [base64.b64decode(e, validate=True) for e in images.reshape(-1)]


# ---- tritonclient -----------------------------------------------------------------------------


def test_server_live_and_ready(triton):
    assert triton.is_server_live()
    assert triton.is_server_ready()


def test_model_ready(triton, model_name):
    assert triton.is_model_ready(model_name)
    assert not triton.is_model_ready("no-such-model")


def test_server_metadata(triton):
    metadata = triton.get_server_metadata()
    assert isinstance(metadata["name"], str) and metadata["name"]
    assert isinstance(metadata["version"], str) and metadata["version"]
    assert isinstance(metadata["extensions"], list)


def test_model_metadata(triton, model_name):
    metadata = triton.get_model_metadata(model_name)
    assert metadata["name"] == model_name
    inputs = {t["name"]: t for t in metadata["inputs"]}
    assert inputs["prompt"]["datatype"] == "BYTES"
    assert inputs["prompt"]["parameters"]["content_type"] == "str"
    outputs = {t["name"]: t for t in metadata["outputs"]}
    assert outputs["image"]["datatype"] == "BYTES"
    assert outputs["image"]["parameters"]["content_type"] == "base64"


def test_unknown_model_metadata_is_404(triton):
    with pytest.raises(InferenceServerException) as error:
        triton.get_model_metadata("no-such-model")
    assert error.value.status() == "404"
    assert "no-such-model" in error.value.message()


def test_infer_with_a_bytes_prompt(triton, model_name, native_size):
    result = triton.infer(
        model_name,
        [prompt_input(["a red circle on a blue background"])],
        outputs=image_output(),
    )
    response = result.get_response()
    assert response["model_name"] == model_name
    image = next(o for o in response["outputs"] if o["name"] == "image")
    assert image["datatype"] == "BYTES"
    assert image["shape"] == [1, 1]
    assert image["parameters"]["content_type"] == "base64"
    assert [png_size(i) for i in triton_images(result)] == [native_size]


def test_infer_without_requested_outputs(triton, model_name, native_size):
    # tritonclient then adds `binary_data_output: true` to the plain JSON body; MLServer
    # ignores it and answers JSON, and so must a drop-in replacement.
    result = triton.infer(model_name, [prompt_input(["a green triangle"])])
    assert "binary_data_size" not in result.get_output("image")["parameters"]
    assert [png_size(i) for i in triton_images(result)] == [native_size]


def test_infer_parameters_seed_and_size(triton, model_name):
    def generate(seed: int) -> list[bytes]:
        result = triton.infer(
            model_name,
            [prompt_input(["a yellow star", "a grey moon"])],
            outputs=image_output(),
            parameters={"seed": seed, "height": 48, "width": 32},
        )
        assert result.as_numpy("image").shape == (2, 1)
        return triton_images(result)

    first = generate(7)
    assert [png_size(i) for i in first] == [(32, 48), (32, 48)]
    assert generate(7) == first, "the same seed gave different images"
    assert generate(8) != first, "a different seed gave the same images"


def test_binary_tensor_extension(triton, model_name, native_size):
    # tritonclient's default: the prompt as raw tensor bytes after the JSON header, and the
    # image back as raw PNG bytes (Triton's binary tensor data extension, advertised in /v2).
    assert "binary_tensor_data" in triton.get_server_metadata()["extensions"]
    data = np.array(["a cat"], dtype=np.object_)
    tensor = httpclient.InferInput("prompt", [1], "BYTES")
    tensor.set_data_from_numpy(data)
    outputs = [httpclient.InferRequestedOutput("image", binary_data=True)]
    result = triton.infer(model_name, [tensor], outputs=outputs)
    assert "binary_data_size" in result.get_output("image")["parameters"]
    assert [png_size(i) for i in triton_images(result)] == [native_size]


# A 67×61 RGB picture: image-to-image makes a 64×56 image of it (sides rounded down to 8).
INPUT_IMAGE = Path(__file__).resolve().parents[2] / "models/reference/img2img/input_odd.png"


def test_image_to_image_with_the_image_as_raw_bytes(triton, model_name):
    """tritonclient sends the PNG file as a binary BYTES tensor; strength as an FP32 input."""
    image = httpclient.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([INPUT_IMAGE.read_bytes()], dtype=np.object_), binary_data=True)
    strength = httpclient.InferInput("strength", [1], "FP32")
    strength.set_data_from_numpy(np.array([0.6], dtype=np.float32), binary_data=False)
    result = triton.infer(
        model_name,
        [prompt_input(["a red circle"]), image, strength],
        outputs=image_output(),
        parameters={"seed": 4, "num_inference_steps": 5},
    )
    assert [png_size(i) for i in triton_images(result)] == [(64, 56)]
    # A file that is not an image is a 400 naming the input.
    image.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_), binary_data=True)
    with pytest.raises(InferenceServerException) as error:
        triton.infer(model_name, [prompt_input(["a"]), image], outputs=image_output())
    assert error.value.status() == "400"
    assert "input 'image' element 0" in error.value.message()


def test_unknown_model_infer_is_404(triton):
    with pytest.raises(InferenceServerException) as error:
        triton.infer("no-such-model", [prompt_input(["x"])], outputs=image_output())
    assert error.value.status() == "404"


# ---- MLServer's codecs and types ------------------------------------------------------------


def infer_url(base_url: str, model_name: str) -> str:
    return f"{base_url}/v2/models/{model_name}/infer"


def mlserver_images(body: dict) -> list[bytes]:
    response = InferenceResponse.model_validate(body)
    image = next(o for o in response.outputs if o.name == "image")
    assert image.parameters.content_type == "base64"
    decoded = Base64Codec.decode_output(image)
    assert all(isinstance(d, bytes) for d in decoded)
    return decoded


def test_mlserver_string_codec_request(base_url, model_name, native_size):
    request_input = StringCodec.encode_input("prompt", ["a blue square"])
    assert request_input.shape == [1, 1]
    assert request_input.datatype == "BYTES"
    assert request_input.parameters.content_type == "str"
    request = InferenceRequest(inputs=[request_input], parameters=Parameters(seed=3))
    # MLServer's own serialisation (its types drop unset and None fields).
    body = request.model_dump_json()
    assert json.loads(body)["inputs"] == [
        {
            "name": "prompt",
            "shape": [1, 1],
            "datatype": "BYTES",
            "parameters": {"content_type": "str"},
            "data": ["a blue square"],
        }
    ]
    reply = requests.post(
        infer_url(base_url, model_name),
        data=body,
        headers={"content-type": "application/json"},
        timeout=TIMEOUT,
    )
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == "application/json"
    assert reply.json()["parameters"]["seeds"] == [3]
    images = mlserver_images(reply.json())
    assert [png_size(i) for i in images] == [native_size]


def test_mlserver_base64_codec_image_input(base_url, model_name):
    """MLServer's Base64Codec marks the image input `content_type: base64`."""
    image = Base64Codec.encode_input("image", [INPUT_IMAGE.read_bytes()], use_bytes=False)
    assert image.parameters.content_type == "base64"
    request = InferenceRequest(
        inputs=[StringCodec.encode_input("prompt", ["a red circle"]), image],
        parameters=Parameters(seed=3, num_inference_steps=4, strength=0.5),
    )
    reply = requests.post(
        infer_url(base_url, model_name),
        data=request.model_dump_json(),
        headers={"content-type": "application/json"},
        timeout=TIMEOUT,
    )
    assert reply.status_code == 200, reply.text
    assert [png_size(i) for i in mlserver_images(reply.json())] == [(64, 56)]


@pytest.mark.filterwarnings("ignore:The `dict` method is deprecated")
def test_mlserver_documented_requests_pattern(base_url, model_name, native_size):
    # The pattern of MLServer's examples: `requests.post(url, json=request.dict())` with
    # `use_bytes=False`; the body then carries explicit nulls.
    request = InferenceRequest(
        inputs=[
            StringCodec.encode_input(
                "prompt", ["a purple hexagon", "an orange ring"], use_bytes=False
            )
        ]
    )
    body = request.dict()
    assert body["id"] is None and body["outputs"] is None
    assert body["inputs"][0]["shape"] == [2, 1]
    reply = requests.post(infer_url(base_url, model_name), json=body, timeout=TIMEOUT)
    assert reply.status_code == 200, reply.text
    images = mlserver_images(reply.json())
    assert [png_size(i) for i in images] == [native_size, native_size]


def test_mlserver_error_body(base_url, model_name):
    # A request without `prompt` is refused with MLServer's error shape.
    request = InferenceRequest(
        inputs=[StringCodec.encode_input("negative_prompt", ["blurry"])]
    )
    reply = requests.post(
        infer_url(base_url, model_name),
        data=request.model_dump_json(),
        headers={"content-type": "application/json"},
        timeout=TIMEOUT,
    )
    assert reply.status_code == 400, reply.text
    assert "prompt" in reply.json()["error"]


def test_mlserver_infer_command(base_url, model_name, native_size, tmp_path: Path):
    # `mlserver infer`: MLServer's batch client (tritonclient underneath) reading V2
    # requests from a file, one JSON document a line. It names no outputs, so tritonclient
    # adds `binary_data_output: true`; MLServer ignores that and answers JSON, and this
    # client can only write answers whose BYTES are UTF-8 text.
    requests_file = tmp_path / "requests.txt"
    responses_file = tmp_path / "responses.txt"
    lines = [
        InferenceRequest(
            id=f"req-{i}", inputs=[StringCodec.encode_input("prompt", [prompt])]
        ).model_dump_json()
        for i, prompt in enumerate(["a white cloud", "a black cat"])
    ]
    requests_file.write_text("\n".join(lines) + "\n")
    mlserver = Path(sys.executable).with_name("mlserver")
    command = [
        str(mlserver),
        "infer",
        "--url",
        base_url.removeprefix("http://"),
        "--model-name",
        model_name,
        "--input-data-path",
        str(requests_file),
        "--output-data-path",
        str(responses_file),
        "--workers",
        "1",
        "--batch-size",
        "1",
        "--retries",
        "1",
    ]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in responses_file.read_text().splitlines()]
    # The command exits 0 even when it could not decode the answers; its log says why.
    assert len(answers) == 2, done.stdout + done.stderr
    for answer in answers:
        assert "error" not in answer, answer
        assert answer["model_name"] == model_name
        assert [png_size(i) for i in mlserver_images(answer)] == [native_size]
    assert sorted(a["parameters"]["batch_index"] for a in answers) == [0, 1]
