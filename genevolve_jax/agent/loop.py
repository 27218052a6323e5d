"""The multi-turn agent loop: many trajectories at once through one engine and the tools (asyncio).

Each trajectory alternates sampling (through :class:`EngineBatcher`, which gathers the prompts of
all trajectories that are waiting for the policy into one engine batch) and tool calls (which run
concurrently with other trajectories' sampling). Turns are appended as token segments: the policy's
sampled ids verbatim (never re-tokenised, so the recorded log-probs stay aligned) and observation
turns in ChatML, ``<|im_end|>`` (only if the turn did not end with it) ``\\n<|im_start|>user\\n…
<|im_end|>\\n<|im_start|>assistant\\n``. The initial prompt goes through the tokenizer's own chat
template.

Termination codes: ``answer`` (an answer was parsed; its program is finalised), ``max_rounds`` (no
answer by the last round), ``format_error`` (too many consecutive format errors, or one on the last
round), ``too_long`` (prompt, per-round or response cap hit; masked), ``error`` (engine abort,
backend failure after retries or an unexpected exception; masked).
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
import traceback
from typing import Awaitable, Callable, Sequence

from genevolve_jax.agent import protocol
from genevolve_jax.agent.config import validate
from genevolve_jax.agent.program import finalise_program
from genevolve_jax.agent.system_prompt import build_system_prompt
from genevolve_jax.agent.tools import (TOOL_NAMES, ToolArgumentError, ToolBackendError, Toolbox,
                                       limits_from_config)
from genevolve_jax.agent.trajectory import Segment, Trajectory, Turn
from genevolve_jax.processing.chat import TOKENS, render_messages
from genevolve_jax.rollout.engine import GenerationRequest, GenerationResult, RolloutEngine, SamplingParams


class EngineBatcher:
    """Collects requests from concurrent trajectories into engine batches.

    A batch is sent when ``max_batch`` requests are waiting or ``wait_ms`` after the first one
    arrived. ``max_inflight`` bounds how many batches run at once (1 suits an in-process engine;
    HTTP engines can take several).
    """

    def __init__(self, engine: RolloutEngine, max_batch: int = 32, wait_ms: float = 2.0,
                 max_inflight: int | None = None):
        self.engine = engine
        self.max_batch = max_batch
        self.wait_s = wait_ms / 1000.0
        self._pending: list[tuple[GenerationRequest, asyncio.Future]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._inflight = asyncio.Semaphore(max_inflight) if max_inflight else None
        self._tasks: set[asyncio.Task] = set()
        self.batch_sizes: list[int] = []

    async def submit(self, request: GenerationRequest) -> GenerationResult:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((request, future))
        if len(self._pending) >= self.max_batch:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.wait_s, self._flush)
        return await future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._pending:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch:]
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch) -> None:
        self.batch_sizes.append(len(batch))
        try:
            if self._inflight:
                async with self._inflight:
                    results = await self.engine.agenerate([r for r, _ in batch])
            else:
                results = await self.engine.agenerate([r for r, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"engine returned {len(results)} results for {len(batch)} requests")
        except Exception as exc:  # one failed batch aborts its requests, not the run
            results = [GenerationResult([], [], "abort", error=f"engine error: {type(exc).__name__}: {exc}")
                       for _ in batch]
        for (_, future), result in zip(batch, results):
            if not future.done():
                future.set_result(result)


@dataclasses.dataclass
class _TrajectoryState:
    """One trajectory's working state across rounds."""
    context: list[int]                                           # every token the policy sees next round
    images: list[str] = dataclasses.field(default_factory=list)  # image paths in the context, in order
    shown: set[str] = dataclasses.field(default_factory=set)     # paths shown once (never shown again)
    seen_calls: set[str] = dataclasses.field(default_factory=set)  # tool calls made, to count repeats
    response_len: int = 0                                        # tokens after the prompt
    consecutive_errors: int = 0                                  # format errors since the last good call


class AgentLoop:
    """Runs requests to completion; one instance per (engine, tokenizer, backend, config)."""

    def __init__(self, engine: RolloutEngine, tokenizer, backend, cfg, *, seed: int | None = None,
                 max_inflight_batches: int | None = None):
        self.cfg = validate(cfg)
        self.engine = engine
        self.tokenizer = tokenizer
        self.backend = backend
        self.seed = seed
        self.limits = limits_from_config(cfg.tools)
        self.max_inflight_batches = max_inflight_batches
        self.im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.image_pad = tokenizer.convert_tokens_to_ids(TOKENS.image_pad)
        eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        self.stop_ids = tuple(t for t in (self.im_end, eot) if isinstance(t, int) and t >= 0)
        self._batcher: EngineBatcher | None = None

    # -- token helpers ---------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def prompt_ids(self, request: str, decision_guide: str | None = None) -> list[int]:
        c = self.cfg
        system = build_system_prompt(c.max_tool_calls, c.program.max_references, c.program.min_references,
                                     decision_guide=decision_guide, style=c.get("system_prompt", "full"))
        messages = [{"role": "system", "content": system}, {"role": "user", "content": request}]
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = render_messages(messages)
        return self._encode(text)

    def _observation(self, content: str, images: Sequence[str], after_stop: bool) -> list[int]:
        text = ("" if after_stop else "<|im_end|>") + f"\n<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
        ids = self._encode(text)
        if not images:
            return ids
        counts = iter([self.engine.num_image_tokens(p) for p in images])
        out = []
        for t in ids:
            out.extend([t] * next(counts) if t == self.image_pad else [t])
        return out

    def _sampling(self, max_new: int, traj_id: str, rnd: int) -> SamplingParams:
        s = self.cfg.sampling
        seed = None
        if self.seed is not None:
            seed = int.from_bytes(hashlib.sha256(f"{self.seed}/{traj_id}/{rnd}".encode()).digest()[:4], "little")
        return SamplingParams(max_new_tokens=max_new, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                              stop_token_ids=self.stop_ids, seed=seed)

    # -- one trajectory ----------------------------------------------------------------------------
    async def run(self, request: str, traj_id: str = "traj-0", decision_guide: str | None = None,
                  meta: dict | None = None) -> Trajectory:
        traj = Trajectory(traj_id=traj_id, request=request, meta=dict(meta or {}))
        traj.stats = {"rounds": 0, "tool_calls": 0, "format_errors": 0, "repeated_queries": 0,
                      "repeated_calls": 0, "gen_seconds": 0.0, "tool_seconds": 0.0}
        toolbox = Toolbox(self.backend, self.limits)
        try:
            await self._run(traj, toolbox, decision_guide)
        except Exception as exc:  # a bug or an unexpected input must not take the batch down
            self._end(traj, "error", f"unexpected {type(exc).__name__}: {exc}")
            traj.meta["traceback"] = traceback.format_exc(limit=5)
        traj.images = toolbox.registry.to_list()
        traj.stats["repeated_queries"] = toolbox.repeated_queries
        return traj

    @staticmethod
    def _end(traj: Trajectory, termination: str, mask_reason: str = "") -> None:
        traj.termination = termination
        if mask_reason:
            traj.masked, traj.mask_reason = True, mask_reason

    async def _run(self, traj: Trajectory, toolbox: Toolbox, decision_guide: str | None) -> None:
        c = self.cfg
        batcher = self._batcher or EngineBatcher(self.engine, c.loop.engine_batch_size, c.loop.batch_wait_ms,
                                                 self.max_inflight_batches)
        context = self.prompt_ids(traj.request, decision_guide)
        traj.segments.append(Segment("prompt", list(context)))
        if len(context) > c.prompt_max_tokens:
            return self._end(traj, "too_long", f"prompt has {len(context)} tokens > prompt cap {c.prompt_max_tokens}")
        state = _TrajectoryState(context)
        for rnd in range(1, c.max_rounds + 1):
            await self._round(traj, toolbox, batcher, state, rnd)
            if traj.termination is not None:
                return
        return self._end(traj, "max_rounds")  # unreachable: the last round always ends the trajectory

    async def _round(self, traj: Trajectory, toolbox: Toolbox, batcher: EngineBatcher, state: _TrajectoryState,
                     rnd: int) -> None:
        """One round: sample, parse, act on the turn (a tool call or a format error), show the
        observation. Ends the trajectory (``traj.termination``) when the round decides it."""
        c = self.cfg
        traj.stats["rounds"] = rnd
        sampled = await self._sample(traj, batcher, state, rnd)
        if sampled is None:
            return
        turn, ids = sampled
        parsed = protocol.parse_turn(turn.text, TOOL_NAMES)
        turn.kind, turn.error, turn.detail = parsed.kind, parsed.error, parsed.detail
        turn.tool_name, turn.arguments = parsed.tool_name, parsed.arguments
        if parsed.kind == "answer":
            program = finalise_program(parsed.answer, toolbox.registry.images, c.program.max_references,
                                       c.program.min_references)
            traj.program = program.to_dict()
            return self._end(traj, "answer")
        if parsed.kind == "format_error":
            traj.stats["format_errors"] += 1
        if rnd == c.max_rounds:
            return self._end(traj, "format_error" if parsed.kind == "format_error" else "max_rounds")
        if parsed.kind == "tool_call" and traj.stats["tool_calls"] >= c.max_tool_calls:
            parsed.kind, turn.error, turn.detail = "format_error", "budget_exceeded", str(c.max_tool_calls)
            turn.kind = "format_error"
            traj.stats["format_errors"] += 1
        if parsed.kind == "tool_call":
            acted = await self._call_tool(traj, toolbox, state, turn, parsed)
            if acted is None:
                return
            observation, new_images = acted
        else:
            state.consecutive_errors += 1
            observation, new_images = protocol.format_error_observation(turn.error, turn.detail), []
        if state.consecutive_errors >= c.max_consecutive_format_errors:
            return self._end(traj, "format_error")
        if rnd + 1 == c.max_rounds:
            observation += "\n\n" + protocol.FINAL_STEP_INSTRUCTION
        self._observe(traj, state, turn, observation, new_images, after_stop=bool(ids) and ids[-1] == self.im_end)

    async def _sample(self, traj: Trajectory, batcher: EngineBatcher, state: _TrajectoryState,
                      rnd: int) -> tuple[Turn, list[int]] | None:
        """The policy's turn, appended to the context: (turn, its token ids), or None when the engine
        aborted or the turn was cut off (the trajectory has ended)."""
        c = self.cfg
        max_new = min(c.round_max_tokens, c.response_max_tokens - state.response_len)
        request = GenerationRequest(list(state.context), self._sampling(max_new, traj.traj_id, rnd),
                                    list(state.images), request_id=traj.traj_id)
        t0 = time.perf_counter()
        result = await batcher.submit(request)
        gen_s = time.perf_counter() - t0
        traj.stats["gen_seconds"] += gen_s
        if result.finish_reason == "abort":
            traj.turns.append(Turn(rnd, "", "aborted", "abort", 0, gen_s, error="abort", detail=result.error))
            if result.mask_kind:   # counted under its own reason, not as a plain engine error
                traj.meta["mask_kind"] = result.mask_kind
            self._end(traj, "error", f"engine aborted round {rnd}: {result.error or 'no reason given'}")
            return None
        ids = list(result.token_ids)
        traj.segments.append(Segment("policy", ids, [float(x) for x in result.logprobs]))
        state.context += ids
        state.response_len += len(ids)
        turn = Turn(rnd, self.tokenizer.decode(ids, skip_special_tokens=False), "", result.finish_reason, len(ids),
                    gen_s)
        traj.turns.append(turn)
        if result.finish_reason == "length":
            turn.kind = "cut_off"
            self._end(traj, "too_long", f"round {rnd} cut off at {len(ids)} tokens")
            return None
        return turn, ids

    async def _call_tool(self, traj: Trajectory, toolbox: Toolbox, state: _TrajectoryState, turn: Turn,
                         parsed) -> tuple[str, list[str]] | None:
        """Run the turn's tool call: (observation text, image paths it shows), or None when the
        backend failed (the trajectory has ended). Bad arguments are a format error the policy sees."""
        c = self.cfg
        traj.stats["tool_calls"] += 1
        key = f"{parsed.tool_name}:{sorted(parsed.arguments.items())!r}"
        traj.stats["repeated_calls"] += key in state.seen_calls
        state.seen_calls.add(key)
        new_images: list[str] = []
        t1 = time.perf_counter()
        try:
            tool_result = await toolbox.call(parsed.tool_name, parsed.arguments)
        except ToolArgumentError as exc:  # the tool never ran: not charged to the budget
            traj.stats["tool_calls"] -= 1
            turn.error, turn.detail = "bad_arguments", str(exc)
            observation = protocol.format_error_observation("bad_arguments", str(exc))
            state.consecutive_errors += 1
            traj.stats["format_errors"] += 1
        except ToolBackendError as exc:
            turn.tool_seconds = time.perf_counter() - t1
            traj.stats["tool_seconds"] += turn.tool_seconds
            self._end(traj, "error", f"tool {parsed.tool_name} failed: {exc}")
            return None
        else:
            state.consecutive_errors = 0
            body = tool_result.text
            turn.img_ids = [r.img_id for r in tool_result.images]
            if c.observation_pixels:
                fresh = [r for r in tool_result.images if r.local_path not in state.shown]
                fresh = fresh[: c.max_images_per_observation]
                if fresh:
                    body += "\n" + "\n".join(f"{r.img_id}: {TOKENS.image}" for r in fresh)
                new_images = [r.local_path for r in fresh]
                state.shown.update(new_images)
            observation = protocol.tool_response(body)
        turn.tool_seconds = time.perf_counter() - t1
        traj.stats["tool_seconds"] += turn.tool_seconds
        return observation, new_images

    def _observe(self, traj: Trajectory, state: _TrajectoryState, turn: Turn, observation: str,
                 new_images: list[str], after_stop: bool) -> None:
        """Append the observation turn to the context; end the trajectory if it reaches the response cap."""
        c = self.cfg
        turn.observation = observation
        obs_ids = self._observation(observation, new_images, after_stop=after_stop)
        traj.segments.append(Segment("observation", obs_ids, images=new_images))
        state.images += new_images
        state.context += obs_ids
        state.response_len += len(obs_ids)
        if state.response_len >= c.response_max_tokens:
            self._end(traj, "too_long", f"response reached {state.response_len} tokens "
                                        f">= response cap {c.response_max_tokens}")

    # -- many trajectories -------------------------------------------------------------------------
    def share_engine_batcher(self) -> None:
        """From now on, concurrent :meth:`run` calls share one engine batcher, so a real engine
        sees batches of trajectories rather than one request at a time (:meth:`run_many` does this
        for its own calls; callers that run trajectories concurrently themselves, such as eval,
        call it once)."""
        if self._batcher is None:
            c = self.cfg.loop
            self._batcher = EngineBatcher(self.engine, c.engine_batch_size, c.batch_wait_ms, self.max_inflight_batches)

    async def run_many(self, requests: Sequence[str | tuple[str, str]], progress: bool = False,
                       decision_guides: Sequence[str | None] | None = None,
                       on_finished: Callable[[int, Trajectory], Awaitable[None]] | None = None) -> list[Trajectory]:
        """Run all requests concurrently (bounded by loop.max_concurrent_trajectories); items are a
        request text or (traj_id, request text). Results come back in input order.

        ``on_finished(i, trajectory)`` is awaited as soon as request ``i``'s trajectory ends, after
        its slot is freed (a reward that streams does not hold a trajectory slot); this returns once
        every trajectory and every ``on_finished`` has."""
        c = self.cfg
        self._batcher = EngineBatcher(self.engine, c.loop.engine_batch_size, c.loop.batch_wait_ms,
                                      self.max_inflight_batches)
        limit = asyncio.Semaphore(c.loop.max_concurrent_trajectories)
        items = [(f"traj-{i}", r) if isinstance(r, str) else tuple(r) for i, r in enumerate(requests)]
        guides = list(decision_guides) if decision_guides is not None else [None] * len(items)
        if len(guides) != len(items):
            raise ValueError(f"{len(guides)} decision guides for {len(items)} requests")
        bar = None
        if progress:
            from rich.progress import Progress
            bar = Progress(transient=True)
            task_id = bar.add_task("rollouts", total=len(items))
            bar.start()

        async def one(index, item, guide):
            async with limit:
                traj = await self.run(item[1], item[0], guide)
            if bar is not None:
                bar.advance(task_id)
            if on_finished is not None:
                await on_finished(index, traj)
            return traj

        try:
            return list(await asyncio.gather(*(one(i, it, g) for i, (it, g) in enumerate(zip(items, guides)))))
        finally:
            self._batcher = None
            if bar is not None:
                bar.stop()

    def run_sync(self, requests: Sequence[str | tuple[str, str]], progress: bool = False) -> list[Trajectory]:
        return asyncio.run(self.run_many(requests, progress=progress))
