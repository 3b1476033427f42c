"""Run configuration: which model plays each role, the values, the queries and the hyper-parameters.

A config is YAML validated by pydantic. Every field has a default that runs offline on the embedded
models, so an empty file is a valid config. Command-line flags override fields with dotted paths
(`--set optimize.T=5`). Secrets never live in a config: an OpenAI-compatible role names the
*environment variable* (or key file) that holds its key.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from picaco.errors import ConfigError, describe_validation_error
from picaco.examples import ExampleTurn, resolve_examples

BackendKind = Literal["embedded", "openai", "fake"]

_SECRET_FIELDS = {"api_key", "key", "token", "secret", "password"}


def _refuse_inline_secrets(data: Any) -> Any:
    if isinstance(data, dict):
        inline = sorted(k for k in data if str(k).lower() in _SECRET_FIELDS)
        if inline:
            raise ValueError(
                f"'{inline[0]}' is not allowed in a config: put the key in an environment variable "
                "and name it with api_key_env (or use api_key_file)"
            )
    return data


def _read_key(api_key_env: str | None, api_key_file: Path | None) -> str | None:
    """The key named by a key file or an environment variable; None when neither is given."""
    if api_key_file is not None:
        try:
            return api_key_file.expanduser().read_text().strip() or None
        except OSError as e:
            raise ConfigError(f"api_key_file {api_key_file}: cannot read: {e.strerror}") from None
    if api_key_env:
        value = os.environ.get(api_key_env)
        if not value:
            raise ConfigError(f"environment variable {api_key_env} (api_key_env) is not set")
        return value
    return None


class EndpointConfig(BaseModel):
    """One more endpoint of a role's pool that needs a key of its own (another provider or cluster);
    a plain URL in `endpoints` uses the role's key."""

    model_config = ConfigDict(extra="forbid")

    url: str
    api_key_env: str | None = None
    api_key_file: Path | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secrets(cls, data: Any) -> Any:
        return _refuse_inline_secrets(data)


class RoleConfig(BaseModel):
    """One model role (target, optimizer, judge backend): a backend and its connection settings."""

    model_config = ConfigDict(extra="forbid")

    backend: BackendKind = "embedded"
    #: embedded: a registry name (`picaco models list`) or a path to a GGUF file; openai: the served model
    model: str = "qwen2.5-coder-0.5b"
    base_url: str | None = None
    #: more OpenAI-compatible base URLs serving the same model: requests are spread over
    #: base_url + endpoints, and an endpoint that keeps failing is skipped (failover); an entry is a
    #: URL (the role's key) or {url, api_key_env | api_key_file} (a key of its own)
    endpoints: list[EndpointConfig] = Field(default_factory=list)
    #: environment variable holding the API key (openai backend); the key itself is never stored
    api_key_env: str | None = None
    #: or a file containing only the key
    api_key_file: Path | None = None
    max_in_flight: int = Field(default=16, ge=1, le=4096)
    timeout: float = Field(default=120.0, gt=0, allow_inf_nan=False)
    max_retries: int = Field(default=6, ge=0, le=100)
    #: how the openai backend gets log-likelihoods of given responses
    likelihood: Literal["auto", "completions_echo", "vllm_prompt_logprobs", "none"] = "auto"
    #: chat template used to render prompts for the completions endpoint (openai backend)
    prompt_template: str = "chatml"
    #: embedded backend context size
    n_ctx: int = Field(default=4096, ge=256)
    #: embedded backend: score up to this many responses to one prompt in one decode (faster; the
    #: scores then depend on what shares the decode, by up to ~0.4 nats per token); 1 = exact
    parallel_responses: int = Field(default=1, ge=1, le=255)

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secrets(cls, data: Any) -> Any:
        return _refuse_inline_secrets(data)

    @field_validator("endpoints", mode="before")
    @classmethod
    def _plain_urls(cls, value: Any) -> Any:
        # a plain URL is an endpoint with the role's key
        if isinstance(value, list):
            return [{"url": v} if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _openai_needs_url(self) -> "RoleConfig":
        if self.backend == "openai" and not self.base_url:
            # The official endpoint is the SDK's default; say so instead of guessing silently.
            self.base_url = "https://api.openai.com/v1"
        return self

    def resolve_api_key(self) -> str | None:
        """The key from the environment or key file; only ever held in memory."""
        if self.api_key_file is not None or self.api_key_env:
            return _read_key(self.api_key_env, self.api_key_file)
        return os.environ.get("OPENAI_API_KEY") if self.backend == "openai" else None

    def pool(self) -> list[tuple[str, str | None]]:
        """(base URL, key) of base_url and every entry of `endpoints`, in that order; an entry without
        a key source of its own gets the role's key."""
        key = self.resolve_api_key()
        out: list[tuple[str, str | None]] = [(self.base_url, key)]
        for e in self.endpoints:
            own = e.api_key_file is not None or e.api_key_env
            out.append((e.url, _read_key(e.api_key_env, e.api_key_file) if own else key))
        return out


class JudgeConfig(RoleConfig):
    """The conformity judge q_ω: the offline embedding judge, or an LLM judge on any backend."""

    type: Literal["offline", "llm"] = "offline"
    model: str = "qwen2.5-coder-1.5b"  # used only when type = llm
    #: offline judge only: train on half 0 or 1 of the labeled train groups (disjoint halves), so
    #: one half can be optimized against and the other evaluate; null trains on all of them
    train_half: Literal[0, 1] | None = None

    def calls_per_response(self, n_values: int) -> int:
        """Model calls to rate one response on every value: none for the offline judge, one per value
        for an LLM judge (`picaco.judge.llm.LLMJudge`'s default mode)."""
        return 0 if self.type == "offline" else n_values


#: the optimizer writes instructions: the larger embedded model unless a config says otherwise
OPTIMIZER_DEFAULT_MODEL = "qwen2.5-coder-1.5b"


def _default_optimizer() -> RoleConfig:
    return RoleConfig(model=OPTIMIZER_DEFAULT_MODEL)


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: a bundled value set name (`picaco values list`) or a path to a YAML file
    values: str = "helpfulness-4"
    #: a bundled query set ('hh', 'schwartz') or a JSONL/CSV path; default: the value set's family
    queries: str | None = None
    #: hyper-parameter preset; fields under `optimize` override it
    preset: Literal["tiny", "cpu", "paper"] = "cpu"
    target: RoleConfig = Field(default_factory=RoleConfig)
    optimizer: RoleConfig = Field(default_factory=_default_optimizer)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    #: the evaluation judge; default: the same as `judge` (reports flag that)
    eval_judge: JudgeConfig | None = None
    #: hyper-parameter overrides on top of the preset (see `picaco.optimize.params`)
    optimize: dict[str, Any] = Field(default_factory=dict)
    #: the starting instruction e^0 (text); default: one that lists the values by title
    seed_instruction: str | None = None
    #: or start from a prompting baseline's system prompt: "Q+IF" (the values with their
    #: definitions) or "MP" (the persona); OPRO and GEPA start from the same e^0
    seed_from: str | None = None
    #: a fixed system prompt around the optimized instruction, with one `{instruction}` slot: the
    #: target always gets it filled (an empty slot for the bare model); only the slot is optimized
    system_template: str | None = None
    #: fixed example exchanges the target always sees after the system prompt, before the query
    #: (a few-shot deployment): "URIAL" (its three examples), a JSONL file of {"user", "assistant"}
    #: lines, or a list of such pairs; stored resolved, so a run records the turns themselves
    prior_turns: list[ExampleTurn] | None = None
    #: continue from an earlier run directory or an instruction text file
    init_from: Path | None = None
    max_calls: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    cache: bool = True
    run_dir: Path | None = None

    @field_validator("optimizer", mode="before")
    @classmethod
    def _optimizer_model_default(cls, v: Any) -> Any:
        # a section that leaves `model` out keeps the optimizer's default, not the target's
        if isinstance(v, dict) and "model" not in v:
            return {**v, "model": OPTIMIZER_DEFAULT_MODEL}
        return v

    @field_validator("seed_from")
    @classmethod
    def _seedable_method(cls, v: str | None) -> str | None:
        if v is None:
            return None
        from picaco.baselines import seedable_name

        try:
            return seedable_name(v)
        except ConfigError as e:  # pydantic wants ValueError; the message stays one line
            raise ValueError(str(e)) from None

    @field_validator("prior_turns", mode="before")
    @classmethod
    def _resolve_turns(cls, v: Any) -> Any:
        return resolve_examples(v)

    def turns(self):
        """The prior turns as alternating user/assistant messages (empty when there are none)."""
        from picaco.llm.base import turns_from_pairs

        return turns_from_pairs((t.user, t.assistant) for t in self.prior_turns or ())

    @field_validator("system_template")
    @classmethod
    def _one_slot(cls, v: str | None) -> str | None:
        if v is None:
            return None
        from picaco.llm.base import INSTRUCTION_SLOT

        count = v.count(INSTRUCTION_SLOT)
        if count != 1:
            raise ValueError(f"must contain {INSTRUCTION_SLOT} exactly once (found {count}): "
                             "it marks where the optimized instruction goes")
        return v

    @model_validator(mode="after")
    def _one_seed(self) -> "RunConfig":
        if self.seed_instruction is not None and self.seed_from is not None:
            raise ValueError("give seed_instruction or seed_from, not both: each sets the starting instruction")
        return self

    def seed_text(self, value_set) -> str | None:
        """The starting instruction e^0 this config asks for; None = the optimizer's default."""
        if self.seed_from is not None:
            from picaco.baselines import make_simple

            return make_simple(self.seed_from).system_prompt(value_set)
        return self.seed_instruction

    @field_validator("optimize")
    @classmethod
    def _known_params(cls, v: dict[str, Any]) -> dict[str, Any]:
        from picaco.optimize.params import OptimizeParams

        try:
            params = OptimizeParams.model_validate(v)
        except ValidationError as e:  # re-raised as one line naming the parameter
            first = e.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
            raise ValueError(f"{where}: {msg}") from None
        if v.get("prompt_examples") is not None:
            # stored resolved, as `prior_turns` are: a run records the examples, not a file name
            v = {**v, "prompt_examples": [t.model_dump() for t in params.prompt_examples or ()] or None}
        return v

    def params(self):
        """The effective hyper-parameters: the preset, then the `optimize` overrides."""
        from picaco.optimize.params import PRESETS, OptimizeParams

        base = PRESETS[self.preset].model_dump()
        return OptimizeParams.model_validate({**base, **self.optimize})

    def public_dict(self) -> dict:
        """The resolved config as stored in run directories (contains no secrets by construction)."""
        return json.loads(self.model_dump_json())

    def fingerprint(self) -> str:
        blob = json.dumps(self.public_dict(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if not all(p.strip() for p in parts):
        raise ConfigError(f"--set {dotted!r}: the key needs a field name between every dot, e.g. optimize.T=5")
    node = data
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: {p} is not a section")
        # a copy, so a section shared through a YAML anchor (`optimizer: *target`) is not edited too
        node[p] = nxt = dict(nxt)
        node = nxt
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`optimize.T=5` -> ('optimize.T', 5); the value is parsed as YAML (numbers, booleans, null)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. optimize.T=5")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, RecursionError):
        value = raw
    return key.strip(), value


#: a config is a few KB; anything this big is a wrong file, refused before it is read
MAX_CONFIG_BYTES = 1_000_000


def _read_config_bytes(path: Path) -> bytes:
    try:
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        if not path.is_file():
            raise ConfigError(f"{path}: not a regular file")
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: too large for a config file ({size:,} bytes, limit {MAX_CONFIG_BYTES:,})")
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except ValueError as e:  # e.g. a NUL byte in the path
        raise ConfigError(f"config path {str(path)!r}: {e}") from None


def load_config(
    path: Path | None = None, overrides: dict[str, Any] | None = None
) -> RunConfig:
    """Load a YAML config (or the defaults) and apply dotted overrides; errors are one line."""
    data: dict[str, Any] = {}
    source = "config"
    if path is not None:
        source = str(path)
        raw = _read_config_bytes(Path(path))
        try:
            loaded = yaml.safe_load(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None
        except RecursionError:
            raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}: invalid YAML{where}: {getattr(e, 'problem', None) or e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config must be a YAML mapping of fields")
        data = dict(loaded)
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, value)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e, source)) from None
