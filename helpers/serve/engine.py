"""The prediction engine: a trained classifier as one ONNX graph, run without torch.

This is the one inference path of a trained model: the main job's figures, `evaluate`, the
notebook's `predict` and `predict.py` all run it, so they agree on every image. The ONNX
graph returns logits (run by OpenVINO where the trunk's measurement chose it on this CPU,
else by ONNX Runtime); answers.answer turns them into calibrated probabilities, the top K
and the unsure verdict. Its metadata carries what an answer needs: class folders and names,
preprocessing, temperature, unsure threshold, and the sha256 of the checkpoint it was
made from, so a stale engine beside a newer checkpoint is never used.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from helpers.core.errors import ImageError
from helpers.core.files import file_sha256, runtime_choice
from helpers.data.preprocess import Preprocess, process_image
from helpers.serve.answers import Answers, Prediction, answer
from helpers.serve.headers import checkpoint_facts, read_header

ENGINE_SUFFIX = ".engine.onnx"


def engine_path(checkpoint: str | os.PathLike) -> Path:
    """Where the engine of a checkpoint lives: beside it (checkpoint.engine.onnx)."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name.rsplit(".", 1)[0] + ENGINE_SUFFIX)


def chosen_runtime() -> str:
    """The runtime the cached recipe measured fastest on this CPU (trunk.py), when it is
    OpenVINO and installed; else ONNX Runtime."""
    try:
        saved = json.loads(runtime_choice().read_text())["runtime"]
    except (OSError, ValueError, KeyError, TypeError):
        saved = "onnxruntime"
    if saved == "openvino" and importlib.util.find_spec("openvino") is not None:
        return "openvino"
    return "onnxruntime"


def onnx_session(source: Path | bytes, *, runtime: str,
                 threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """A batch -> first output function of an ONNX file (or its bytes) on the CPU, in fp32:
    ONNX Runtime
    (every graph optimisation) or OpenVINO (f32, not bf16; the latency hint puts every core
    on one request, where two throughput streams would halve a synchronous call)."""
    if runtime == "openvino":
        import openvino as ov

        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        core = ov.Core()
        model = core.read_model(source if isinstance(source, bytes) else str(source))
        request = core.compile_model(model, "CPU",
                                     config).create_infer_request()

        def run(batch: np.ndarray) -> np.ndarray:
            request.infer({0: batch})
            return request.get_output_tensor(0).data.copy()

        return run
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(source if isinstance(source, bytes) else str(source),
                                   options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: batch})[0]


class Engine:
    """An exported classifier with its labels, preprocessing and calibration.

    Made from an ONNX file, or from its bytes held in memory (`path` is then None): an engine
    that could not be saved, in a read-only or full place, still answers.
    """

    def __init__(self, source: str | os.PathLike | bytes, *, threads: int | None = None,
                 runtime: str | None = None) -> None:
        self.path = None if isinstance(source, bytes) else Path(source)
        self.source: Path | bytes = source if isinstance(source, bytes) else Path(source)
        meta, inputs = read_header(self.source)
        self.class_names: list[str] = json.loads(meta["class_names"])
        self.class_ids: list[str] = json.loads(meta["class_ids"])
        self.preprocess = Preprocess.from_metadata(meta)
        self.temperature = float(meta.get("temperature", 1.0))
        self.unsure_below = float(meta.get("unsure_below", 0.0))
        self.checkpoint_sha256 = meta.get("checkpoint_sha256", "")
        self.weights_sha256 = meta.get("weights_sha256", "")
        self.input_name = inputs[0]
        self.runtime = runtime or chosen_runtime()
        self._run = onnx_session(self.source, runtime=self.runtime, threads=threads)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Raw class scores of a batch of preprocessed images (N x 3 x H x W)."""
        return self._run(np.ascontiguousarray(batch, dtype=np.float32))

    def answer(self, logits: np.ndarray, *, topk: int = 5) -> Answers:
        """answers.answer with this model's temperature and unsure threshold."""
        return answer(logits, temperature=self.temperature, unsure_below=self.unsure_below,
                      topk=topk)

    def prediction(self, answers: Answers, row: int = 0) -> Prediction:
        """One row of answers through this model's class folders and names."""
        return answers.prediction(row, class_ids=self.class_ids, names=self.class_names)

    def predict(self, image: str | os.PathLike | Image.Image, *, topk: int = 5) -> Prediction:
        """The top-K calibrated probabilities, class folders and names of one image."""
        batch = process_image(image, spec=self.preprocess)[None]
        return self.prediction(self.answer(self.logits(batch), topk=topk))

    def run_paths(self, paths: Iterable[str | os.PathLike], *, batch_size: int = 16,
                  workers: int = 2) -> Iterator[tuple[Path, np.ndarray | ImageError]]:
        """(path, logits) for every image in order, or (path, ImageError) for a bad one.

        Images are decoded and prepared in threads (PIL releases the GIL) while the model
        runs batches; a bad image never stops the others.
        """
        def prepare(path: Path) -> np.ndarray | ImageError:
            try:
                return process_image(path, spec=self.preprocess)
            except ImageError as err:
                return err

        paths = iter(Path(p) for p in paths)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            # at most two batches prepared ahead: memory stays flat on folders of any size
            pending = deque((p, pool.submit(prepare, p))
                            for p in itertools.islice(paths, 2 * batch_size))
            while pending:
                chunk = []
                while pending and len(chunk) < batch_size:
                    path, future = pending.popleft()
                    chunk.append((path, future.result()))
                    following = next(paths, None)
                    if following is not None:
                        pending.append((following, pool.submit(prepare, following)))
                good = [x for _, x in chunk if not isinstance(x, ImageError)]
                scores = iter(self.logits(np.stack(good)) if good else [])
                for path, x in chunk:
                    yield path, x if isinstance(x, ImageError) else next(scores)


def belongs_to(engine: Engine, checkpoint: str | os.PathLike, *, sha256: str) -> bool:
    """True when the engine was made from the checkpoint whose bytes have this sha256, and the
    checkpoint names this engine (its key) and the same classes in the same order."""
    if not sha256 or engine.checkpoint_sha256 != sha256:
        return False
    try:
        facts = checkpoint_facts(checkpoint)
    except ValueError:
        return False
    mapping = facts.get("class_to_idx")
    if not isinstance(mapping, dict):
        return False
    class_ids = sorted(mapping, key=mapping.get)
    return (class_ids == engine.class_ids and facts.get("class_names") == engine.class_names
            and facts.get("engine_key", engine.weights_sha256) == engine.weights_sha256)


def open_engine(checkpoint: str | os.PathLike) -> Engine | None:
    """The engine beside a checkpoint when it exists, loads and belongs to it (made from these
    exact bytes, named by it, the same classes); None otherwise (missing, damaged, stale or
    another model's: the caller rebuilds it)."""
    path = engine_path(checkpoint)
    if not path.is_file():
        return None
    try:
        engine = Engine(path)
    except Exception:  # damaged in any way ONNX Runtime can fail: rebuilt, never trusted
        return None
    return engine if belongs_to(engine, checkpoint, sha256=file_sha256(checkpoint)) else None
