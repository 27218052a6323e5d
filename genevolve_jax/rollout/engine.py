"""The rollout-engine interface.

An engine takes a batch of multimodal prompts (token ids with vision placeholders already expanded,
plus the images in placeholder order) with per-prompt sampling parameters, and returns per prompt
the generated token ids, the sampler's log-prob of each of them and a finish reason:

- ``"stop"``: a stop token (included as the last generated id) or a stop string ended the turn;
- ``"length"``: ``max_new_tokens`` was reached;
- ``"abort"``: the engine gave up on this prompt (server error, shutdown); ``error`` says why.

JaxEngine (in-process, KV cache) and SGLangEngine (HTTP) implement this; the agent loop only sees
this interface.
"""
from __future__ import annotations

import abc
import asyncio
import dataclasses
import math
from typing import Any, Sequence

FINISH_REASONS = ("stop", "length", "abort")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 4096
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = -1  # -1: off
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"SamplingParams.temperature must be a finite number >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
        if not (self.top_k == -1 or (isinstance(self.top_k, int) and self.top_k > 0)):
            raise ValueError(f"SamplingParams.top_k must be -1 or a positive integer, got {self.top_k!r}")

    def to_sglang(self) -> dict:
        """The ``sampling_params`` object of SGLang's native /generate."""
        out = {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
               "top_k": self.top_k, "stop": list(self.stop), "stop_token_ids": list(self.stop_token_ids)}
        if self.seed is not None:
            out["sampling_seed"] = self.seed
        return out


@dataclasses.dataclass
class GenerationRequest:
    """One prompt. ``images`` are PIL images or file paths, one per image placeholder group, in order."""
    prompt_ids: list[int]
    sampling: SamplingParams = SamplingParams()
    images: list[Any] = dataclasses.field(default_factory=list)
    request_id: str = ""


@dataclasses.dataclass
class GenerationResult:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    error: str = ""
    # For an abort that must mask its trajectory under a reason of its own (counted in the
    # trainer's ``masked/<kind>``), e.g. "image_token_mismatch_server"; empty: a plain error.
    mask_kind: str = ""

    def __post_init__(self):
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {self.finish_reason!r}")
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(f"{len(self.token_ids)} token ids but {len(self.logprobs)} logprobs")


class RolloutEngine(abc.ABC):
    """Batch of prompts -> per prompt generated ids, per-token logprobs, finish reason."""

    # The processing.image.ImageProcessorConfig that fixed how many placeholders each image got in
    # this engine's prompts (the trainer must expand images alike); None: the default processor,
    # which is also Qwen3-VL's in SGLang.
    image_processor = None

    @abc.abstractmethod
    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Sample every request (one result per request, same order). Blocking."""

    @abc.abstractmethod
    def update_weights(self, params, step: int) -> dict[str, float]:
        """Sample with ``params`` from now on.

        ``params`` is the policy's ``nnx.State`` of ``nnx.Param`` (the trainer's current weights, on
        this host's devices, in any layout; a fresh copy the engine may keep). ``step`` is the
        optimiser step they come from, the weight version. Returns metrics of the sync (seconds,
        lag) to log with the step; an empty dict when there is nothing to report."""

    @property
    def weight_shardings(self):
        """The shardings (a tree matching the policy's ``nnx.Param`` state, on this host's devices)
        in which :meth:`update_weights` wants its params, so that the trainer reshards straight into
        them; None: any layout (the engine copies or exports them itself)."""
        return None

    @property
    def weight_dtype(self):
        """The dtype in which the engine holds floating-point weights, so that the trainer sends
        them in it (half the bytes in bf16, and no float32 copy on the engine's devices); None: as
        the trainer holds them."""
        return None

    @property
    def serves_every_host(self) -> bool:
        """True when one engine object stands for servers that every host's rollouts share (SGLang
        URLs listing every host's servers): then one process pushes weights for all. False for an
        engine on this host's own devices, which every process updates for itself."""
        return False

    def weight_sync_state(self) -> Any:
        """What :meth:`update_weights` learnt that every process must know, for an engine that
        :attr:`serves_every_host` (one process pushes; the others adopt this): picklable. None: nothing."""
        return None

    def adopt_weight_sync_state(self, state: Any) -> None:
        """Take another process's :meth:`weight_sync_state` as this engine's own (after its push)."""

    @property
    def weight_export(self):
        """Where this engine reads new weights from disk (a rollout.sglang_weights.WeightExport:
        directory per step, dtype, model config): the trainer writes the HF export there, every
        process its share (Collective.export_hf), and calls :meth:`reload_weights`. None: the
        engine takes them in memory through :meth:`update_weights`."""
        return None

    def reload_weights(self, path: str, step: int) -> dict[str, float]:
        """Load the HF export at ``path`` (written to :attr:`weight_export`) as the weights of
        ``step``; metrics as :meth:`update_weights`. Only engines with a :attr:`weight_export`."""
        # Not a stub: an engine without a weight_export has no files to reload, and the trainer only
        # calls this where weight_export is set; a caller that gets here has the wrong route.
        raise TypeError(f"{type(self).__name__} has no weight_export: it takes its weights in memory "
                        "(update_weights), not from an HF export on disk")

    @property
    def adapter_sync(self) -> bool:
        """True when the engine takes LoRA adapters on top of a base it already holds
        (:meth:`load_adapter`), so that a LoRA trainer sends adapters, not whole models."""
        return False

    def check_adapters(self, lora) -> None:
        """Raise before the first sync when the engine could not load adapters of ``lora`` (a
        config.LoRAConfig); engines that check nothing (those without :attr:`adapter_sync`) pass."""

    def load_adapter(self, path: str, step: int) -> dict[str, float]:
        """Sample with the PEFT adapter folder at ``path`` (on the base the engine holds) as the
        weights of ``step``; metrics as :meth:`update_weights`. Only engines with :attr:`adapter_sync`."""
        raise TypeError(f"{type(self).__name__} takes no LoRA adapters: the trainer sends it merged weights")

    def release_weights(self) -> None:
        """Drop the weights in use before a sync brings new ones (between rollout phases), so that
        the devices never hold two copies; the engine samples again after :meth:`update_weights`.
        Default: nothing (an engine that exports, or keeps nothing on the devices)."""

    async def agenerate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Async form for the agent loop; runs :meth:`generate` in a worker thread by default so that
        tool calls of other trajectories proceed meanwhile. HTTP engines override it."""
        return await asyncio.to_thread(self.generate, list(requests))

    def num_image_tokens(self, image) -> int:
        """How many image-pad tokens one image expands to (Qwen3-VL's processor by default)."""
        from genevolve_jax.processing.chat import merged_tokens
        from genevolve_jax.processing.image import image_grid
        width, height = image_size(image)
        return merged_tokens(image_grid(height, width))

    def close(self) -> None:
        """Release resources (threads, connections). Safe to call twice."""


def image_size(image) -> tuple[int, int]:
    if isinstance(image, str):
        from PIL import Image
        with Image.open(image) as img:
            return img.size
    return image.size
