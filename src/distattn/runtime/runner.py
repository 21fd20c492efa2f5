"""The decode loop on the device: fixed shapes, persistent buffers, optionally one CUDA graph per call on a GPU.

After prefill, every decode step of `generate` (no drafts) is the same tensor program over
buffers that live on the model's device: the rows' newest tokens, their positions, which rows still
run, how many tokens each produced, the tokens themselves, and where a row's logits went non-finite.
A step embeds the tokens, runs the layers over the static cache (`DecoderLM.run_layers`, trusting a
step description built from those buffers: no check, no host sync, no data-dependent shape), picks
each row's token on the device (argmax, or a temperature / top-p sample: `sampler.SamplingRows`),
and decides on the device whether the row stops (a stop token, its length, or
non-finite logits). Rows that stopped are fed as padding (their inputs zeroed, as the host loop
feeds them), so every row's numbers are the host loop's.

The host reads the running flags once every `sync_every` steps (and each time tells `on_tokens`
how many tokens were made: progress comes in steps of `sync_every`), and the tokens once at the end. With `graphs=True` on CUDA the step is
captured once as a CUDA graph (after a warm-up step) and replayed: one launch per step instead of one
per kernel (greedy and sampled steps alike: the sampler's noise has no generator state; not yet measured on a
GPU: off by default).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache.static import KVCacheManager
from ..models.decoder import DecoderLM
from ..step.metadata import StepMetadata, WritePlans
from .loop import Emitter, Row
from .sampler import Sampling, SamplingRows


@dataclass(frozen=True)
class DecodeBuffers:
    """The loop's state on the device (B rows, N = max_new_tokens)."""

    tokens: torch.Tensor  # [B] long: each row's newest token (fed next)
    positions: torch.Tensor  # [B] long: its position
    running: torch.Tensor  # [B] bool
    produced: torch.Tensor  # [B] long: tokens made so far (the prefill's first included)
    out: torch.Tensor  # [B, N] long: the tokens made
    failed_at: torch.Tensor  # [B] long: the new token whose logits went non-finite, -1 if none
    stops: torch.Tensor  # [S] long: stop tokens
    seq_rows: torch.Tensor  # [B] long: 0..B-1 (cache rows, write plans)

    @classmethod
    def of_rows(cls, rows: list[Row], max_new_tokens: int, stops: set[int], device: torch.device) -> DecodeBuffers:
        """The state of rows whose prompts were prefilled (each holding its first new token, or stopped)."""
        def longs(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        out = torch.zeros(len(rows), max_new_tokens, dtype=torch.long)
        for b, row in enumerate(rows):
            out[b, : len(row.out)] = torch.tensor(row.out, dtype=torch.long)
        return cls(
            tokens=longs([row.history[-1] for row in rows]), positions=longs([len(row.history) - 1 for row in rows]),
            running=torch.tensor([row.running for row in rows], dtype=torch.bool, device=device),
            produced=longs([len(row.out) for row in rows]), out=out.to(device), failed_at=longs([-1] * len(rows)),
            stops=longs(sorted(stops)), seq_rows=longs(list(range(len(rows)))),
        )


class DeviceDecoder:
    """Decode steps of `model` over `cache` for rows already prefilled (see the module docstring)."""

    def __init__(self, model: DecoderLM, cache: KVCacheManager, rows: list[Row], emitter: Emitter,
                 adapters: torch.Tensor | None, samplings: list[Sampling], *, sync_every: int = 8, graphs: bool = False) -> None:
        device = model.embed_tokens.weight.device
        self.buffers = DecodeBuffers.of_rows(rows, emitter.max_new_tokens, emitter.stops, device)
        self.model, self.cache, self.rows, self.emitter, self.adapters = model, cache, rows, emitter, adapters
        self.sync_every = sync_every
        self.sampling = SamplingRows.of(samplings, device)
        self.graphs = graphs and device.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.steps = 0

    def run(self) -> None:
        """Decode until every row stopped, then hand the tokens (and any row's failure) to the rows."""
        produced = [len(row.out) for row in self.rows]
        running = [row.running for row in self.rows]
        while any(running):  # (every rank of a parallel model takes the same steps: the reads, not the progress, decide)
            left = max(self.emitter.max_new_tokens - count for count, alive in zip(produced, running) if alive)  # steps any row may still take
            for _ in range(min(self.sync_every, left)):
                self._one_step()
            before, produced = produced, self.buffers.produced.tolist()  # the loop's host read
            running = self.buffers.running.tolist()
            if self.emitter.on_tokens is not None:
                self.emitter.on_tokens(sum(produced) - sum(before))
        self._deliver()

    def _one_step(self) -> None:
        if not self.graphs:
            self.step()
        elif self.graph is None:
            self.graph = self._capture()
        else:
            self.graph.replay()
        self.steps += 1

    def _capture(self) -> torch.cuda.CUDAGraph:
        """One eager step on a side stream (kernels chosen, memory pools warm), then the next step captured
        (it runs too) and replayed from then on."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.step()
        torch.cuda.current_stream().wait_stream(stream)
        self.steps += 1
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.step()
        graph.replay()  # capture records the step without running it
        return graph

    def step(self) -> None:
        """One decode step, all on the device, updating the buffers in place."""
        buf, model = self.buffers, self.model
        running = buf.running.clone()
        hidden = model.embed(buf.tokens.unsqueeze(1))  # [B, 1, hidden]
        logits = model.run_layers(hidden, self._describe(running), None)[:, 0]  # [B, vocab]
        finite = torch.isfinite(logits).all(-1)
        emit = running & finite
        picked = self.sampling.sample(logits, buf.positions + 1)  # each row draws its token at index position + 1
        slot = buf.produced.clamp(max=buf.out.shape[1] - 1)
        buf.out.scatter_(1, slot.unsqueeze(1), torch.where(emit, picked, buf.out.gather(1, slot.unsqueeze(1)).squeeze(1)).unsqueeze(1))
        buf.failed_at.copy_(torch.where(running & ~finite, buf.produced, buf.failed_at))
        buf.produced.add_(emit.long())
        stopped = emit & (torch.isin(picked, buf.stops) | (buf.produced >= buf.out.shape[1]))
        buf.running.copy_(running & finite & ~stopped)
        buf.positions.add_(emit.long())
        buf.tokens.copy_(torch.where(buf.running, picked, torch.zeros_like(picked)))  # a stopped row is fed padding (token 0)

    def _describe(self, running: torch.Tensor) -> StepMetadata:
        """This step's facts from the buffers: one new token per row at its position, rows that stopped
        as padding, and where each cache geometry stores the new tokens (pure tensor work)."""
        buf = self.buffers
        positions, valid = buf.positions.unsqueeze(1), running.unsqueeze(1)  # [B, 1]
        plans = WritePlans()
        for idx, layer in enumerate(self.cache.layers):
            key = layer.geometry()
            if key not in plans.by_geometry:
                plans.by_geometry[key] = layer.in_order_plan(buf.seq_rows, positions)
            plans.by_layer[idx] = plans.by_geometry[key]
        return StepMetadata(
            positions, positions, valid, None, None, None, None, context_encoding=False, reads_prior=True, adapter_ids=self.adapters,
            padded=True, read_rows=self.cache.layers[0].rows_for(None, positions.shape[0]), kv_mgr=self.cache, plans=plans,
        )

    def _deliver(self) -> None:
        """The tokens made after the prefill's, through the emitter (stop and length as the device decided them)."""
        out, produced, failed = self.buffers.out.tolist(), self.buffers.produced.tolist(), self.buffers.failed_at.tolist()
        quiet = Emitter(self.emitter.stops, self.emitter.max_new_tokens)  # progress was reported as it came
        for row, tokens, count, at in zip(self.rows, out, produced, failed):
            for token in tokens[len(row.out) : count]:
                quiet.emit(row, token)
            if at >= 0:
                row.running = False
                row.error = f"logits went non-finite at new token {at}: the model's numbers overflowed for this input"


def use_device_loop(model: DecoderLM, draft: str) -> bool:
    """Whether `generate` runs its decode steps through `DeviceDecoder`: no drafts, and no data-parallel
    decode (its replicas route rows by seq_ids: the host loop's plan). Under tensor (and context) parallelism every
    rank runs the same loop: the lm_head is replicated, so every rank picks the same tokens."""
    return draft == "none" and model.groups.dp_size == 1
