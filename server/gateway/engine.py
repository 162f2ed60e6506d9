"""The engine interface the gateway talks to, and its vLLM implementation (one AsyncLLM per process).

The HTTP layer sees only the plain types below (`SamplingOptions` in, `EngineStep` out), so it never imports
vLLM and an HTTP unit test can substitute a fake engine (tests/fake_engine.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from server.gateway.startup import STATUS_ENV, Startup, is_local, watch_engine
from server.settings import Settings

log = logging.getLogger("dsv2.engine")

# Default context length when neither the flag nor vLLM engine args set one: DeepSeek-V2's config says 163840,
# which a KV cache on one device rarely holds, and vLLM then refuses to start.
DEFAULT_MAX_MODEL_LEN_CAP = 32768


class EngineError(Exception):
    """The engine failed a request (not the client's fault)."""


class EngineDead(EngineError):
    """The engine process is gone; nothing more can be served."""


class EngineFailed(EngineError):
    """The engine ended a request with finish_reason "error" (vLLM: a retryable request-level failure)."""


class RequestAborted(Exception):
    """The engine aborted the request before it finished (the drain timeout did it)."""


class EngineRejected(Exception):
    """The engine refused the request as invalid (a client error); the message names the value."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class SamplingOptions:
    """Everything a request asks of the sampler, in engine-neutral form."""

    max_tokens: int
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None  # top-k alternatives per sampled token; 0 = only the sampled token
    prompt_logprobs: int | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    # Guided decoding, as an xgrammar structural tag: response_format JSON and tool calls alike (protocol.py).
    structural_tag: str | None = None
    stream: bool = True  # False: the engine may send only the final output
    # Request-level, beside the sampler: scheduling priority (lower runs first; needs the engine's priority
    # policy) and the prefix-cache salt (requests share cached KV blocks only with the same salt).
    priority: int = 0
    cache_salt: str | None = None
    adapter: str | None = None  # a --lora-modules name: the request runs with that LoRA adapter


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]]  # (token, logprob), most likely first


@dataclass
class ChoiceDelta:
    """What one choice produced since the last step."""

    index: int
    text: str
    num_tokens: int
    logprobs: list[TokenLogprob] | None = None
    # "stop" | "length" | "repetition" once finished ("abort" and "error" are raised instead)
    finish_reason: str | None = None
    stop_sequence: str | None = None  # the stop string that ended the choice, if one did


@dataclass
class EngineStep:
    prompt_tokens: int
    choices: list[ChoiceDelta]
    finished: bool
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # Wall clock of the first generated token, on the first step (the only one of a non-streamed request).
    first_token_time: float | None = None
    cached_tokens: int | None = None  # prompt tokens found in the prefix cache (first step only)
    timings: EngineTimings | None = None  # on the last step, when the engine keeps request stats
    prompt: int = 0  # which of a request's prompts this step is of (generate_many sets it)


@dataclass
class EngineTimings:
    """Wall-clock seconds of a request's life in the engine: queued, first scheduled, first and last token."""

    queued: float
    scheduled: float
    first_token: float
    last_token: float


@dataclass
class EngineProgress:
    """When the engine last made a step, last completed a request, and last went from no unfinished requests to
    some (time.monotonic(); 0 = never)."""

    last_step: float = 0.0
    last_success: float = 0.0
    busy_since: float = 0.0


class Engine(Protocol):
    """What the gateway needs from an engine."""

    max_model_len: int
    progress: EngineProgress
    priority_scheduling: bool  # the engine orders its queue by request priority
    # The LoRA adapters requests may name (name -> path): the one holder of that state, which everything else
    # reads; changed only by load_adapter and unload_adapter.
    adapters: dict[str, str]

    def use_download(self, path: str) -> None:
        """--model was a repo id, downloaded to `path`: load that."""

    async def start(self, startup: Startup | None = None) -> None:
        """Start; report the phases it goes through to `startup` where it can."""

    def generate(
        self, prompt_token_ids: list[int], options: SamplingOptions, request_id: str
    ) -> AsyncIterator[EngineStep]: ...

    async def abort(self, request_id: str) -> None: ...

    async def load_adapter(self, name: str, path: str) -> None:
        """Load a LoRA adapter for requests whose options name it, and list it in `adapters`; EngineRejected if
        it does not load."""
        ...

    async def unload_adapter(self, name: str) -> None:
        """New requests may no longer name the adapter (requests running with it finish)."""
        ...

    async def check_health(self) -> None:
        """Raise EngineDead if the engine cannot serve."""
        ...

    @property
    def is_dead(self) -> bool: ...

    @property
    def pending_requests(self) -> int:
        """Requests the engine was given and has not finished: its own count, which does not wait for anyone to
        read their outputs (the proof of a stall behind /health and /ready; never a client's socket)."""
        ...

    async def shutdown(self) -> None: ...


def default_max_model_len(model: str, trust_remote_code: bool) -> int | None:
    """The model's own context length capped at DEFAULT_MAX_MODEL_LEN_CAP, or None if the config is unreadable."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except Exception as exc:  # let vLLM report a bad model path with its own message
        log.warning("could not read %s's config to pick a context length: %s", model, exc)
        return None
    own = getattr(config, "max_position_embeddings", None)
    if not isinstance(own, int):
        return None
    return min(own, DEFAULT_MAX_MODEL_LEN_CAP)


def build_engine_args(settings: Settings):
    """Settings + pass-through vLLM flags -> AsyncEngineArgs. Our flags win over the same pass-through flag."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser(prog="vllm engine args"))
    ns = parser.parse_args(["--model", settings.model, *settings.engine_args])
    args = AsyncEngineArgs.from_cli_args(ns)

    args.served_model_name = [settings.model_name]
    if settings.tokenizer:
        args.tokenizer = settings.tokenizer
    args.tensor_parallel_size = settings.tensor_parallel_size
    args.pipeline_parallel_size = settings.pipeline_parallel_size
    args.dtype = settings.dtype
    if settings.quantization:
        args.quantization = settings.quantization
    args.gpu_memory_utilization = settings.gpu_memory_utilization
    args.seed = settings.seed
    args.stream_interval = settings.stream_interval
    args.trust_remote_code = settings.trust_remote_code or args.trust_remote_code
    if settings.max_model_len is not None:
        args.max_model_len = settings.max_model_len
    elif args.max_model_len is None and is_local(settings.model):  # a repo's config is read once downloaded
        args.max_model_len = default_max_model_len(settings.model, args.trust_remote_code)
    # The MLA attention backend is vLLM's pick (or the pass-through flag); on CPU the model plugin's config
    # hook steers fp16/fp32 away from AMX_MLA, for this gateway and plain vLLM alike.
    args.kv_cache_memory_bytes = _kv_cache_bytes(settings, args)
    if settings.adapters or settings.allow_runtime_lora_updating:
        args.enable_lora = True
        need = _lora_rank_for(settings.adapters)
        if not _given(settings.engine_args, "--max-lora-rank"):
            args.max_lora_rank = max(args.max_lora_rank, need)
        elif args.max_lora_rank < need:
            raise ValueError(
                f"--max-lora-rank {args.max_lora_rank} is below the rank of a --lora-modules adapter; "
                f"give {need} or more, or leave it out to have it set from the adapters"
            )
    return args


def _given(engine_args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in engine_args)


def _lora_rank_for(adapters: dict[str, str]) -> int:
    """The smallest rank vLLM allows (--max-lora-rank's choices) that fits every local adapter's `r`."""
    from typing import get_args

    from vllm.config.lora import MaxLoRARanks

    ranks = [
        json.loads(cfg.read_text()).get("r", 0)
        for path in adapters.values()
        if (cfg := Path(path).expanduser() / "adapter_config.json").is_file()
    ]
    need = max(ranks, default=0)
    return next((r for r in sorted(get_args(MaxLoRARanks)) if r >= need), need)


# On CPU, vLLM reads --gpu-memory-utilization as the share of host memory that must be *free* at startup
# (0.9 by default), which fails on any machine already running something else; a fixed KV cache size skips
# that check. On GPUs the cache is sized from --gpu-memory-utilization unless a size is given.
CPU_DEFAULT_KV_CACHE_GIB = 4.0


def _kv_cache_bytes(settings: Settings, args: Any) -> int | None:
    from vllm.platforms import current_platform

    if settings.kv_cache_space_gib is not None:
        return int(settings.kv_cache_space_gib * 2**30)
    if args.kv_cache_memory_bytes is not None or not current_platform.is_cpu():
        return args.kv_cache_memory_bytes
    if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return None  # vLLM's own variable, honoured by vLLM
    return int(CPU_DEFAULT_KV_CACHE_GIB * 2**30)


class VLLMEngine:
    """One vLLM AsyncLLM; its engine core runs in its own process (unless VLLM_ENABLE_V1_MULTIPROCESSING=0).
    With `client` (one of several gateway processes, server.gateway.processes), a client of an engine core that
    the parent process started: vLLM's client addresses, count and index for this process."""

    def __init__(self, settings: Settings, client: dict[str, Any] | None = None) -> None:
        self.settings = settings
        self.client = client
        self.max_model_len = 0
        self.progress = EngineProgress()
        self.priority_scheduling = False
        self._llm = None
        # Parsed now, so that a bad pass-through flag fails before the server starts.
        self.args = build_engine_args(settings)
        self.adapters: dict[str, str] = {}
        self._lora_requests: dict[str, Any] = {}  # name -> vLLM LoRARequest, for each name in `adapters`
        self._lora_ids = 0  # vLLM's LoRA ids start at 1 and are never reused

    def use_download(self, path: str) -> None:
        """Load the downloaded `path`; the names clients use stay the repo's."""
        self.args.model = path
        if self.args.max_model_len is None:
            self.args.max_model_len = default_max_model_len(path, self.args.trust_remote_code)

    async def start(self, startup: Startup | None = None) -> None:
        """Build the AsyncLLM in a thread of its own, so that the server answers probes (503, with the phase)
        while vLLM loads, profiles, compiles and captures. A daemon thread: a stop during start-up exits without
        waiting for it (the engine-core processes are daemons too). vLLM's processes report their phases through
        the file named by DSV2_STARTUP_STATUS (server.gateway.startup)."""
        args = self.args
        log.info(
            "starting vLLM engine: model=%s dtype=%s max_model_len=%s tp=%d",
            args.model,
            args.dtype,
            args.max_model_len,
            args.tensor_parallel_size,
        )
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        built: asyncio.Future = loop.create_future()
        own = self.client is None  # a client's engine core was started by the parent, with the parent's file
        if own:
            fd, status = tempfile.mkstemp(prefix="dsv2-startup-")
            os.close(fd)
            os.environ[STATUS_ENV] = status  # inherited by the engine-core and worker processes
        else:
            status = os.environ.get(STATUS_ENV, os.devnull)
        watch = loop.create_task(watch_engine(startup, Path(status))) if startup is not None else None
        threading.Thread(target=self._build, args=(loop, built), name="engine-start", daemon=True).start()
        try:
            self._llm = await built
        finally:
            if watch is not None:
                watch.cancel()
            if own:
                os.environ.pop(STATUS_ENV, None)
                Path(status).unlink(missing_ok=True)
        self.max_model_len = self._llm.model_config.max_model_len
        self.priority_scheduling = self._llm.vllm_config.scheduler_config.policy == "priority"
        # vLLM's output processor reads an environment variable per token (VLLM_COMPUTE_NANS_IN_LOGITS, ~3 us
        # here); its engine core and workers cache them once started, and so does this process, as vLLM does
        # with an in-process engine core.
        import vllm.envs

        vllm.envs.enable_envs_cache()
        # What start-up built (vLLM, torch, the tokenizer: most of the heap) is kept for the process's life: the
        # garbage collector stops scanning it (vLLM's own server freezes it likewise once its engine is built), so
        # a full collection goes through what serving allocated only, instead of pausing every stream for a few
        # hundred ms to go through the whole heap. Every gateway process freezes its own heap here.
        from vllm.utils.gc_utils import freeze_gc_heap

        freeze_gc_heap()
        log.info("engine ready in %.1f s (max_model_len=%d)", time.monotonic() - started, self.max_model_len)

    def _build(self, loop: asyncio.AbstractEventLoop, built: asyncio.Future) -> None:
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        def settle(llm: Any = None, exc: BaseException | None = None) -> None:
            if built.done():  # the server stopped during start-up
                if llm is not None:
                    llm.shutdown()
            elif exc is not None:
                built.set_exception(exc)
            else:
                built.set_result(llm)

        llm, error = None, None
        try:
            stat_loggers = [_progress_logger_factory(self.progress)]
            if self.client is None:
                llm = AsyncLLM.from_engine_args(
                    self.args, usage_context=UsageContext.OPENAI_API_SERVER, stat_loggers=stat_loggers
                )
            else:  # as vLLM's own API server processes connect (its build_async_engine_client)
                client = dict(self.client)
                count, index = client.pop("client_count"), client.pop("client_index")
                self.args._api_process_count, self.args._api_process_rank = count, index
                llm = AsyncLLM.from_vllm_config(
                    self.args.create_engine_config(UsageContext.OPENAI_API_SERVER),
                    usage_context=UsageContext.OPENAI_API_SERVER,
                    stat_loggers=stat_loggers,
                    enable_log_requests=self.args.enable_log_requests,
                    disable_log_stats=self.args.disable_log_stats,
                    client_addresses=client,
                    client_count=count,
                    client_index=index,
                )
        except BaseException as exc:
            error = exc
        try:
            loop.call_soon_threadsafe(settle, llm, error)
        except RuntimeError:  # the loop is gone: the server stopped during start-up
            if llm is not None:
                llm.shutdown()

    async def load_adapter(self, name: str, path: str) -> None:
        """Load an adapter into the engine under a new id (vLLM's ids are never reused)."""
        from vllm.lora.request import LoRARequest

        if self._llm is None or self._llm.errored:
            raise EngineDead("engine is not running")
        self._lora_ids += 1
        request = LoRARequest(
            name, self._lora_ids, os.path.expanduser(path), base_model_name=self.settings.model_name
        )
        try:
            await self._llm.add_lora(request)
        except Exception as exc:
            raise EngineRejected(f"LoRA adapter {name!r} ({path}) did not load: {exc}", "lora_path") from exc
        self._lora_requests[name] = request
        self.adapters[name] = path
        log.info("LoRA adapter %r loaded from %s", name, path)

    async def unload_adapter(self, name: str) -> None:
        # Only forgotten here, as vLLM's own server does: the engine evicts it from its LoRA slots when it
        # needs them, and requests running with it finish.
        self.adapters.pop(name, None)
        self._lora_requests.pop(name, None)
        log.info("LoRA adapter %r unloaded", name)

    @property
    def is_dead(self) -> bool:
        return self._llm is None or self._llm.errored

    @property
    def pending_requests(self) -> int:
        # vLLM's output processor drops a request when the engine core finishes it, read or not.
        return 0 if self._llm is None else self._llm.get_num_unfinished_requests()

    async def check_health(self) -> None:
        if self._llm is None:
            raise EngineDead("engine not started")
        try:
            await self._llm.check_health()
        except Exception as exc:
            raise EngineDead(str(exc) or type(exc).__name__) from exc

    async def abort(self, request_id: str) -> None:
        if self._llm is not None and not self._llm.errored:
            await self._llm.abort(request_id)

    async def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None

    async def generate(
        self, prompt_token_ids: list[int], options: SamplingOptions, request_id: str
    ) -> AsyncIterator[EngineStep]:
        from vllm.exceptions import VLLMValidationError
        from vllm.inputs.engine import tokens_input
        from vllm.v1.engine.exceptions import EngineDeadError

        llm = self._llm
        if llm is None or llm.errored:
            raise EngineDead("engine is not running")
        lora = self._lora_requests.get(options.adapter) if options.adapter else None
        if options.adapter and lora is None:  # unloaded since the request was admitted
            raise EngineRejected(f"the LoRA adapter {options.adapter!r} was unloaded", "model")
        progress = self.progress
        if not llm.get_num_unfinished_requests():
            progress.busy_since = time.monotonic()
        first = True
        # Only vLLM's own calls are inside the try: its refusal of the request (the sampling parameters, or the
        # request when it is added, before any output) is the client's 400; a failure of ours converting its
        # output is not, and goes up as what it is.
        try:
            params = _sampling_params(options)
            outputs = llm.generate(
                tokens_input(prompt_token_ids, cache_salt=options.cache_salt),
                params,
                request_id,
                lora_request=lora,
                priority=options.priority,
            )
        except (ValueError, VLLMValidationError) as exc:
            raise _rejected(exc) from exc
        while True:
            try:
                out = await anext(outputs)
            except StopAsyncIteration:
                return
            except EngineDeadError as exc:
                raise EngineDead(str(exc)) from exc
            except (ValueError, VLLMValidationError) as exc:
                if not first:
                    raise EngineFailed(f"request {request_id}: {exc}") from exc
                raise _rejected(exc) from exc
            now = time.monotonic()
            progress.last_step = now
            step = engine_step(out, prompt_token_ids, options, first)
            first = False
            if step.finished:
                progress.last_success = now
            yield step


def _rejected(exc: Exception) -> EngineRejected:
    param = getattr(exc, "parameter", None)
    if param is None and str(exc).startswith("n must be"):
        param = "n"
    return EngineRejected(str(exc), param)


def engine_step(out: Any, prompt_token_ids: list[int], options: SamplingOptions, first: bool) -> EngineStep:
    """One vLLM RequestOutput (a delta, or the whole output when not streaming) -> EngineStep; a pure function
    of its arguments. `first`: the request's first output, the one that carries the prompt's logprobs, its
    prefix-cache hits and its first token's time. A choice that finished with vLLM's "error" raises EngineFailed,
    "abort" RequestAborted."""
    # The per-token path: positional arguments, and the stats read only on the steps that carry them.
    choices = []
    top = options.logprobs
    for c in out.outputs:
        reason, stop = c.finish_reason, c.stop_reason
        if reason == "error":
            raise EngineFailed(f"request {out.request_id}: choice {c.index} finished with an error")
        if reason == "abort":
            raise RequestAborted(out.request_id)
        logprobs = None if top is None else _token_logprobs(c.token_ids, c.logprobs, top)
        choices.append(
            ChoiceDelta(
                c.index, c.text, len(c.token_ids), logprobs, reason, stop if isinstance(stop, str) else None
            )
        )
    prompt_logprobs = None
    if first and options.prompt_logprobs is not None and out.prompt_logprobs is not None:
        prompt_logprobs = [None] + _token_logprobs(
            prompt_token_ids[1:], out.prompt_logprobs[1:], options.prompt_logprobs
        )
    finished = out.finished
    return EngineStep(
        len(prompt_token_ids),
        choices,
        finished,
        prompt_logprobs,
        _first_token_time(out) if first else None,
        (out.num_cached_tokens or 0) if first else None,
        _timings(out) if finished else None,
    )


def _first_token_time(out: Any) -> float | None:
    """Wall clock of the request's first token from vLLM's request stats (present unless stats are off)."""
    stats = getattr(out, "metrics", None)
    latency = getattr(stats, "first_token_latency", 0.0)
    arrival = getattr(stats, "arrival_time", 0.0)
    return arrival + latency if latency and arrival else None


def _timings(out: Any) -> EngineTimings | None:
    """vLLM's request stats as wall clock: the engine core stamps them with time.monotonic() in another process
    on this host, the same clock as ours, so they convert with one offset."""
    stats = getattr(out, "metrics", None)
    if stats is None or not getattr(stats, "queued_ts", 0.0) or not getattr(stats, "last_token_ts", 0.0):
        return None
    offset = time.time() - time.monotonic()
    return EngineTimings(
        stats.queued_ts + offset,
        (stats.scheduled_ts or stats.queued_ts) + offset,
        (stats.first_token_ts or stats.last_token_ts) + offset,
        stats.last_token_ts + offset,
    )


def _progress_logger_factory(progress: EngineProgress):
    """A vLLM stat logger that stamps every engine step: the proof of progress behind /health and /ready.

    vLLM calls record() once per engine-core output batch, prefill-only steps and final-only requests included,
    which the gateway's own view of token deliveries would miss.
    """
    from vllm.v1.metrics.loggers import StatLoggerBase

    class ProgressLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any = None, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
            progress.last_step = time.monotonic()

        def log_engine_initialized(self) -> None:
            pass

    return lambda vllm_config, engine_index=0: ProgressLogger(vllm_config, engine_index)


def generate_many(
    engine: Engine,
    prompts: Sequence[list[int]],
    options: Sequence[SamplingOptions],
    request_ids: Sequence[str],
) -> AsyncIterator[EngineStep]:
    """A request's prompts' generations, interleaved, each step marked with its prompt's index (`prompt`); the
    first failure ends them all. One prompt is the engine's own generator (no layer on the per-token path)."""
    if len(prompts) == 1:
        return engine.generate(prompts[0], options[0], request_ids[0])
    return _interleaved(engine, prompts, options, request_ids)


async def _interleaved(
    engine: Engine,
    prompts: Sequence[list[int]],
    options: Sequence[SamplingOptions],
    request_ids: Sequence[str],
) -> AsyncIterator[EngineStep]:
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(i: int) -> None:
        try:
            async for step in engine.generate(prompts[i], options[i], request_ids[i]):
                queue.put_nowait((i, step))
            queue.put_nowait((i, end))
        except Exception as exc:
            queue.put_nowait((i, exc))

    tasks = [asyncio.ensure_future(pump(i)) for i in range(len(prompts))]
    remaining = len(prompts)
    try:
        while remaining:
            i, item = await queue.get()
            if item is end:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                item.prompt = i
                yield item
    finally:
        for t in tasks:
            t.cancel()


def _sampling_params(o: SamplingOptions):
    from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

    structured = None
    if o.structural_tag is not None:
        structured = StructuredOutputsParams(structural_tag=o.structural_tag)
    return SamplingParams(
        n=o.n,
        presence_penalty=o.presence_penalty,
        frequency_penalty=o.frequency_penalty,
        repetition_penalty=o.repetition_penalty,
        temperature=o.temperature,
        top_p=o.top_p,
        top_k=o.top_k,
        min_p=o.min_p,
        seed=o.seed,
        stop=o.stop or None,
        ignore_eos=o.ignore_eos,
        max_tokens=o.max_tokens,
        min_tokens=o.min_tokens,
        logprobs=o.logprobs,
        prompt_logprobs=o.prompt_logprobs,
        logit_bias=o.logit_bias,
        structured_outputs=structured,
        output_kind=RequestOutputKind.DELTA if o.stream else RequestOutputKind.FINAL_ONLY,
    )


def _token_logprobs(token_ids, logprobs, top_k: int | None) -> list[TokenLogprob]:
    """vLLM's per-position {token_id: Logprob} dicts -> TokenLogprob, the chosen token first."""
    result: list[TokenLogprob] = []
    if not logprobs:
        return result
    k = top_k or 0
    for token_id, position in zip(token_ids, logprobs, strict=False):
        if position is None:
            result.append(TokenLogprob("", 0.0, []))
            continue
        chosen = position.get(token_id)
        ranked = sorted(position.values(), key=lambda lp: lp.rank if lp.rank is not None else math.inf)
        result.append(
            TokenLogprob(
                token=(chosen.decoded_token or "") if chosen is not None else "",
                logprob=_finite(chosen.logprob) if chosen is not None else -9999.0,
                top=[(lp.decoded_token or "", _finite(lp.logprob)) for lp in ranked[:k]],
            )
        )
    return result


def _finite(x: float) -> float:
    # JSON has no -inf; OpenAI and vLLM report impossible tokens as -9999.
    return max(x, -9999.0) if math.isfinite(x) or x < 0 else 0.0
