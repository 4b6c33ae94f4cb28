"""Concurrent requests answered together: one worker thread owns the model and runs queued requests as
mixed-adapter batches through TunedModel.generate (PEFT adapter_names), streaming each row's text back.

Requests waiting when the worker is free form the next batch. Each row keeps its own adapter, `max_tokens` (the
batch runs to the largest; a row is cut at its own), stop strings and sampling: `generate` runs greedy and
_RowSampler picks each sampled row's token with the request's temperature and top_p and a torch.Generator of its
own (seeded by the request's `seed`, else at random). Nothing touches torch's global RNG, so a request's seed
decides its text whatever else shares the batch, and changes no other request's sampling.
"""

from __future__ import annotations

import logging
import queue
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from gemmatune.infer.model import TunedModel, generation_order
from gemmatune.infer.sampling import SampleRows, Settings

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One request: a prompt row for one adapter, and where its text goes."""

    row: dict
    adapter: str
    max_tokens: int
    greedy: bool
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    emit: Callable[[str], None] | None  # streamed text pieces (None: not streamed)
    done: Callable[[Result | BaseException], None]  # called once, from the worker thread
    prompt_ids: list[int] = field(default_factory=list)  # tokenized once, where the request was checked
    cancelled: bool = False  # the client went away: its row's output is dropped
    media_dir: Path | None = None  # the request's image/audio files: removed once the job leaves the worker
    _tokens: list[int] = field(default_factory=list)
    _sent: str = ""
    _finished: bool = False  # its row is over: later tokens of the batch are not its own
    _answered: bool = False  # done() was called

    def answer(self, result: Result | BaseException) -> None:
        if not self._answered:
            self._answered = True
            self.done(result)

    def release(self) -> None:
        """Called by the worker when the job is over or dropped: its media files were read, or never will be."""
        if self.media_dir is not None:
            shutil.rmtree(self.media_dir, ignore_errors=True)



@dataclass
class Result:
    text: str
    finish_reason: str  # "stop": end of turn / EOS / a stop string; "length": max_tokens reached
    prompt_tokens: int
    completion_tokens: int


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Text up to the first stop string, and whether one was found (OpenAI: the stop string is not returned)."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


class _RowStreamer(BaseStreamer):
    """Receives each step's token per row from `generate`, hands each job its new text, and answers a job as
    soon as its row is over, while the rest of the batch goes on.

    The first `put` is the prompt batch; later ones hold one token per row. A row is over at a stop token
    (the model's end of turn / EOS), at its own max_tokens or at a stop string; later tokens are ignored.
    """

    def __init__(self, model: TunedModel, jobs: list[Job]):
        self.model = model
        self.jobs = jobs
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for job, token in zip(self.jobs, value.reshape(len(self.jobs), -1)[:, -1].tolist(), strict=True):
            if job._finished or job.cancelled:
                continue
            if token in self.model.stop_ids:
                job._finished = True
                job.answer(_finish(self.model, job, job._tokens, stopped=True))
                continue
            job._tokens.append(token)
            if len(job._tokens) >= job.max_tokens:
                job._finished = True
            elif job.stop or job.emit is not None:
                self._new_text(job)
            if job._finished:
                job.answer(_finish(self.model, job, job._tokens, stopped=False))

    def end(self) -> None:
        pass

    def _new_text(self, job: Job) -> None:
        """End the row at a stop string; stream the text that is sure to stay."""
        text = self.model.tokenizer.decode(job._tokens, skip_special_tokens=True)
        text, hit = cut_at_stop(text, job.stop)
        if hit:
            job._finished = True
            return  # _finish sends the rest
        if job.emit is not None:
            # Hold back what may be a stop string's start, or a character whose bytes have not all arrived.
            hold = max((len(s) - 1 for s in job.stop), default=0)
            text = text[: len(text) - hold] if hold else text
            text = text.rstrip("\ufffd")
            if len(text) > len(job._sent) and text.startswith(job._sent):
                job.emit(text[len(job._sent):])
                job._sent = text


class _RowsOver(StoppingCriteria):
    """Tells `generate` which rows are over by the rules above, or whose client left: when all are, it stops."""

    def __init__(self, jobs: list[Job]):
        self.jobs = jobs

    def __call__(self, input_ids, scores, **kwargs):
        return torch.tensor([j._finished or j.cancelled for j in self.jobs], dtype=torch.bool,
                            device=input_ids.device)


class _RowSampler(SampleRows):
    """Each sampled row's next token, drawn with its own request's temperature and top_p (no top_k in the API) and
    its own torch.Generator, so it depends on nothing but the row and its seed. Greedy rows pass unchanged."""

    def __init__(self, jobs: list[Job]):
        super().__init__(self.row_settings)
        self.jobs = jobs
        self.generators: dict[int, torch.Generator] = {}

    def generator(self, i: int, device: torch.device) -> torch.Generator:
        if i not in self.generators:
            seed = self.jobs[i].seed
            g = torch.Generator(device=device)
            g.manual_seed(seed % 2**64 if seed is not None else secrets.randbits(64))
            self.generators[i] = g
        return self.generators[i]

    def row_settings(self, i: int, device: torch.device) -> Settings | None:
        job = self.jobs[i]
        return None if job.greedy else (job.temperature, job.top_p, 0, self.generator(i, device))


class Batcher:
    """The worker thread and its queue. `submit` from any thread (before `start` too: what is queued when the
    worker starts is its first batch); `close` finishes queued work, then stops."""

    def __init__(self, model: TunedModel, max_batch: int = 16, wait: float = 0.02):
        self.model = model
        self.max_batch = max_batch
        self.wait = wait  # seconds a batch below max_batch waits for more requests before it starts
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.busy = 0  # rows in the batch being generated now
        # Batches started so far, and the rows in them: the health check shows them. Counted before a batch
        # runs, because its rows are answered while it runs: a client that has its answer sees its row counted.
        self.batches = 0
        self.rows = 0
        self.thread = threading.Thread(target=self._work, name="gemmatune-batcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        if not job.prompt_ids:
            job.prompt_ids = self.model.prompt_ids(job.row, job.adapter)
        self.queue.put(job)

    def close(self, timeout: float | None = None) -> None:
        self.queue.put(None)
        self.thread.join(timeout)

    def _work(self) -> None:
        pending: list[Job] = []
        closing = False
        while pending or not closing:
            if not pending:
                first = self.queue.get()
                if first is None:
                    break
                pending.append(first)
            # Everything that arrived meanwhile joins; then, below a full batch, what arrives within `wait` s:
            # clients answered by the last batch send their next requests a few milliseconds apart.
            deadline = time.monotonic() + self.wait
            while True:
                left = deadline - time.monotonic()
                try:
                    if left > 0 and not closing and len(pending) < self.max_batch:
                        item = self.queue.get(timeout=left)
                    else:
                        item = self.queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    closing = True
                else:
                    pending.append(item)
            for job in pending:
                if job.cancelled:
                    job.release()
            pending = [j for j in pending if not j.cancelled]
            if not pending:
                continue
            batch, pending = pending[: self.max_batch], pending[self.max_batch:]
            try:
                self._run(batch)
            finally:
                for job in batch:
                    job.release()

    def _run(self, jobs: list[Job]) -> None:
        # In generate's own order, so the streamer's row i is jobs[i].
        jobs = [jobs[i] for i in generation_order([len(j.prompt_ids) for j in jobs])]
        self.busy = len(jobs)
        self.batches += 1
        self.rows += len(jobs)
        try:
            self.model.generate(
                [j.row for j in jobs], adapter=[j.adapter for j in jobs], batch_size=len(jobs),
                prompt_ids=[j.prompt_ids for j in jobs],
                streamer=_RowStreamer(self.model, jobs), stopping_criteria=StoppingCriteriaList([_RowsOver(jobs)]),
                max_new_tokens=max(j.max_tokens for j in jobs), greedy=True,
                logits_processor=LogitsProcessorList([_RowSampler(jobs)]))
        except Exception as exc:  # noqa: BLE001 - the requests get the error; the worker lives on
            log.exception("generation failed")
            for job in jobs:
                job.answer(exc)
            return
        finally:
            self.busy = 0
        for job in jobs:  # rows the streamer did not end: a cancelled client, or a batch cut short
            job.answer(_finish(self.model, job, job._tokens, stopped=False))

    def status(self) -> dict:
        return {"queued": self.queue.qsize(), "generating": self.busy, "batches": self.batches, "rows": self.rows}


def _finish(model: TunedModel, job: Job, tokens: list[int], stopped: bool) -> Result:
    """The job's answer from its row of the batch, `tokens` without the stop token: cut at its stop strings."""
    text, hit = cut_at_stop(model.tokenizer.decode(tokens, skip_special_tokens=True), job.stop)
    finish = "stop" if stopped or hit else "length"
    if job.emit is not None and not job.cancelled:
        if text.startswith(job._sent) and len(text) > len(job._sent):
            job.emit(text[len(job._sent):])
        job._sent = text
    return Result(text, finish, len(job.prompt_ids), len(tokens) + (1 if stopped and not hit else 0))
