"""Precision and runtime per model: hardware detection, the choice of precision, the
fidelity of every fast path against the float32 TensorFlow call, OpenVINO's
conversion cache and its fallback to TensorFlow."""

from __future__ import annotations

import logging
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest

from shared.modes import DecodeMode, Precision, RuntimeKind
from shared.registry import Activation, ModelSpec, RegistryError, load_registry
from shared.settings import Settings
from tests.savedmodels import build_classifier
from workers.classifier import Classifier
from workers.hardware import Hardware, PrecisionError, detect, parse_cpuinfo, resolve_precision
from workers.runtimes.base import top_k

HOST = detect()
needs_bf16 = pytest.mark.skipif(
    not HOST.bf16, reason="this CPU has no AMX-BF16 / AVX512-BF16: bf16 is refused here"
)

needs_openvino = pytest.mark.skipif(
    find_spec("openvino") is None, reason="the openvino extra is not installed"
)

SPR = Hardware("Xeon", frozenset({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}))
OLD = Hardware("Xeon E5", frozenset({"avx2", "fma"}))
GPU = Hardware("Xeon", frozenset({"avx512_bf16"}), gpus=("/physical_device:GPU:0",))

# Tolerances of the documented fidelity (docs/benchmarks.md), on the test models.
TOP1_AGREEMENT = {Precision.FP32: 1.0, Precision.BF16: 0.95}
SCORE_TOLERANCE = {Precision.FP32: 1e-4, Precision.BF16: 0.05}


def test_cpuinfo_flags_and_description() -> None:
    text = (
        "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
        "flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni amx_bf16 amx_tile\n\n"
        "processor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n"
    )
    name, flags = parse_cpuinfo(text)
    assert name == "Intel(R) Xeon(R) Platinum 8480+"
    assert {"amx_bf16", "avx512_bf16", "avx512_vnni"} <= flags
    hw = Hardware(name, flags)
    assert hw.bf16
    line = hw.describe()
    assert "amx_bf16" in line and "avx512_bf16" in line and "native bf16" in line
    assert "no GPU" in line
    assert not Hardware(*parse_cpuinfo("flags : avx2 avx512f\n")).bf16
    assert "bf16 refused" in OLD.describe()


def test_detect_reads_this_machine(tmp_path: Path) -> None:
    fake = tmp_path / "cpuinfo"
    fake.write_text("model name : Test CPU\nflags : sse avx512_bf16\n")
    hw = detect(["/physical_device:GPU:0"], cpuinfo=fake)
    assert hw.cpu == "Test CPU" and hw.bf16 and hw.gpus == ("/physical_device:GPU:0",)
    assert not detect(cpuinfo=tmp_path / "missing").bf16
    assert HOST.cpu  # this Linux machine has a /proc/cpuinfo


@pytest.mark.parametrize(
    ("requested", "runtime", "hardware", "expected"),
    [
        (Precision.AUTO, RuntimeKind.TENSORFLOW, SPR, Precision.BF16),
        (Precision.AUTO, RuntimeKind.OPENVINO, SPR, Precision.BF16),
        (Precision.AUTO, RuntimeKind.TENSORFLOW, OLD, Precision.FP32),
        (Precision.AUTO, RuntimeKind.TENSORFLOW, GPU, Precision.FP16),
        (Precision.AUTO, RuntimeKind.OPENVINO, GPU, Precision.BF16),  # OpenVINO: CPU only
        (Precision.FP32, RuntimeKind.TENSORFLOW, OLD, Precision.FP32),
        (Precision.BF16, RuntimeKind.OPENVINO, SPR, Precision.BF16),
        (Precision.FP16, RuntimeKind.TENSORFLOW, GPU, Precision.FP16),
        (Precision.AUTO, RuntimeKind.NUMPY, SPR, Precision.FP32),  # NumPy: fp32 only
        (Precision.AUTO, RuntimeKind.NUMPY, GPU, Precision.FP32),
    ],
)
def test_precision_resolution(
    requested: Precision, runtime: RuntimeKind, hardware: Hardware, expected: Precision
) -> None:
    assert resolve_precision(requested, runtime, hardware, "m") is expected


@pytest.mark.parametrize(
    ("requested", "runtime", "hardware", "message"),
    [
        (Precision.BF16, RuntimeKind.TENSORFLOW, OLD, "would be emulated, slower than fp32"),
        (Precision.BF16, RuntimeKind.OPENVINO, OLD, "needs a CPU with AMX-BF16 or AVX512-BF16"),
        (Precision.BF16, RuntimeKind.TENSORFLOW, GPU, "use fp16 (or auto) on GPUs"),
        (Precision.FP16, RuntimeKind.TENSORFLOW, SPR, "no GPU; use bf16 or auto"),
        (Precision.FP16, RuntimeKind.TENSORFLOW, OLD, "use fp32 or auto"),
        (Precision.FP16, RuntimeKind.OPENVINO, GPU, "OpenVINO runs on the CPU"),
        (Precision.BF16, RuntimeKind.NUMPY, SPR, "numpy runtime runs in fp32 only, not bf16"),
    ],
)
def test_precisions_the_device_cannot_run_are_refused(
    requested: Precision, runtime: RuntimeKind, hardware: Hardware, message: str
) -> None:
    with pytest.raises(PrecisionError, match="model 'm': ") as err:
        resolve_precision(requested, runtime, hardware, "m")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_models_file_fields_and_their_errors(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(
        '[models.fast]\nhandle = "m"\nlabels = "imagenet1k"\nprecision = "bf16"\n'
        'runtime = "openvino"\ndecode = "exact"\n\n[models.resnet50]\nprecision = "auto"\n'
    )
    registry = load_registry(path)
    fast = registry["fast"]
    assert (fast.precision, fast.runtime, fast.decode) == (
        Precision.BF16,
        RuntimeKind.OPENVINO,
        DecodeMode.EXACT,
    )
    assert registry["resnet50"].precision is Precision.AUTO
    assert registry["resnet50"].runtime is None  # the worker's default applies
    for key, value, allowed in [
        ("precision", '"int8"', "fp32, bf16, fp16, auto"),
        ("runtime", '"onnx"', "tensorflow, openvino"),
        ("decode", "1", "fast, exact"),
    ]:
        path.write_text(f'[models.x]\nhandle = "m"\nlabels = "imagenet1k"\n{key} = {value}\n')
        with pytest.raises(RegistryError, match=f"model 'x': {key} must be one of {allowed}"):
            load_registry(path)


def test_worker_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("IMGQ_PRECISION", "IMGQ_RUNTIME", "IMGQ_DECODE", "IMGQ_MIXED_PRECISION"):
        monkeypatch.delenv(key, raising=False)
    default = Settings()
    assert (default.precision, default.runtime, default.decode) == (
        Precision.FP32,
        RuntimeKind.TENSORFLOW,
        DecodeMode.FAST,
    )
    monkeypatch.setenv("IMGQ_MIXED_PRECISION", "true")  # the older switch: fp16
    assert Settings().precision is Precision.FP16
    monkeypatch.setenv("IMGQ_PRECISION", "auto")  # an explicit precision wins
    monkeypatch.setenv("IMGQ_RUNTIME", "openvino")
    monkeypatch.setenv("IMGQ_DECODE", "exact")
    s = Settings()
    assert (s.precision, s.runtime, s.decode) == (
        Precision.AUTO,
        RuntimeKind.OPENVINO,
        DecodeMode.EXACT,
    )
    monkeypatch.setenv("IMGQ_PRECISION", "half")
    with pytest.raises(ValueError, match="precision"):
        Settings()


def test_numpy_top_k_matches_the_tensorflow_one() -> None:
    import tensorflow as tf

    rng = np.random.default_rng(3)
    logits = rng.normal(0, 3, (6, 50)).astype(np.float32)
    logits[0, [4, 9]] = 10.0  # a tie: the lower index first, as tf.math.top_k
    indices, scores, width = top_k(logits, 5, Activation.SOFTMAX)
    want = tf.math.top_k(logits, 5)
    assert width == 50
    np.testing.assert_array_equal(indices, want.indices.numpy())
    soft = tf.nn.softmax(logits).numpy()
    np.testing.assert_allclose(scores, np.take_along_axis(soft, indices, 1), rtol=1e-5)
    _, sig, _ = top_k(logits, 5, Activation.SIGMOID)
    np.testing.assert_allclose(sig, tf.sigmoid(want.values).numpy(), rtol=1e-5)
    small, _, _ = top_k(logits[:, :3], 5, Activation.NONE)  # fewer classes than k
    assert small.shape == (6, 3)


# --- fidelity: each fast path against the float32 TensorFlow call --------------------
@pytest.fixture(scope="module")
def convertible(tmp_path_factory: pytest.TempPathFactory) -> ModelSpec:
    """A 1001-logit test model OpenVINO can convert (bilinear resizing)."""
    path = build_classifier(tmp_path_factory.mktemp("ov") / "m", 1001, resize="bilinear", seed=4)
    return ModelSpec(
        name="tov",
        handle=str(path),
        input_size=(32, 32),
        activation=Activation.SOFTMAX,
        labels="imagenet1k-background",
    )


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(21).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)


def fidelity(clf: Classifier, ref: Classifier, images: np.ndarray) -> tuple[float, float]:
    """Top-1 agreement and the largest top-1 score difference against the reference."""
    got = [clf.predict(images[i : i + 16]) for i in range(0, len(images), 16)]
    want = [ref.predict(images[i : i + 16]) for i in range(0, len(images), 16)]
    top1 = np.concatenate([g.indices[:, 0] for g in got])
    ref_top1 = np.concatenate([w.indices[:, 0] for w in want])
    pairs = zip(got, want, strict=True)
    diff = np.concatenate([np.abs(g.scores[:, 0] - w.scores[:, 0]) for g, w in pairs])
    return float(np.mean(top1 == ref_top1)), float(diff.max())


@pytest.mark.parametrize(
    ("runtime", "precision"),
    [
        pytest.param(RuntimeKind.OPENVINO, Precision.FP32, marks=needs_openvino),
        pytest.param(RuntimeKind.TENSORFLOW, Precision.BF16, marks=needs_bf16),
        pytest.param(RuntimeKind.OPENVINO, Precision.BF16, marks=[needs_bf16, needs_openvino]),
    ],
)
def test_fast_path_fidelity(
    convertible: ModelSpec,
    images: np.ndarray,
    tmp_path: Path,
    runtime: RuntimeKind,
    precision: Precision,
) -> None:
    ref = Classifier(convertible, max_batch_size=16).load()
    clf = Classifier(
        convertible, max_batch_size=16, runtime=runtime, precision=precision, cache_dir=tmp_path
    ).load()
    assert clf.backend is not None
    assert (clf.backend.name, clf.backend.precision) == (runtime.value, precision)
    agreement, largest = fidelity(clf, ref, images)
    assert agreement >= TOP1_AGREEMENT[precision]
    assert largest <= SCORE_TOLERANCE[precision]
    if precision is Precision.BF16:
        # The reduced precision is really in use: the scores move (a little).
        assert largest > 1e-5
    # Padding and odd batch sizes give the same answers as full batches.
    one = clf.predict(images[5:6])
    np.testing.assert_array_equal(one.indices[0], clf.predict(images[:8]).indices[5])


def test_precision_is_per_model_in_one_process(convertible: ModelSpec, images: np.ndarray) -> None:
    """A bf16 model does not turn the process's other models to bf16 (or back)."""
    if not HOST.bf16:
        pytest.skip("this CPU has no bf16 instructions")
    fp32 = Classifier(convertible, max_batch_size=8).load()
    before = fp32.predict(images[:8])
    bf16 = Classifier(convertible, max_batch_size=8, precision=Precision.BF16).load()
    reduced = bf16.predict(images[:8])
    after = fp32.predict(images[:8])
    np.testing.assert_array_equal(before.scores, after.scores)
    assert not np.array_equal(reduced.scores, after.scores)


@needs_bf16
def test_warm_up_times_the_reduced_precision_against_fp32(
    convertible: ModelSpec, caplog: pytest.LogCaptureFixture
) -> None:
    """The graph rewrite can silently change nothing: the warm-up shows it as a ratio."""
    from workers.runtime import _log_precision_speedup

    assert Classifier(convertible, max_batch_size=4).load().precision_speedup() is None
    clf = Classifier(convertible, max_batch_size=4, precision=Precision.BF16).load()
    timed = clf.precision_speedup()
    assert timed is not None and all(t > 0 for t in timed)
    with caplog.at_level(logging.INFO, logger="workers.runtime"):
        _log_precision_speedup(clf)
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"model {convertible.name}: a batch of 4 takes ")
    assert " in bf16, " in line and " in fp32 (x" in line


@needs_openvino
def test_openvino_conversion_is_cached_on_disk(tmp_path: Path) -> None:
    from workers.runtimes.openvino import OpenVINOBackend

    path = build_classifier(tmp_path / "m", 10, resize="bilinear", seed=1)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(map(str, range(10))) + "\n")
    spec = ModelSpec("tchg", str(path), (32, 32), Activation.SOFTMAX, str(labels))
    x = np.random.default_rng(4).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    cache = tmp_path / "cache"

    def load() -> Classifier:
        return Classifier(
            spec, max_batch_size=4, runtime=RuntimeKind.OPENVINO, cache_dir=cache
        ).load()

    first = load()
    assert not first.backend.from_cache
    cached = [p for p in cache.iterdir() if p.name != "compiled"]
    assert len(cached) == 1 and (cached[0] / "model.xml").is_file()
    again = load()  # a restart: read, not converted
    assert again.backend.from_cache
    np.testing.assert_array_equal(first.predict(x).scores, again.predict(x).scores)

    # The key: handle and its files, batch shapes, OpenVINO's version; one conversion
    # serves every precision (applied when compiling).
    def key(**changes: object) -> str:
        args: dict[str, object] = {
            "top_k": 5,
            "precision": Precision.FP32,
            "max_batch_size": 4,
            "cache_dir": cache,
        }
        return OpenVINOBackend(spec, **{**args, **changes}).cache_key("2026.4")  # type: ignore[arg-type]

    assert key() == key() != key(max_batch_size=8)
    renamed = ModelSpec("other", str(path), (32, 32), Activation.SOFTMAX, str(labels))
    assert key() == OpenVINOBackend(
        renamed, top_k=5, precision=Precision.FP32, max_batch_size=4, cache_dir=cache
    ).cache_key("2026.4")
    assert key() == key(precision=Precision.BF16)
    assert key() != OpenVINOBackend(
        spec, top_k=5, precision=Precision.FP32, max_batch_size=4, cache_dir=cache
    ).cache_key("2026.5")

    build_classifier(path, 10, resize="bilinear", seed=2)  # new weights, same place
    reloaded = load()
    assert not reloaded.backend.from_cache
    tf_ref = Classifier(spec, max_batch_size=4).load()
    np.testing.assert_allclose(reloaded.predict(x).scores, tf_ref.predict(x).scores, atol=1e-5)


@needs_openvino
def test_openvino_falls_back_to_tensorflow_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Area resizing (ResizeArea) has no OpenVINO conversion."""
    path = build_classifier(tmp_path / "area", 1000, resize="area")
    spec = ModelSpec("tarea", str(path), (32, 32), Activation.SOFTMAX, "imagenet1k")
    with caplog.at_level(logging.WARNING):
        clf = Classifier(
            spec, max_batch_size=4, runtime=RuntimeKind.OPENVINO, cache_dir=tmp_path / "c"
        ).load()
    assert clf.backend is not None and clf.backend.name == "tensorflow"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "model tarea: OpenVINO cannot convert it" in warnings[0]
    assert "ResizeArea" in warnings[0] and "running it in TensorFlow" in warnings[0]
    ref = Classifier(spec, max_batch_size=4).load()
    x = np.random.default_rng(6).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(clf.predict(x).indices, ref.predict(x).indices)


# --- decoding: fast (DCT downscaling) and exact (full decode, then resize) -----------
def test_exact_decode_is_a_full_decode_then_a_resize() -> None:
    import io

    from PIL import Image
    from skimage import data

    from workers.inputs.decode import decode_image

    photo = Image.fromarray(data.chelsea())  # 451x300
    jpeg, png = io.BytesIO(), io.BytesIO()
    photo.save(jpeg, "JPEG", quality=90)
    photo.save(png, "PNG")
    size = (64, 64)
    with Image.open(io.BytesIO(jpeg.getvalue())) as im:
        full = im.convert("RGB").resize(size, Image.Resampling.BILINEAR)
    reference = np.asarray(full, np.float32)
    exact = decode_image(jpeg.getvalue(), size, max_pixels=10**8, exact=True)
    fast = decode_image(jpeg.getvalue(), size, max_pixels=10**8)
    assert exact.shape == fast.shape == (64, 64, 3)
    # The same libjpeg-turbo decode: equal up to rounding in the last bit.
    assert np.abs(exact - reference).max() <= 1.5  # uint8 pixels: 0..255
    # DCT downscaling (to 1/4 here) changes pixels well beyond that.
    assert np.abs(fast - reference).max() > 10
    # PNGs have no DCT: both modes decode them the same way.
    np.testing.assert_array_equal(
        decode_image(png.getvalue(), size, max_pixels=10**8, exact=True),
        decode_image(png.getvalue(), size, max_pixels=10**8),
    )
