"""Weight sync to SGLang servers through a shared directory: the export and the per-server versions.

:class:`WeightExport` writes the policy's parameters (an ``nnx.State`` of ``nnx.Param``, or a model)
as an HF Qwen3-VL directory ``<weights_dir>/weights_v<step>``. It is written under a temporary name
and renamed when complete (models.hf_io.atomic_directory), so a server never reads half a
checkpoint. Older versions are deleted once a newer one is complete: a server that failed to reload
keeps its old weights in memory and is asked to load the newest export at the next step, never an
older one.

:class:`WeightVersions` tracks which step's weights each server holds. A reload that fails (HTTP
error, ``success: false``; SGLang then rolls back to the weights it had) leaves that server behind.
Its lag is ``step - the step it holds`` (for a server that never loaded one of ours: the number of
steps since the first push it missed). A server that is behind gets no rollouts while another server
is current, and the run stops with an error naming the server and the steps only when a lag passes
``rl.sglang.max_weight_lag_steps``. On several hosts one process pushes, and every other process
adopts its table (:meth:`WeightVersions.state_dict`, through ``Collective.sync_engine``), so that
no host sends rollouts to a server that is behind.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
from typing import Mapping, Sequence

_VERSION_DIR = re.compile(r"(weights|adapter)_v(\d+)")


class WeightLagError(RuntimeError):
    """A server stayed behind the trainer's weights for more steps than allowed."""


class WeightExport:
    """HF exports of the policy under ``weights_dir`` (which belongs to the trainer: its
    ``weights_v*`` directories are deleted when superseded)."""

    def __init__(self, weights_dir: str, model_config, *, dtype: str = "bfloat16"):
        self.weights_dir = os.path.abspath(weights_dir)
        self.model_config = model_config
        self.dtype = dtype

    def path(self, step: int) -> str:
        return os.path.join(self.weights_dir, f"weights_v{int(step)}")

    def adapter_path(self, step: int) -> str:
        """Where the trainer writes the LoRA adapter (PEFT folder) of ``step``."""
        return os.path.join(self.weights_dir, f"adapter_v{int(step)}")

    def export(self, params, step: int) -> str:
        """Write ``params`` (nnx.State of nnx.Param, or an nnx model) for ``step``; returns the path."""
        from genevolve_jax.models.hf_io import atomic_directory, save_pretrained
        if self.model_config is None:
            raise ValueError("SGLangEngine was built without model_config, so it cannot export weights; "
                             "pass SGLangEngine.from_config(..., model_config=<the policy's Qwen3VLConfig>)")
        final = self.path(step)
        with atomic_directory(final) as tmp:
            save_pretrained(params, tmp, dtype=self.dtype, config=self.model_config)
        return final

    def prune(self, keep: str) -> None:
        """Delete every other ``weights_v*`` / ``adapter_v*`` directory (and leftovers of interrupted
        exports): a server holds what it loaded, so only the newest folder can still be read."""
        if not os.path.isdir(self.weights_dir):
            return
        keep = os.path.abspath(keep)
        for name in os.listdir(self.weights_dir):
            full = os.path.join(self.weights_dir, name)
            stem = name.split(".", 1)[0]
            if full != keep and os.path.isdir(full) and _VERSION_DIR.fullmatch(stem):
                shutil.rmtree(full, ignore_errors=True)


@dataclasses.dataclass
class ServerVersion:
    held: int | None = None         # the step whose weights the server holds; None: not one of ours
    missed_since: int | None = None  # first step it failed to load, while behind
    last_error: str = ""


class WeightVersions:
    """Which step's weights each server holds, and whether the run may go on."""

    def __init__(self, urls: Sequence[str], max_lag_steps: int):
        self.max_lag_steps = int(max_lag_steps)
        self.servers = {u: ServerVersion() for u in urls}
        self.latest: int | None = None

    def lag(self, url: str) -> int:
        """Steps ``url`` is behind the latest push (0 when current or before any push)."""
        s = self.servers[url]
        if self.latest is None or s.missed_since is None:
            return 0
        if s.held is not None:
            return self.latest - s.held
        return self.latest - s.missed_since + 1

    def behind(self) -> list[str]:
        return [u for u in self.servers if self.lag(u) > 0]

    def record(self, step: int, outcomes: Mapping[str, str]) -> dict[str, float]:
        """Note the reload outcome of ``step`` per server (``""`` = loaded, else the error) and return
        the lag metrics. Raises WeightLagError when a server is now too far behind."""
        self.latest = int(step)
        for url, error in outcomes.items():
            s = self.servers[url]
            if error:
                s.last_error = error
                if s.missed_since is None:
                    s.missed_since = self.latest
            else:
                s.held, s.missed_since, s.last_error = self.latest, None, ""
        lags = {u: self.lag(u) for u in self.servers}
        too_far = {u: n for u, n in lags.items() if n > self.max_lag_steps}
        if too_far:
            lines = []
            for url, n in too_far.items():
                s = self.servers[url]
                held = f"step {s.held}'s weights" if s.held is not None else "none of the trainer's weights"
                lines.append(f"{url} holds {held}; its reloads failed at every step from {s.missed_since} to "
                             f"{self.latest} ({n} steps behind); last error: {s.last_error}")
            raise WeightLagError(f"rl.sglang.max_weight_lag_steps = {self.max_lag_steps} exceeded: "
                                 + "; ".join(lines) + ". Fix or restart that server (or remove it from "
                                 "rl.sglang.urls) and resume from the last checkpoint.")
        return {"sglang/weight_version_lag": float(max(lags.values(), default=0)),
                "sglang/servers_behind": float(sum(1 for n in lags.values() if n > 0))}

    def state_dict(self) -> dict:
        """The table, picklable: what process 0 hands every other process after a push."""
        return {"latest": self.latest, "servers": {u: dataclasses.asdict(s) for u, s in self.servers.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        """Adopt another process's table (its push reached the servers that this process sends to).
        Refuses a table of other servers: every process must list the same ``rl.sglang.urls``."""
        servers = dict(state["servers"])
        if set(servers) != set(self.servers):
            raise ValueError(f"rl.sglang.urls: process 0 pushes to {sorted(servers)}, this process sends rollouts to "
                             f"{sorted(self.servers)}; every process must list the same servers")
        self.latest = state["latest"]
        self.servers = {u: ServerVersion(**servers[u]) for u in self.servers}

    def freshest(self, urls: Sequence[str]) -> list[str]:
        """The servers of ``urls`` with the smallest lag (all current ones when there are any)."""
        if not urls:
            return []
        best = min(self.lag(u) for u in urls)
        return [u for u in urls if self.lag(u) == best]
