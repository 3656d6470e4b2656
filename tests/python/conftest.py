"""Where the server under test is: set by tests/tests/clients.rs, which starts sdserve."""

import os

import pytest


def _required(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(
            f"{name} is not set: these tests run against a live sdserve started by "
            "`cargo test -p sdserve-tests --test clients`"
        )
    return value


@pytest.fixture(scope="session")
def base_url() -> str:
    """`http://127.0.0.1:<port>` of the inference listener."""
    return _required("SDSERVE_URL").rstrip("/")


@pytest.fixture(scope="session")
def model_name() -> str:
    return _required("SDSERVE_MODEL")


@pytest.fixture(scope="session")
def sdxl_model_name() -> str:
    """A model served from models/tiny-sdxl."""
    return _required("SDSERVE_SDXL_MODEL")


@pytest.fixture(scope="session")
def grpc_address() -> str:
    """`127.0.0.1:<port>` of the gRPC listener."""
    return _required("SDSERVE_GRPC")


@pytest.fixture(scope="session")
def metrics_url() -> str:
    """`http://127.0.0.1:<port>` of the metrics listener."""
    return _required("SDSERVE_METRICS").rstrip("/")
