"""Typed configuration: dataclasses + YAML + dotted ``key=value`` overrides.

Every field carries its help text (``metadata["help"]``). Unknown keys are errors that name the valid ones, and
the resolved config is written next to every output (``config.resolved.yaml``).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from rapidun.config_checks import CHECKS, validate
from rapidun.config_schema import (
    CompareConfig,
    DataConfig,
    EvalConfig,
    InfluenceConfig,
    ModelConfig,
    RunConfig,
    ScenarioConfig,
    SFTConfig,
    SplitSizes,
    TraceConfig,
    TriggerFamily,
    UnlearnConfig,
    VerifyConfig,
    WeightingConfig,
    default_families,
    field_type,
    from_dict,
)
from rapidun.constants import (
    DISTILL_TEACHERS,
    FUZZ_KINDS,
    METHOD_NAMES,
    SPLIT_NAMES,
    TRACE_SPLITS,
    UTILITY_BUDGET,
    VERIFY_ATTACKS,
)
from rapidun.errors import RapidunError

__all__ = [
    "DISTILL_TEACHERS",
    "FUZZ_KINDS",
    "METHOD_NAMES",
    "SPLIT_NAMES",
    "TRACE_SPLITS",
    "UTILITY_BUDGET",
    "VERIFY_ATTACKS",
    "CompareConfig",
    "DataConfig",
    "EvalConfig",
    "InfluenceConfig",
    "ModelConfig",
    "RunConfig",
    "SFTConfig",
    "ScenarioConfig",
    "SplitSizes",
    "TraceConfig",
    "TriggerFamily",
    "UnlearnConfig",
    "VerifyConfig",
    "WeightingConfig",
    "default_families",
]


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false (YAML 1.1 also reads on/off/yes/no as booleans, which would turn the
    documented ``autocast: off`` into False)."""


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
# YAML 1.2 floats without a dot (``1e-4``, ``5E3``): YAML 1.1 reads them as strings, so a list such as
# ``fisher_alphas: [1e-4]`` would hold text (scalar fields are coerced by type; list items are not).
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def yaml_load(text: str) -> Any:
    """YAML text → Python (a SafeLoader subclass: no arbitrary objects; ``1e-4`` is a float).

    Raises:
        yaml.YAMLError: also where PyYAML itself raises ValueError on a malformed scalar (e.g. ``0x_``).
    """
    try:
        return yaml.load(text, Loader=_Loader)
    except ValueError as e:
        raise yaml.YAMLError(f"malformed value: {e}") from None


def to_dict(cfg: Any) -> Any:
    """Plain dict of a (nested) dataclass, for YAML/JSON."""
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply dotted ``a.b.c=value`` overrides to a nested dict (values parsed as YAML scalars/lists)."""
    for ov in overrides:
        if "=" not in ov:
            raise RapidunError(f"override {ov!r}: expected key=value, e.g. sft.lr=5e-4")
        key, raw = ov.split("=", 1)
        parts = key.strip().split(".")
        if not isinstance(data, dict):
            raise RapidunError(f"override {ov!r}: the config is not a mapping of sections")
        node = data
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise RapidunError(f"override {ov!r}: {p!r} is not a section")
        try:
            node[parts[-1]] = yaml_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise RapidunError(
                f"override {ov!r}: the value is not valid YAML ({getattr(e, 'problem', None) or e}); quote it"
            ) from None
    return data


def shipped_configs() -> dict[str, Path]:
    """The configs inside the package, by name (``demo`` → ``rapidun/configs/demo.yaml``)."""
    from importlib import resources

    root = Path(str(resources.files("rapidun") / "configs"))
    return {p.stem: p for p in sorted(root.glob("*.yaml"))}


def resolve_config_path(path: str | Path) -> Path:
    """A config file's path: an existing file, else the name of a shipped config (``--config demo``).

    Raises:
        RapidunError: neither a file nor a shipped config's name (the message lists the names).
    """
    p = Path(path)
    if p.is_file():
        return p
    shipped = shipped_configs()
    if p.suffix == "" and len(p.parts) == 1 and p.name in shipped:
        return shipped[p.name]
    raise RapidunError(
        f"config file {p} does not exist; give a YAML file (the repository's configs/ holds examples) or the name "
        f"of a config shipped with rapidun: {', '.join(shipped)}"
    )


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, cls: type = RunConfig) -> Any:
    """Load a YAML config (or defaults when ``path`` is None), apply overrides, validate."""
    data: dict = {}
    if path is not None:
        path = resolve_config_path(path)
        try:
            data = yaml_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise RapidunError(f"config file {path}: invalid YAML: {e}") from None
        except UnicodeDecodeError as e:
            raise RapidunError(
                f"config file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8 (or is it another file?)"
            ) from None
    if not isinstance(data, dict):
        raise RapidunError(f"config file {path}: expected a mapping of sections (model:, data:, ...), got {data!r}")
    data = apply_overrides(data, overrides or [])
    cfg = from_dict(cls, data, str(path) if path else "config")
    if cls is not RunConfig:
        return cfg
    return validate(cfg, str(path) if path else "config")


def dump_yaml(cfg: Any) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def describe(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """``key: default  # help`` lines for every field (used by ``rapidun config --help-fields``)."""
    out = []
    inst = cls()
    for f in dataclasses.fields(cls):
        tp = field_type(cls, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            out += describe(tp, key + ".")
        else:
            chk = CHECKS.get(key)
            out.append(
                f"{key} = {getattr(inst, f.name)!r}  # {f.metadata.get('help', '')}" + (f" [{chk.text}]" if chk else "")
            )
    return out
