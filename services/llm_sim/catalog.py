"""Which models the sim knows, per API surface.

Real providers refuse model names they do not serve (Anthropic 404 not_found_error,
Ollama 404 "model 'x' not found", OpenAI 404 model_not_found), and a client that names
the wrong model should learn that from the sim too. To keep users' model strings
working, every `claude-*` name counts as an Anthropic model and every `gpt-*` or
`text-embedding-*` name as an OpenAI one; Ollama has no such wildcard (a name is either
pulled or not). More names come from make_app(...) keyword arguments or from the
environment variables in ENV_VARS (comma-separated).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

ENV_VARS = {
    "anthropic": "TRON_SIM_ANTHROPIC_MODELS",
    "ollama": "TRON_SIM_OLLAMA_MODELS",
    "openai": "TRON_SIM_OPENAI_MODELS",
}
ANTHROPIC_PREFIXES = ("claude-",)
OPENAI_PREFIXES = ("gpt-", "text-embedding-")
DEFAULT_ANTHROPIC = ("claude-opus-4-1", "claude-sonnet-4-5", "claude-haiku-4-5")
DEFAULT_OPENAI = ("gpt-4o", "gpt-4o-mini", "gpt-4.1-mini", "text-embedding-3-small", "text-embedding-3-large")
_OPENAI_DIMS = {"text-embedding-3-large": 3072}
OPENAI_DEFAULT_DIMS = 1536  # text-embedding-3-small and ada-002
_OLLAMA_HOST_PREFIX = "registry.ollama.ai/library/"


@dataclass(frozen=True)
class OllamaModel:
    name: str  # normalised, always with a tag: "llama3.1:latest"
    family: str
    parameter_size: str
    size: int  # bytes on disk, as /api/tags reports
    context_length: int
    embedding_length: int
    capabilities: tuple[str, ...] = ("completion", "tools")
    # Set for models made at run time (/api/pull, /api/create, /api/copy):
    modified_at: str = ""  # when; "" for the built-in catalog
    parent: str = ""  # the model /api/create built it FROM
    system: str = ""  # its SYSTEM prompt, used when a request brings none
    digest: str = ""  # its manifest digest when not derived from the name (a copy keeps its source's)

    @property
    def details(self) -> dict:
        return {"parent_model": self.parent, "format": "gguf", "family": self.family, "families": [self.family],
                "parameter_size": self.parameter_size, "quantization_level": "Q4_K_M"}


DEFAULT_OLLAMA = (
    OllamaModel("llama3.1:latest", "llama", "8.0B", 4_920_753_328, 131_072, 4096),
    OllamaModel("qwen2.5:7b", "qwen2", "7.6B", 4_683_087_332, 32_768, 3584),
    OllamaModel("nomic-embed-text:latest", "nomic-bert", "137M", 274_302_450, 2048, 768, ("embedding",)),
)


def ollama_name(name: str) -> str:
    """Ollama's canonical form of a model name: lower case, default registry dropped,
    `:latest` added when no tag is given (so "llama3.1" is "llama3.1:latest")."""
    name = name.strip().lower().removeprefix(_OLLAMA_HOST_PREFIX)
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


# Model families whose library entries reason before answering (Ollama's "thinking"
# capability; a request to them without `think` thinks too) or read images ("vision").
THINKING_FAMILIES = ("deepseek-r1", "qwen3", "gpt-oss", "magistral", "phi4-reasoning", "deepseek-v3.1")
VISION_FAMILIES = ("gemma3", "llava", "llama3.2-vision", "qwen2.5vl", "minicpm-v", "moondream")


def guessed_ollama_model(name: str) -> OllamaModel:
    """A catalog entry for a user-added or pulled name; embedding-only when its name says
    so, with the thinking and vision capabilities its family has in Ollama's library."""
    base = name.rsplit("/", 1)[-1]
    match = re.match(r"[a-z]+", base)
    family = match.group(0) if match else "llama"
    if "embed" in base:
        return OllamaModel(name, family, "335M", 669_615_493, 8192, 1024, ("embedding",))
    stem = base.split(":", 1)[0]
    extra = tuple(cap for cap, families in (("thinking", THINKING_FAMILIES), ("vision", VISION_FAMILIES))
                  if any(stem == f or stem.startswith(f + "-") for f in families))
    return OllamaModel(name, family, "8.0B", 4_900_000_000, 32_768, 4096, ("completion", "tools", *extra))


@dataclass(frozen=True)
class Catalog:
    anthropic: tuple[str, ...]
    ollama: tuple[OllamaModel, ...]
    openai: tuple[str, ...]

    def anthropic_knows(self, model: str) -> bool:
        return model in self.anthropic or model.startswith(ANTHROPIC_PREFIXES)

    def with_ollama(self, model: OllamaModel) -> Catalog:
        """This catalog with `model` added, or put in place of the one of its name."""
        kept = tuple(m for m in self.ollama if m.name != model.name)
        return replace(self, ollama=(*kept, model))

    def without_ollama(self, name: str) -> Catalog:
        return replace(self, ollama=tuple(m for m in self.ollama if m.name != ollama_name(name)))

    def ollama_model(self, model: str) -> OllamaModel | None:
        wanted = ollama_name(model)
        return next((m for m in self.ollama if m.name == wanted), None)

    def openai_models(self) -> tuple[str, ...]:
        """What GET /v1/models lists: OpenAI's names, then the local (Ollama) ones, the
        way Ollama, vLLM and LM Studio serve their local models under this API."""
        local = tuple(m.name for m in self.ollama if m.name not in self.openai)
        return self.openai + local

    def openai_knows(self, model: str) -> bool:
        return (model in self.openai or model.startswith(OPENAI_PREFIXES)
                or self.ollama_model(model) is not None)

    def openai_dims(self, model: str) -> int:
        local = self.ollama_model(model)
        if local is not None and not model.startswith(OPENAI_PREFIXES):
            return local.embedding_length
        return _OPENAI_DIMS.get(model, OPENAI_DEFAULT_DIMS)


def _split(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def make_catalog(
    extra: Mapping[str, Iterable[str]] | None = None, env: Mapping[str, str] | None = None
) -> Catalog:
    """The default catalog plus `extra[surface]` names and the ENV_VARS lists.

    Raises ValueError for an unknown surface in `extra`, so a typo is not ignored.
    """
    extra = dict(extra or {})
    unknown = set(extra) - set(ENV_VARS)
    if unknown:
        raise ValueError(f"unknown model surface(s) {sorted(unknown)}; expected {sorted(ENV_VARS)}")
    env = os.environ if env is None else env
    added = {s: [*extra.get(s, ()), *_split(env.get(var))] for s, var in ENV_VARS.items()}
    ollama = list(DEFAULT_OLLAMA)
    for name in map(ollama_name, added["ollama"]):
        if all(m.name != name for m in ollama):
            ollama.append(guessed_ollama_model(name))
    return Catalog(
        anthropic=tuple(dict.fromkeys([*DEFAULT_ANTHROPIC, *added["anthropic"]])),
        ollama=tuple(ollama),
        openai=tuple(dict.fromkeys([*DEFAULT_OPENAI, *added["openai"]])),
    )
