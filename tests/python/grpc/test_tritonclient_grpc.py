"""sdserve's gRPC data plane spoken to by NVIDIA's `tritonclient.grpc`, as Triton and KServe
users call it: health, metadata, infer with the PNG decoded, status codes, deadlines and the
bidirectional stream."""

import io
import queue
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

TIMEOUT = 120.0


@pytest.fixture(scope="module")
def client(grpc_address):
    return grpcclient.InferenceServerClient(grpc_address)


def png_size(data: bytes) -> tuple[int, int]:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG", image.format
    image.load()
    return image.size


def prompt_input(prompts: list[str]) -> grpcclient.InferInput:
    data = np.array(prompts, dtype=np.object_)
    tensor = grpcclient.InferInput("prompt", list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    return tensor


def images(result: grpcclient.InferResult) -> list[bytes]:
    data = result.as_numpy("image")
    assert data is not None and data.dtype == np.object_, result.get_response()
    return [bytes(e) for e in data.reshape(-1)]


def parameter(result: grpcclient.InferResult, key: str):
    p = result.get_response().parameters[key]
    return getattr(p, p.WhichOneof("parameter_choice"))


def metric(metrics_url: str, name: str, **labels) -> float:
    """The value of one sample on the metrics port (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    prefix = f"{name}{{{want}}}" if labels else name
    for line in requests.get(f"{metrics_url}/metrics", timeout=TIMEOUT).text.splitlines():
        if line.startswith(prefix + " ") or (labels and line.startswith(prefix[:-1] + ",")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_live_and_ready(client, model_name):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(model_name)
    # MLServer answers a ready check for an unknown model with NOT_FOUND, not `false`.
    with pytest.raises(InferenceServerException) as error:
        client.is_model_ready("no-such-model")
    assert error.value.status() == "StatusCode.NOT_FOUND"


def test_server_and_model_metadata(client, model_name):
    server = client.get_server_metadata(as_json=True)
    assert server["name"] and server["version"]
    model = client.get_model_metadata(model_name, as_json=True)
    assert model["name"] == model_name
    inputs = {t["name"]: t for t in model["inputs"]}
    outputs = {t["name"]: t for t in model["outputs"]}
    assert inputs["prompt"]["datatype"] == "BYTES"
    assert outputs["image"]["datatype"] == "BYTES"


def test_infer_returns_a_png(client, model_name):
    result = client.infer(
        model_name,
        [prompt_input(["a red circle on a blue background", "two green squares"])],
        outputs=[grpcclient.InferRequestedOutput("image")],
        parameters={"seed": 42, "num_inference_steps": 3, "width": 48},
        client_timeout=TIMEOUT,
    )
    assert result.get_response().model_name == model_name
    assert [png_size(i) for i in images(result)] == [(48, 64), (48, 64)]
    assert parameter(result, "num_inference_steps") == 3


def int_pair(name: str, pair: tuple[int, int]) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [2], "INT64")
    tensor.set_data_from_numpy(np.array(pair, dtype=np.int64))
    return tensor


def test_sdxl_inputs(client, sdxl_model_name):
    """SDXL's second prompt and size conditioning as gRPC inputs change the picture."""

    def generate(*extra):
        result = client.infer(
            sdxl_model_name,
            [prompt_input(["a red circle"]), *extra],
            outputs=[grpcclient.InferRequestedOutput("image")],
            parameters={"seed": 5, "num_inference_steps": 2},
            client_timeout=TIMEOUT,
        )
        (png,) = images(result)
        assert png_size(png) == (64, 64)
        return png

    second = grpcclient.InferInput("prompt_2", [1], "BYTES")
    second.set_data_from_numpy(np.array(["three white circles"], dtype=np.object_))
    plain = generate()
    assert generate(int_pair("original_size", (64, 64)), int_pair("target_size", (64, 64))) == plain
    assert generate(second) != plain
    assert generate(int_pair("target_size", (1024, 1024))) != plain
    with pytest.raises(InferenceServerException) as error:
        generate(int_pair("crops_coords_top_left", (-3, 0)))
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "crops_coords_top_left" in error.value.message()


def test_image_to_image_over_grpc(client, model_name):
    """The PNG file travels as raw bytes (`raw_input_contents`); 67×61 gives 64×56."""
    path = Path(__file__).resolve().parents[3] / "models/reference/img2img/input_odd.png"
    image = grpcclient.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([path.read_bytes()], dtype=np.object_))
    result = client.infer(
        model_name,
        [prompt_input(["a red circle"]), image],
        outputs=[grpcclient.InferRequestedOutput("image")],
        parameters={"seed": 5, "num_inference_steps": 4, "strength": 0.5},
        client_timeout=TIMEOUT,
    )
    (png,) = images(result)
    assert png_size(png) == (64, 56)
    with pytest.raises(InferenceServerException) as error:
        client.infer(
            model_name,
            [prompt_input(["a"])],
            parameters={"strength": 0.5},
            client_timeout=TIMEOUT,
        )
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "'strength' (0.5) applies only to image-to-image" in error.value.message()


def test_inpainting_over_grpc(client, model_name):
    """Image and mask as raw bytes: the model's size (64×64), white = repaint."""
    folder = Path(__file__).resolve().parents[3] / "models/reference/img2img"
    tensors = []
    for name, file in (("image", "input_0.png"), ("mask_image", "mask_0.png")):
        tensor = grpcclient.InferInput(name, [1], "BYTES")
        tensor.set_data_from_numpy(np.array([(folder / file).read_bytes()], dtype=np.object_))
        tensors.append(tensor)
    result = client.infer(
        model_name,
        [prompt_input(["a red circle"]), *tensors],
        outputs=[grpcclient.InferRequestedOutput("image")],
        parameters={"seed": 6, "num_inference_steps": 3},
        client_timeout=TIMEOUT,
    )
    (png,) = images(result)
    assert png_size(png) == (64, 64)


def test_unknown_model_is_not_found(client):
    with pytest.raises(InferenceServerException) as error:
        client.infer("no-such-model", [prompt_input(["a"])], client_timeout=TIMEOUT)
    assert error.value.status() == "StatusCode.NOT_FOUND"
    assert "no-such-model" in error.value.message()


def test_bad_request_is_invalid_argument(client, model_name):
    with pytest.raises(InferenceServerException) as error:
        client.infer(
            model_name,
            [prompt_input(["a"])],
            parameters={"num_inference_steps": 100000},
            client_timeout=TIMEOUT,
        )
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "num_inference_steps" in error.value.message()


def test_short_deadline_is_deadline_exceeded_and_frees_the_worker(
    client, model_name, metrics_url
):
    steps = 150  # the default limit
    before = metric(metrics_url, "sdserve_denoise_step_seconds_count", model=model_name)
    with pytest.raises(InferenceServerException) as error:
        # At 256x256 a step is slow enough that half the steps never fit in the deadline,
        # however fast the machine (at the native 64x64 a fast one ran half of them in 0.3 s).
        client.infer(
            model_name,
            [prompt_input(["a long one"])],
            parameters={
                "num_inference_steps": steps,
                "scheduler": "euler",
                "height": 256,
                "width": 256,
            },
            client_timeout=0.3,
        )
    assert error.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    # The worker is free at once: the next request does not wait behind the abandoned one.
    result = client.infer(
        model_name,
        [prompt_input(["next"])],
        parameters={"num_inference_steps": 2},
        client_timeout=TIMEOUT,
    )
    assert len(images(result)) == 1
    assert parameter(result, "queue_seconds") < 1.0
    time.sleep(0.5)
    ran = metric(metrics_url, "sdserve_denoise_step_seconds_count", model=model_name) - before
    assert ran < steps / 2, f"{ran} steps ran for a request whose deadline passed"


def test_stream_sends_progress_then_the_result(client, model_name):
    events: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: events.put((result, error)))
    try:
        client.async_stream_infer(
            model_name,
            [prompt_input(["a yellow triangle"])],
            request_id="s-1",
            parameters={"num_inference_steps": 3, "scheduler": "ddim", "preview_every": 2},
        )
        steps, previews = [], []
        while True:
            result, error = events.get(timeout=TIMEOUT)
            assert error is None, error
            response = result.get_response()
            assert response.id == "s-1"
            names = [o.name for o in response.outputs]
            if names == ["image"]:
                break
            steps.append(response.parameters["step"].int64_param)
            if names == ["preview"]:
                previews.append(png_size(bytes(result.as_numpy("preview").reshape(-1)[0])))
        assert steps == [1, 2, 3]
        assert previews == [(64, 64)]
        assert [png_size(i) for i in images(result)] == [(64, 64)]
    finally:
        client.stop_stream()
