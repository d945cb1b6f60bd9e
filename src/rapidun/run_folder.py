"""The run folder: claiming an output folder, its ``run.json`` marker and ownership of what it holds, strict JSON and
the environment recorded in a report.

Below every command (the pipeline, the study, TOFU, unlearn/eval/verify/trace and the Python API all claim their
``--out`` here), above only :mod:`rapidun.config`, :mod:`rapidun.io` and :mod:`rapidun.distributed`.
"""

from __future__ import annotations

import math
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any

import torch

from rapidun import __version__
from rapidun.config import RunConfig, dump_yaml, to_dict
from rapidun.distributed import broadcast, is_main, rank_world
from rapidun.errors import RapidunError
from rapidun.io import is_atomic_temp, read_json, stable_hash, write_json, write_text


def run_identity(cfg: RunConfig) -> str:
    """What makes a run folder "the same run": the config without ``compare.*``, ``verify.*``, ``trace.*`` and
    ``unlearn.methods``, so more seeds, methods or checks extend a run (finished cells are reused; each cell has
    its own content key)."""
    d = {k: v for k, v in to_dict(cfg).items() if k not in ("compare", "verify", "trace")}
    d["unlearn"] = {k: v for k, v in d["unlearn"].items() if k != "methods"}
    return stable_hash(d)


def prepare_out(
    out: str | Path, cfg: RunConfig, overwrite: bool, kind: str = "run", inputs: dict[str, Any] | None = None
) -> Path:
    """Create/claim the output folder: ``run.json`` says what it holds (``kind``, config and input identity).

    A folder holding a different run (another kind, config or inputs) is refused unless ``overwrite``; with
    ``overwrite`` everything the replaced run wrote is removed first, so no stale file (an old ``merged/``, an old
    ``eval/``) survives beside the new ones. A non-empty folder that holds no rapidun run is never deleted, not even
    with ``overwrite``. The same run is resumed (its finished parts are reused). The marker's ``complete`` stays
    false until :func:`mark_complete` at the command's very end.

    ``compare.*`` and ``unlearn.methods`` are not part of a pipeline run's identity (:func:`run_identity`): a rerun
    with more seeds or methods extends the same run (finished cells are reused).
    Single-process (call it on rank 0; :func:`claim_out` broadcasts its outcome).

    Args:
        out: The output folder.
        cfg: The resolved config.
        overwrite: Replace a different run's folder.
        kind: What the command writes: ``run`` (scenario/poison/compare/demo, which extend one another), or
            ``unlearn``, ``eval``, ``influence``, ``compare-user``, ...
        inputs: What else identifies the output (input paths and their content fingerprints, the method).
    """
    out = Path(out)
    marker = out / "run.json"
    base = run_identity(cfg)
    h = base if kind == "run" and not inputs else stable_hash([base, kind, inputs or {}])
    legacy = (
        stable_hash({k: v for k, v in to_dict(cfg).items() if k not in ("compare", "verify", "trace")}),
        stable_hash({k: v for k, v in to_dict(cfg).items() if k not in ("verify", "trace")}),
    )
    if out.exists() and not out.is_dir():
        raise RapidunError(f"--out {out} is a file; give a folder")
    if out.exists() and any(not is_atomic_temp(p) for p in out.iterdir()):  # a killed first write leaves a temp
        if not marker.is_file():
            raise RapidunError(
                f"output folder {out} is not empty and holds no rapidun run; rapidun never deletes files it did not "
                "write (not even with --overwrite): choose another --out or empty it"
            )
        try:
            old = read_json(marker)
        except (OSError, ValueError):
            old = {}
        old_kind = old.get("kind", "run")
        same = old_kind == kind and old.get("config_hash") in (h, *((legacy) if kind == "run" else ()))
        if not same:
            what = f"a `{old_kind}` output" + (" with a different config or inputs" if old_kind == kind else "")
            if not overwrite:
                raise RapidunError(
                    f"output folder {out} holds {what}; choose another --out, or pass --overwrite to replace it "
                    "(what that output wrote is removed first; files you added are kept)"
                )
            foreign = clear_folder(out, old.get("written"))
            if foreign:
                print(f"--overwrite: kept {len(foreign)} entries rapidun did not write in {out}: "
                      f"{', '.join(foreign[:5])}{' …' if len(foreign) > 5 else ''}", file=sys.stderr)  # fmt: skip
        else:
            foreign = foreign_entries(out, old)
    else:
        foreign = []
    out.mkdir(parents=True, exist_ok=True)
    write_json(
        marker,
        {"kind": kind, "config_hash": h, "inputs": inputs or {}, "rapidun": __version__, "complete": False,
         "foreign": foreign},
    )  # fmt: skip
    write_text(out / "config.resolved.yaml", dump_yaml(cfg))
    return out


# Every top-level name a rapidun command writes into its --out (what --overwrite may remove from an output whose
# run.json records no list of its own, i.e. one that did not finish).
OUTPUT_NAMES = frozenset(
    "adapter audit.jsonl calibration.png cells config.resolved.yaml detector.json eval exact forget.jsonl "
    "influence influence.json influence.pt influence_check.json manifest.json merged packs.json peak_mem.json "
    "plots probes.jsonl ranked.jsonl receipt.json report.html report.json report.md result.json "
    "retrain_training.json run.json scenario scenario.json seeds sketches study.html study.json study.md "
    "tofu_scatter.png topk.jsonl trace trace.html trace.json trace.md training verification.json verification.md "
    "verify views.json views.pt weights.jsonl robust distance.json metrics.json influence_traced".split()
)
_OUTPUT_PATTERN = re.compile(r"^probes_[\w.-]+\.jsonl?$|^[\w.-]+\.generations\.jsonl$")  # per-name files


def is_output_name(name: str) -> bool:
    """Whether ``name`` is one of the names rapidun's commands write at the top of an --out folder."""
    return name in OUTPUT_NAMES or bool(_OUTPUT_PATTERN.match(name))


def foreign_entries(out: Path, old: dict[str, Any]) -> list[str]:
    """Entries of ``out`` that its run did not write: those recorded as foreign when it was claimed, and (for a
    finished run) anything beside what it recorded writing."""
    foreign = set(old.get("foreign", []))
    if old.get("written") is not None:
        foreign |= {p.name for p in out.iterdir()} - set(old["written"]) - {"run.json"}
    return sorted(n for n in foreign if (out / n).exists() or (out / n).is_symlink())


def clear_folder(out: Path, written: list[str] | None = None) -> list[str]:
    """Remove what the rapidun output in ``out`` wrote, the marker last (a crash half-way leaves a folder that is
    still recognised as rapidun's and is cleared again by the next ``--overwrite``); returns the names kept.

    ``written``: the entries the output recorded writing (``run.json["written"]``, set when it finished); without
    it (a run that did not finish) the entries named like rapidun's outputs (:data:`OUTPUT_NAMES`) and atomic
    temporaries. Anything else — files a user put there — is kept.
    """
    import shutil

    def mine(name: str) -> bool:
        return name in set(written) | {"run.json"} if written is not None else is_output_name(name)

    kept = []
    for p in sorted(out.iterdir(), key=lambda q: q.name == "run.json"):
        if not mine(p.name) and not is_atomic_temp(p):
            kept.append(p.name)
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    return kept


def mark_complete(out: str | Path) -> None:
    """Set ``complete: true`` in ``out/run.json`` (the command finished; the last write of every command) and
    record ``written``: the entries of ``out`` this run wrote (all but those foreign when it was claimed), which
    is what a later ``--overwrite`` removes."""
    out = Path(out)
    marker = out / "run.json"
    if marker.is_file():
        m = read_json(marker)
        foreign = set(m.get("foreign", []))
        written = sorted(p.name for p in out.iterdir() if p.name not in foreign and not is_atomic_temp(p))
        write_json(marker, m | {"complete": True, "written": written})


def claim_out(
    out: str | Path, cfg: RunConfig, overwrite: bool, kind: str = "run", inputs: dict[str, Any] | None = None
) -> Path:
    """:func:`prepare_out` on rank 0; its error, if any, is raised on every rank."""
    err = None
    if is_main():
        try:
            prepare_out(out, cfg, overwrite, kind, inputs)
        except RapidunError as e:
            err = str(e)
    err = broadcast(err)
    if err is not None:
        raise RapidunError(err)
    return Path(out)


def finite_json(x: Any) -> Any:
    """``x`` with every non-finite float (a diverged perplexity) replaced by None, so report.json is strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_json(v) for v in x]
    return x


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """Versions and device, recorded in the report."""
    import transformers

    from rapidun.models import import_peft

    peft = import_peft()

    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "rapidun": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "platform": platform.platform(),
        "cuda": cuda,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_threads": torch.get_num_threads(),
        "ranks": rank_world()[1],
        "device": cuda or f"cpu ({torch.get_num_threads()} threads)",
    }
