"""The Open Inference Protocol over gRPC, on real `bentoml serve` processes, through tritonclient.grpc (the client
Triton's and KServe's users have) and, for what it cannot send, Triton's own generated stubs: metadata and health,
answers equal to /classify's, each status code for the caller's mistakes, keys, 32 concurrent async calls, the
access line and metrics, deadlines, a port another server holds, overload and the drain."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from core.preprocess import decode_rgb, normalization_table
from harness.samples import cifar_samples
from harness.server import Server, register_shipped, serve_expecting_exit
from service.http.metrics import ALERTED_STATUSES

pytestmark = pytest.mark.server
KEY, ADMIN, SCRAPER = "grpc-key", "grpc-admin", "grpc-scraper"
AUTH = {"authorization": f"Bearer {KEY}"}
INFER = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Two workers sharing one gRPC port, with API keys (so the repository RPCs are on, for the admin key)."""
    home = tmp_path_factory.mktemp("grpc")
    (home / "keys").write_text(f"{KEY}\n{ADMIN} admin\n{SCRAPER} metrics\n")
    register_shipped({**os.environ, "BENTOML_HOME": str(home)})
    with Server(home, workers="2", api_keys_file=str(home / "keys")) as server:
        yield server


@pytest.fixture(scope="module")
def client(served: Server) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(served.grpc_url)


def images_input(images: list[bytes]) -> grpcclient.InferInput:
    given = grpcclient.InferInput("image", [len(images)], "BYTES")
    given.set_data_from_numpy(np.array(images, dtype=np.object_))
    return given


def classified(served: Server, images: list[bytes], model: str) -> np.ndarray:
    """Every class's probability for each image, from REST /classify_batch (top_k 10)."""
    answer = httpx.post(
        f"{served.url}/classify_batch",
        files=[("images", (f"{i}.jpg", data)) for i, data in enumerate(images)],
        data={"model": model, "top_k": "10"},
        headers={"authorization": f"Bearer {KEY}"},
        timeout=60,
    ).json()
    rows = np.zeros((len(images), 10), np.float32)
    for row, item in zip(rows, answer["results"], strict=True):
        for prediction in item["predictions"]:
            row[prediction["index"]] = prediction["probability"]
    return rows


def normalized(images: list[bytes], metadata: dict) -> np.ndarray:
    """The service's preprocessing, by hand: decoded pixels through the model's mean/std table, NCHW."""
    table = normalization_table(metadata["mean"], metadata["std"])
    pixels = np.stack([decode_rgb(data) for data in images])
    return table[np.arange(3), pixels].transpose(0, 3, 1, 2).astype(np.float32)


def code_of(call) -> tuple[grpc.StatusCode, str]:
    """The status of a call that is expected to fail."""
    with pytest.raises(InferenceServerException) as failed:
        call()
    return grpc.StatusCode[failed.value.status().removeprefix("StatusCode.")], failed.value.message()


def test_health_and_metadata(served: Server, client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("resnet18", headers=AUTH) and client.is_model_ready("lenet", headers=AUTH)
    server = client.get_server_metadata(headers=AUTH, as_json=True)
    assert server["name"] == "cifar10-classifier" and server["extensions"] == ["model_repository"]
    model = client.get_model_metadata("resnet18", headers=AUTH, as_json=True)
    rest = httpx.get(f"{served.url}/v2/models/resnet18", headers={"authorization": f"Bearer {KEY}"}).json()
    assert model["versions"] == rest["versions"] and model["platform"] == rest["platform"] == "onnx_onnxv1"
    for key in ("inputs", "outputs"):
        assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in model[key]] == [
            (t["name"], t["datatype"], t["shape"]) for t in rest[key]
        ]
    with grpc.insecure_channel(served.grpc_url) as channel:  # Kubernetes' gRPC probe asks this service
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING


def test_infer_answers_equal_classifys_in_raw_and_typed_contents(
    served: Server, client: grpcclient.InferenceServerClient
) -> None:
    images = [data for _, data in cifar_samples(8)[:8]]
    for model in ("resnet18", "lenet"):
        expected = classified(served, images, model)
        result = client.infer(model, [images_input(images)], headers=AUTH, parameters={"top_k": 2})
        assert np.allclose(result.as_numpy("probabilities"), expected, atol=1e-5)
        labels = result.as_numpy("labels")
        assert labels.shape == (8, 2)
        names = httpx.get(f"{served.url}/models", headers={"authorization": f"Bearer {KEY}"}).json()
        metadata = names["models"][model]
        top = np.argsort(-expected, axis=1)[:, :2]
        assert [[s.decode() for s in row] for row in labels] == [[metadata["class_names"][i] for i in r] for r in top]
        assert result.as_numpy("ood_score").shape == (8,)
        tensor = grpcclient.InferInput("input", [8, 3, 32, 32], "FP32")
        tensor.set_data_from_numpy(normalized(images, metadata))
        from_tensor = client.infer(model, [tensor], headers=AUTH).as_numpy("probabilities")
        assert np.allclose(from_tensor, expected, atol=1e-5)
        # Typed contents, which tritonclient never sends: bytes_contents and fp32_contents.
        with grpc.insecure_channel(served.grpc_url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            request = service_pb2.ModelInferRequest(model_name=model)
            request.inputs.add(name="image", datatype="BYTES", shape=[8]).contents.bytes_contents.extend(images)
            typed = stub.ModelInfer(request, metadata=tuple(AUTH.items()))
            probabilities = np.frombuffer(typed.raw_output_contents[0], "<f4").reshape(8, 10)
            assert np.allclose(probabilities, expected, atol=1e-5)
            request = service_pb2.ModelInferRequest(model_name=model)
            floats = request.inputs.add(name="input", datatype="FP32", shape=[8, 3, 32, 32]).contents.fp32_contents
            floats.extend(normalized(images, metadata).ravel().tolist())
            typed = stub.ModelInfer(request, metadata=tuple(AUTH.items()))
            assert np.allclose(np.frombuffer(typed.raw_output_contents[0], "<f4").reshape(8, 10), expected, atol=1e-5)


def test_each_mistake_gets_its_code_and_says_what_to_send(
    served: Server, client: grpcclient.InferenceServerClient
) -> None:
    image = cifar_samples(1)[0][1]
    floats = grpcclient.InferInput("image", [1, 3, 32, 32], "FP32")
    floats.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.float32))
    small = grpcclient.InferInput("input", [1, 3, 28, 28], "FP32")
    small.set_data_from_numpy(np.zeros((1, 3, 28, 28), np.float32))
    other = grpcclient.InferInput("pixels", [1], "BYTES")
    other.set_data_from_numpy(np.array([image], dtype=np.object_))
    huge = images_input([os.urandom(11 * 2**20)])
    cases = [
        (lambda: client.infer("resnet18", [floats], headers=AUTH), "INVALID_ARGUMENT", "BYTES with shape [N]"),
        (lambda: client.infer("resnet18", [small], headers=AUTH), "INVALID_ARGUMENT", "[N, 3, 32, 32]"),
        (lambda: client.infer("lenet", [images_input([b"hello"])], headers=AUTH), "INVALID_ARGUMENT", "image 0:"),
        (lambda: client.infer("lenet", [other], headers=AUTH), "INVALID_ARGUMENT", "unknown input 'pixels'"),
        (
            lambda: client.infer("lenet", [images_input([image])], headers=AUTH, parameters={"top_k": 11}),
            "INVALID_ARGUMENT",
            "top_k must be between 1 and 10",
        ),
        (lambda: client.infer("vgg99", [images_input([image])], headers=AUTH), "NOT_FOUND", "no model 'vgg99'"),
        (
            lambda: client.infer("lenet", [images_input([image])], model_version="nosuch", headers=AUTH),
            "NOT_FOUND",
            "nosuch",
        ),
        (lambda: client.infer("lenet", [huge], headers=AUTH), "RESOURCE_EXHAUSTED", "10,485,760-byte limit"),
    ]
    for call, code, said in cases:
        got, message = code_of(call)
        assert (got.name, said in message) == (code, True), message
    with grpc.insecure_channel(served.grpc_url) as channel:  # bytes that are no protobuf message at all
        raw = channel.unary_unary(INFER, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as failed:
            raw(b"\xff\xff\xff\xff not a message", metadata=tuple(AUTH.items()))
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not an inference.ModelInferRequest" in failed.value.details()


def test_keys_are_asked_for_in_the_authorization_metadata(served: Server) -> None:
    client = grpcclient.InferenceServerClient(served.grpc_url)
    given = images_input([cifar_samples(1)[0][1]])
    for headers, code in (
        ({}, grpc.StatusCode.UNAUTHENTICATED),
        ({"authorization": "Bearer wrong"}, grpc.StatusCode.UNAUTHENTICATED),
        ({"authorization": f"Bearer {SCRAPER}"}, grpc.StatusCode.PERMISSION_DENIED),
    ):
        assert code_of(lambda h=headers: client.infer("lenet", [given], headers=h))[0] == code
    admin = {"authorization": f"Bearer {ADMIN}"}
    assert client.infer("lenet", [given], headers=admin).as_numpy("labels").shape == (1, 3)
    # The repository RPCs want an admin key.
    assert code_of(lambda: client.get_model_repository_index(headers=AUTH))[0] == grpc.StatusCode.PERMISSION_DENIED
    index = client.get_model_repository_index(headers=admin, as_json=True)
    ready = {m["name"] for m in index["models"] if m.get("state") == "READY"}
    assert {"resnet18", "lenet"} <= ready
    assert client.is_server_live()  # the probes need no key


def test_the_repository_rpcs_unload_and_load_a_model_in_every_worker(served: Server) -> None:
    client = grpcclient.InferenceServerClient(served.grpc_url)
    admin = {"authorization": f"Bearer {ADMIN}"}
    given = images_input([cifar_samples(1)[0][1]])
    client.unload_model("lenet", headers=admin)  # returns once every worker has dropped it
    assert code_of(lambda: client.infer("lenet", [given], headers=AUTH))[0] == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: client.unload_model("resnet18", headers=admin))[0] == grpc.StatusCode.ABORTED  # the last
    client.load_model("lenet", headers=admin)
    assert client.infer("lenet", [given], headers=AUTH).as_numpy("labels").shape == (1, 3)


def test_32_concurrent_async_calls_get_their_own_answers(served: Server) -> None:
    images = [data for _, data in cifar_samples(32)[:32]]
    expected = classified(served, images, "resnet18")

    async def run() -> list[np.ndarray]:
        client = grpcaio.InferenceServerClient(served.grpc_url)
        try:
            results = await asyncio.gather(
                *(client.infer("resnet18", [images_input([image])], headers=AUTH) for image in images)
            )
        finally:
            await client.close()
        return [result.as_numpy("probabilities")[0] for result in results]

    assert np.allclose(np.stack(asyncio.run(run())), expected, atol=1e-5)


def access_lines(server: Server, path: str) -> list[dict]:
    """The server's JSON access lines for `path`."""
    lines = (server.home / f"serve-{server.port}.log").read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith('{"time"') and f'"path":"{path}"' in line]


def test_calls_get_a_request_id_an_access_line_and_metrics(served: Server) -> None:
    image = cifar_samples(1)[0][1]
    with grpc.insecure_channel(served.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelInferRequest(model_name="lenet")
        request.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(image)
        _, call = stub.ModelInfer.with_call(request, metadata=(*AUTH.items(), ("x-request-id", "grpc-test-1")))
        assert dict(call.trailing_metadata())["x-request-id"] == "grpc-test-1"
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(service_pb2.ModelInferRequest(model_name="lenet"), metadata=tuple(AUTH.items()))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(
        line["request_id"] == "grpc-test-1" for line in access_lines(served, INFER)
    ):
        time.sleep(0.1)
    line = next(line for line in access_lines(served, INFER) if line["request_id"] == "grpc-test-1")
    assert (line["status"], line["model"], line["images"], line["method"]) == (200, "lenet", 1, "POST")
    metrics = httpx.get(f"{served.url}/metrics", headers={"authorization": f"Bearer {SCRAPER}"}).text
    # 400 counted; the statuses the alert rules watch exist from the start (a rate() misses a series' first event)
    for status in (400, *ALERTED_STATUSES):
        assert f'cifar10_http_requests_total{{endpoint="{INFER}",status="{status}"}}' in metrics


def test_a_passed_deadline_is_deadline_exceeded_and_its_work_is_dropped(served: Server) -> None:
    """A call queued behind three others on the same connection (so the same worker), with a 50 ms deadline: the
    server takes it in, then it is cancelled where it waits."""
    images = [data for _, data in cifar_samples(64)[:64]]
    before = len([line for line in access_lines(served, INFER) if line["status"] == 499])

    async def run() -> list:
        client = grpcaio.InferenceServerClient(served.grpc_url)
        try:
            ahead = [client.infer("resnet18", [images_input(images)], headers=AUTH) for _ in range(3)]
            late = client.infer("resnet18", [images_input(images)], headers=AUTH, client_timeout=0.05)
            return await asyncio.gather(*ahead, late, return_exceptions=True)
        finally:
            await client.close()

    *ahead, late = asyncio.run(run())
    assert all(not isinstance(result, Exception) for result in ahead), ahead
    assert isinstance(late, InferenceServerException) and late.status() == "StatusCode.DEADLINE_EXCEEDED", late
    deadline = time.monotonic() + 10  # the server's line for it: a 499, nobody was answered
    while time.monotonic() < deadline:
        if len([line for line in access_lines(served, INFER) if line["status"] == 499]) > before:
            break
        time.sleep(0.1)
    else:
        pytest.fail("no 499 access line for the call whose deadline passed")


def test_a_grpc_port_that_another_server_holds_is_refused_in_one_line(served: Server) -> None:
    env = {**os.environ, "BENTOML_HOME": str(served.home), "CIFAR10_GRPC_PORT": str(served.grpc_port)}
    result = serve_expecting_exit(["service.service:Classifier"], env, Path(__file__).parents[1], timeout=60)
    assert result.returncode != 0
    assert f"error: CIFAR10_GRPC_PORT={served.grpc_port}: the port is in use" in result.stderr


def test_overload_is_resource_exhausted_and_sigterm_drains_with_nothing_lost(tmp_path: Path) -> None:
    register_shipped({**os.environ, "BENTOML_HOME": str(tmp_path)})
    images = [data for _, data in cifar_samples(64)[:64]]
    with Server(tmp_path, workers="1", max_concurrency="2") as server:

        async def burst() -> list[str]:
            client = grpcaio.InferenceServerClient(server.grpc_url)
            try:
                calls = (client.infer("resnet18", [images_input(images)]) for _ in range(16))
                outcomes = await asyncio.gather(*calls, return_exceptions=True)
            finally:
                await client.close()
            return [o.status() if isinstance(o, InferenceServerException) else "OK" for o in outcomes]

        outcomes = asyncio.run(burst())
        assert set(outcomes) == {"OK", "StatusCode.RESOURCE_EXHAUSTED"}, outcomes

        async def through_sigterm() -> tuple[list[str], int]:
            """As many clients as max_concurrency, one image at a time, for up to 400 calls or 30 s; SIGTERM once
            40 are answered."""
            client = grpcaio.InferenceServerClient(server.grpc_url)
            outcomes: list[str] = []
            stop = time.monotonic() + 30

            async def one_client() -> None:
                while len(outcomes) < 400 and time.monotonic() < stop:
                    try:
                        await client.infer("lenet", [images_input(images[:1])], client_timeout=20)
                        outcomes.append("OK")
                    except InferenceServerException as exc:
                        outcomes.append(exc.status())
                        if exc.status() == "StatusCode.UNAVAILABLE":
                            return  # refused or gone: a client would go to another replica
                    if outcomes.count("OK") == 40:
                        os.kill(server.process.pid, signal.SIGTERM)

            try:
                await asyncio.gather(*(one_client() for _ in range(2)))
            finally:
                await client.close()
            return outcomes, server.process.wait(timeout=60)

        outcomes, exit_code = asyncio.run(through_sigterm())
    assert exit_code == 0
    assert outcomes.count("OK") >= 40
    assert set(outcomes) <= {"OK", "StatusCode.UNAVAILABLE"}, set(outcomes)
    log = (tmp_path / f"serve-{server.port}.log").read_text()
    drained = next(line for line in log.splitlines() if "POST requests received" in line)
    received, answered = (int(word) for word in drained.split() if word.isdigit())
    assert received == answered, drained
