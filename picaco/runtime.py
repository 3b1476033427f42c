"""Builds the live objects a run needs from a `RunConfig`: backends, role clients, judges.

One `Runtime` per process run: it owns the call cache, the accounting and the budget that every role
shares, and it loads each embedded model file once even when several roles use it.
"""

from __future__ import annotations

import os
from pathlib import Path

from picaco.config import JudgeConfig, RoleConfig, RunConfig
from picaco.errors import ConfigError
from picaco.llm.accounting import Accounting, Budget
from picaco.llm.base import Backend
from picaco.llm.cache import CallCache
from picaco.llm.client import LLMClient

#: roles whose requests get the config's `system_template` and `prior_turns`: the target, and the
#: proxy that scores likelihoods in its place; the optimizer and the judges see plain prompts
TEMPLATED_ROLES = ("target", "proxy")


def make_backend(cfg: RoleConfig) -> Backend:
    if cfg.backend == "embedded":
        from picaco.llm.embedded import EmbeddedBackend

        return EmbeddedBackend(cfg.model, n_ctx=cfg.n_ctx, parallel_responses=cfg.parallel_responses)
    if cfg.backend == "openai":
        connection = dict(
            model=cfg.model,
            max_in_flight=cfg.max_in_flight,
            timeout=cfg.timeout,
            max_retries=cfg.max_retries,
            likelihood=cfg.likelihood,
            prompt_template=cfg.prompt_template,
        )
        if cfg.endpoints:
            from picaco.llm.endpoint_pool import EndpointPool

            # base_url first, then the extra endpoints; all serve the same model (one cache identity)
            urls, keys = zip(*cfg.pool())
            return EndpointPool(list(urls), api_keys=list(keys), **connection)
        from picaco.llm.openai_backend import OpenAIBackend

        return OpenAIBackend(base_url=cfg.base_url, api_key=cfg.resolve_api_key(), **connection)
    if cfg.backend == "fake":
        from picaco.llm.fake import FakeBackend

        return FakeBackend(cfg.model)
    raise ConfigError(f"unknown backend {cfg.backend!r}")


def _backend_key(cfg: RoleConfig) -> tuple:
    # Roles with the same connection share one backend (one loaded model, one HTTP pool).
    model = cfg.model
    if cfg.backend == "embedded" and os.path.exists(model):
        model = str(Path(model).resolve())
    endpoints = tuple((e.url, e.api_key_env, str(e.api_key_file)) for e in cfg.endpoints)
    return (cfg.backend, model, cfg.base_url, endpoints, cfg.api_key_env, str(cfg.api_key_file),
            cfg.n_ctx, cfg.parallel_responses)


class Runtime:
    def __init__(self, config: RunConfig, *, cache: CallCache | None = None, use_cache: bool | None = None):
        self.config = config
        enabled = config.cache if use_cache is None else use_cache
        self.cache = (cache or CallCache()) if enabled else None
        self.accounting = Accounting()
        self.budget = Budget(config.max_calls, config.max_tokens)
        self._backends: dict[tuple, Backend] = {}
        self._clients: dict[str, LLMClient] = {}
        self._offline_judges: dict[int | None, object] = {}
        self._offline_inputs: dict | None = None
        if any(j is not None and j.type == "offline" for j in (config.judge, config.eval_judge)):
            # Read the offline judge's labeled files now: a run is judged by the data it started
            # with, even though the weights are only trained (or loaded) when first needed.
            from picaco.judge.offline import training_inputs

            self._offline_inputs = training_inputs()

    def backend(self, cfg: RoleConfig) -> Backend:
        key = _backend_key(cfg)
        if key not in self._backends:
            self._backends[key] = make_backend(cfg)
        return self._backends[key]

    def client(self, role: str, cfg: RoleConfig | None = None) -> LLMClient:
        """The client for a role ('target', 'optimizer', 'judge', 'eval_judge', ...)."""
        if role not in self._clients:
            cfg = cfg if cfg is not None else getattr(self.config, role)
            self._clients[role] = LLMClient(
                role,
                self.backend(cfg),
                cache=self.cache,
                accounting=self.accounting,
                budget=self.budget,
                max_concurrency=cfg.max_in_flight,
                # the models that stand for the deployed one answer inside the fixed template
                system_template=self.config.system_template if role in TEMPLATED_ROLES else None,
                prior_turns=self.config.turns() if role in TEMPLATED_ROLES else (),
            )
        return self._clients[role]

    def judge(self, role: str = "judge", cfg: JudgeConfig | None = None):
        """The conformity judge q_ω for a role: offline (embedding probe) or an LLM judge."""
        cfg = cfg if cfg is not None else (getattr(self.config, role, None) or self.config.judge)
        if cfg.type == "offline":
            from picaco.judge.offline import OfflineConfig, OfflineJudge

            # one judge per training half: its weights are loaded once however many roles use it
            if cfg.train_half not in self._offline_judges:
                self._offline_judges[cfg.train_half] = OfflineJudge(
                    config=OfflineConfig(half=cfg.train_half), pinned_inputs=self._offline_inputs)
            return self._offline_judges[cfg.train_half]
        from picaco.judge.llm import LLMJudge

        return LLMJudge(self.client(role, cfg))

    async def aclose(self) -> None:
        for backend in self._backends.values():
            await backend.aclose()
        if self.cache is not None:
            self.cache.close()
