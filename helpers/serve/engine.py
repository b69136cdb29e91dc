"""The prediction engine: a trained classifier as one ONNX graph, run without torch.

This is the one inference path of a trained model: the main job's figures, `evaluate`, the
notebook's `predict` and `predict.py` all run it, so they agree on every image. The ONNX
graph returns logits (run by OpenVINO where the trunk's measurement chose it on this CPU,
else by ONNX Runtime); answers.answer turns them into calibrated probabilities, the top K
and the unsure verdict. Its metadata carries what an answer needs: class folders and names,
preprocessing, temperature, the unsure and known thresholds; the checkpoint holds the
sha256 of the engine's bytes, so only the engine saved with it answers for it.
"""

from __future__ import annotations

import hashlib
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
from helpers.core.files import atomic_write_bytes, cache_dir, file_sha256, runtime_choice
from helpers.data.preprocess import Preprocess, process_image
from helpers.serve.answers import Answers, Prediction, Scores, answer
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
                 threads: int | None = None) -> Callable[[np.ndarray], list[np.ndarray]]:
    """A batch -> outputs function of an ONNX file (or its bytes) on the CPU, in fp32:
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
        compiled = core.compile_model(model, "CPU", config)
        request = compiled.create_infer_request()
        count = len(compiled.outputs)

        def run(batch: np.ndarray) -> list[np.ndarray]:
            request.infer({0: batch})
            return [request.get_output_tensor(i).data.copy() for i in range(count)]

        return run
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(source if isinstance(source, bytes) else str(source),
                                   options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: batch})


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
        self.novel_above = float(meta.get("novel_above", "inf"))
        self.weights_sha256 = meta.get("weights_sha256", "")
        self.input_name = inputs[0]
        self.runtime = runtime or chosen_runtime()
        self._run = onnx_session(self.source, runtime=self.runtime, threads=threads)

    def scores(self, batch: np.ndarray) -> Scores:
        """Raw class scores and novelty of a batch of preprocessed images (N x 3 x H x W)."""
        outputs = self._run(np.ascontiguousarray(batch, dtype=np.float32))
        logits = outputs[0]
        if logits.ndim != 2 or logits.shape[1] != len(self.class_ids):
            raise ValueError(f"the engine answers {logits.shape[1:]} scores for "
                             f"{len(self.class_ids)} classes: it is not this model's")
        return Scores(logits, outputs[1].reshape(-1) if len(outputs) > 1 else None)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Raw class scores of a batch of preprocessed images (N x 3 x H x W)."""
        return self.scores(batch).logits

    def answer(self, scores: Scores | np.ndarray, *, topk: int = 5) -> Answers:
        """answers.answer with this model's temperature and thresholds (scores, or logits
        alone: no known verdict)."""
        if not isinstance(scores, Scores):
            scores = Scores(np.asarray(scores), None)
        return answer(scores.logits, temperature=self.temperature,
                      unsure_below=self.unsure_below, novelty=scores.novelty,
                      novel_above=self.novel_above, topk=topk)

    def prediction(self, answers: Answers, row: int = 0) -> Prediction:
        """One row of answers through this model's class folders and names."""
        return answers.prediction(row, class_ids=self.class_ids, names=self.class_names)

    def predict(self, image: str | os.PathLike | Image.Image, *, topk: int = 5) -> Prediction:
        """The top-K calibrated probabilities, class folders and names of one image."""
        batch = process_image(image, spec=self.preprocess)[None]
        return self.prediction(self.answer(self.scores(batch), topk=topk))

    def run_paths(self, paths: Iterable[str | os.PathLike], *, batch_size: int = 16,
                  workers: int = 2) -> Iterator[tuple[Path, Scores | ImageError]]:
        """(path, scores) for every image in order, or (path, ImageError) for a bad one.

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
                scores = self.scores(np.stack(good)) if good else None
                rows = iter(range(len(good)))
                for path, x in chunk:
                    yield path, x if isinstance(x, ImageError) else scores.row(next(rows))


def bind(checkpoint_sha256: str, engine_sha256: str) -> None:
    """Record, in this user's cache, that the engine with these bytes was rebuilt from the
    checkpoint with these bytes (a checkpoint that names no engine, or another build's)."""
    try:
        atomic_write_bytes(engine_sha256.encode(),
                           cache_dir() / "engines" / f"bound-{checkpoint_sha256[:40]}")
    except OSError:  # a read-only cache: the engine is rebuilt next time
        pass


def _bound(checkpoint_sha256: str) -> str:
    """The sha256 of the engine last rebuilt from the checkpoint with these bytes, or ''."""
    try:
        return (cache_dir() / "engines" / f"bound-{checkpoint_sha256[:40]}").read_text()
    except OSError:
        return ""


def belongs_to(engine: Engine, checkpoint: str | os.PathLike, *, sha256: str) -> bool:
    """True when the engine file whose bytes have this sha256 is the checkpoint's: named by it
    (saved with it by save_model) or rebuilt from it here (bind), with the same classes in the
    same order."""
    try:
        facts = checkpoint_facts(checkpoint)
    except ValueError:
        return False
    mapping = facts.get("class_to_idx")
    if not sha256 or not isinstance(mapping, dict):
        return False
    if facts.get("engine_sha256") != sha256 and _bound(file_sha256(checkpoint)) != sha256:
        return False
    class_ids = sorted(mapping, key=mapping.get)
    return class_ids == engine.class_ids and facts.get("class_names") == engine.class_names


def open_engine(checkpoint: str | os.PathLike) -> Engine | None:
    """The engine beside a checkpoint when it exists, loads and belongs to it (the checkpoint
    holds the sha256 of exactly these bytes); None otherwise (missing, damaged, stale, another
    model's graph however its metadata reads, or a checkpoint saved before engines were named
    by their bytes: the caller rebuilds it)."""
    path = engine_path(checkpoint)
    if not path.is_file():
        return None
    try:
        data = path.read_bytes()  # read once: what is checked is what answers
        engine = Engine(data)
    except Exception:  # damaged in any way ONNX Runtime can fail: rebuilt, never trusted
        return None
    engine.path = path
    return engine if belongs_to(engine, checkpoint,
                                sha256=hashlib.sha256(data).hexdigest()) else None
