"""Fault injection: the whole ``rapidun compare`` pipeline is killed (SIGKILL) or runs out of disk at chosen points,
then rerun; the resumed run must end with the uninterrupted run's report.

How: :func:`rapidun.io.fault_point` numbers the points a process reaches (every atomic write, before and after its
rename, and each step of the long loops: SFT and unlearning optimiser steps, sketch batches, generation batches,
method cells, report sections). A reference run on a tiny local Llama logs them (``RAPIDUN_FAULT_LOG``); each
point is put in its stage (scenario, sft, influence, unlearning, evaluation, report). Then, per chosen point N:

* **kill**: a run in a fresh run folder *and a fresh, empty* ``RAPIDUN_CACHE`` with ``RAPIDUN_FAULT_KILL_AT=N`` must
  die by SIGKILL; the same command rerun without it must exit 0 with a ``report.json`` equal to the reference's
  (:func:`normalise`: only measured times, memory, speed-ups, "was it reused" flags and the per-run temp paths
  differ) and byte-identical JSONL files (scenario, generations, weights, audit), adapters, views and SFT models.
  The cache starts empty on purpose: a kill during fine-tuning must leave nothing the rerun trusts, and a kill
  after it must leave a cache entry that gives the same model; both are only tested when the killed run writes
  the cache itself (a copy of the reference's cache would skip the SFT stage's kill points altogether).
* **full disk**: ``RAPIDUN_FAULT_ENOSPC_AT=N`` makes every write from point N on fail with ``OSError(ENOSPC)``
  (SFT cache, sketch cache, report). The command must exit 2 with one clear message (no traceback), leave no
  cache entry that is partial (every SFT folder complete and loadable, every sketch manifest loadable with all
  its shards), and the rerun once "space is freed" must give the reference report.

Each run is a real child process (its own pid; SIGKILL kills only it) forked from one warm interpreter
(``tests/fault_server.py``) that imported torch & co. once; ``RAPIDUN_FAULT_EXEC=1`` runs every command as a fresh
``python -m rapidun.cli`` instead (slower, same checks). The reference run is always a fresh interpreter.

Kill points per CI run: :data:`KILLS_PER_STAGE` per stage drawn with ``numpy.random.default_rng(0)``, plus the
run's first and last points (25 in all: the last is also a drawn one).
Full sweep, every kill point of the reference run (235; about 18 min on 2 busy cores)::

    RAPIDUN_FAULT_SWEEP=all .venv/bin/python -m pytest -q tests/test_faults.py

(``RAPIDUN_FAULT_SWEEP=<n>`` draws n points per stage instead.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from helpers import TINY_RUN, TINY_SCENARIO, tiny_world

STAGES = ("scenario", "sft", "influence", "unlearning", "evaluation", "report")
KILLS_PER_STAGE = 4
OVERRIDES = [
    *TINY_RUN,
    *TINY_SCENARIO,
    "influence.batch_size=4",
    "unlearn.methods=[rapidun,uniform,retrain]",
    "eval.batch_size=4",
    "compare.n_seeds=2",
    "compare.n_boot=20",
]
FAULT_VARS = ("RAPIDUN_FAULT_KILL_AT", "RAPIDUN_FAULT_ENOSPC_AT", "RAPIDUN_FAULT_LOG")


# ---------------------------------------------------------------- running the CLI


class Runner:
    """Runs ``rapidun compare`` into a run folder with its own cache: forked from the warm server, or exec'd."""

    def __init__(self, root: Path, argv: list[str], exec_mode: bool) -> None:
        self.root, self.argv, self.exec_mode, self.n = root, argv, exec_mode, 0
        self.base_env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")]),
        }
        for k in FAULT_VARS:
            self.base_env.pop(k, None)
        self.server: subprocess.Popen | None = None
        if not exec_mode:
            self.server = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("fault_server.py"))],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=self.base_env,
            )
            assert json.loads(self.server.stdout.readline()) == {"ready": True}

    def close(self) -> None:
        if self.server is not None:
            self.server.stdin.close()
            self.server.wait(timeout=60)

    def run(self, out: Path, cache: Path, fault: dict[str, str] | None = None, fresh: bool = False) -> dict[str, Any]:
        """One command; returns ``{"rc", "stdout", "stderr"}`` (``rc`` is ``-9`` for a SIGKILL)."""
        self.n += 1
        logs = self.root / "logs"
        logs.mkdir(exist_ok=True)
        so, se = logs / f"{self.n}.out", logs / f"{self.n}.err"
        env = {"RAPIDUN_CACHE": str(cache), **{k: None for k in FAULT_VARS}, **(fault or {})}
        argv = ["compare", "--out", str(out), *self.argv]
        if self.exec_mode or fresh:
            full = {**self.base_env, **{k: v for k, v in env.items() if v is not None}}
            with open(so, "w") as fo, open(se, "w") as fe:
                rc = subprocess.run(
                    [sys.executable, "-m", "rapidun.cli", *argv], env=full, stdout=fo, stderr=fe
                ).returncode
        else:
            self.server.stdin.write(json.dumps({"argv": argv, "env": env, "stdout": str(so), "stderr": str(se)}) + "\n")
            self.server.stdin.flush()
            rc = json.loads(self.server.stdout.readline())["rc"]
        return {"rc": rc, "stdout": so.read_text(), "stderr": se.read_text()}


# ---------------------------------------------------------------- comparing runs

# Keys whose values are measurements of this invocation (time, memory, and what they derive: throughput and
# speed-ups) or say what this invocation reused rather than computed; everything else must be equal.
MEASURED = {"timings", "timings_mean", "environment", "cached", "sft_cached", "eval_cached"}
REUSE_STATS = {"computed", "truncation"}  # influence.per_seed.<seed>.{train,test}: counted only when sketched now


def _measured(key: str) -> bool:
    return (
        key in MEASURED
        or key.endswith("_s")
        or "peak_mem" in key
        or "tokens_per_s" in key
        or key.startswith("speedup_vs_retrain")
    )


def normalise(report: Any, roots: dict[str, str], path: tuple[str, ...] = ()) -> Any:
    """``report`` without measured/reuse fields, with this run's temp folders replaced by placeholders."""
    if isinstance(report, dict):
        out = {}
        for k, v in report.items():
            if _measured(k):
                continue
            if k in REUSE_STATS and path[:2] == ("influence", "per_seed"):
                continue
            out[k] = normalise(v, roots, (*path, k))
        return out
    if isinstance(report, list):
        return [normalise(v, roots, path) for v in report]
    if isinstance(report, str):
        for name, root in roots.items():
            report = report.replace(root, name)
    return report


def artefacts(out: Path, cache: Path) -> dict[str, bytes]:
    """Files that must be byte-identical after a resume (relative name → bytes)."""
    pats = ["**/*.jsonl", "**/adapter_model.safetensors", "**/views.pt", "**/exact/*.pt"]
    files = {f"out/{p.relative_to(out)}": p for pat in pats for p in out.glob(pat) if not _tmp(p, out)}
    files |= {f"cache/{p.relative_to(cache)}": p for p in (cache / "sft").glob("*/model.safetensors")}
    return {k: p.read_bytes() for k, p in sorted(files.items())}


def leftover_temps(*roots: Path) -> list[str]:
    """Temps of atomic writes under ``roots`` that still hold a file (a resumed or failed run must leave none).

    An *empty* temp is tolerated: a kill in the instant between the rename and removing the (then empty) temp
    folder leaves one, and only the next write of the same path removes it (see :func:`rapidun.io.atomic_path`).
    """
    temps = [p for r in roots if r.is_dir() for p in r.rglob(".*.tmp") if p.is_dir()]
    return sorted(str(p) for p in temps if any(q.is_file() for q in p.rglob("*")))


def _tmp(p: Path, root: Path) -> bool:
    return any(part.startswith(".") and part.endswith(".tmp") for part in p.relative_to(root).parts)


def differences(ref: dict[str, Any], got_dir: Path, cache: Path) -> list[str]:
    """What differs between the reference and a finished run (empty when identical)."""
    f = got_dir / "report.json"
    if not f.is_file():
        return ["no report.json"]
    a = normalise(ref["report"], {"<out>": str(ref["out"]), "<cache>": str(ref["cache"])})
    b = normalise(json.loads(f.read_text()), {"<out>": str(got_dir), "<cache>": str(cache)})
    diffs = [f"report.json {p}: {x!r} != {y!r}" for p, x, y in _walk_diff(a, b)][:10]
    ra, rb = ref["artefacts"], artefacts(got_dir, cache)
    diffs += [f"{k}: missing or extra" for k in sorted(set(ra) ^ set(rb))]
    diffs += [f"{k}: bytes differ" for k in sorted(set(ra) & set(rb)) if ra[k] != rb[k]]
    return diffs


def _walk_diff(a: Any, b: Any, p: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            d
            for k in dict.fromkeys([*a, *b])
            for d in _walk_diff(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{p}.{k}")
        ]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _walk_diff(x, y, f"{p}[{i}]")]
    return [] if a == b else [(p, a, b)]


# ---------------------------------------------------------------- the fault points of the reference run


def stage_of(tag: str, path: str, prev: str, out: Path, cache: Path) -> str:
    """The pipeline stage a logged fault point belongs to."""
    loops = {"sft": "sft", "influence": "influence", "unlearn": "unlearning", "compare": "unlearning",
             "eval": "evaluation", "report": "report"}  # fmt: skip
    kind = tag.split(":", 1)[0]
    if kind in loops:
        return loops[kind]
    if kind == "wrote" or not path:
        return prev  # after the rename: same stage as its write
    p = Path(path)
    if p.is_relative_to(cache):
        return "sft"
    rel = tuple(x for x in p.relative_to(out).parts if not (x.startswith(".") and x.endswith(".tmp")))
    if rel[0] in ("run.json", "config.resolved.yaml", "scenario"):
        return "report" if prev == "report" else "scenario"  # run.json is rewritten last, marking the run done
    if rel[0] == "training":
        return "sft"
    if rel[0] in ("eval", "detector.json") or (rel[0] == "seeds" and rel[2] == "eval") or rel[-1] == "metrics.json":
        return "evaluation"
    if rel[0] == "seeds" and rel[2] == "influence":
        return "influence"
    if rel[0] == "seeds" and rel[2] == "methods":
        return "unlearning"
    if rel[0] in ("report.json", "report.md", "report.html", "plots"):
        return "report"
    raise AssertionError(f"no stage for fault point {tag} {path}")


def read_points(log: Path, out: Path, cache: Path) -> list[dict[str, Any]]:
    points, prev, prev_tag = [], "scenario", ""
    for line in log.read_text().splitlines():
        n, tag, path = line.split("\t")
        prev = stage_of(tag, path, prev, out, cache)
        points.append({"n": int(n), "tag": tag, "path": path, "stage": prev, "prev": prev_tag})
        prev_tag = tag
    assert [p["n"] for p in points] == list(range(1, len(points) + 1))
    return points


def chosen_kill_points(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The CI subset (``KILLS_PER_STAGE`` per stage, seeded) or every point with ``RAPIDUN_FAULT_SWEEP=all``."""
    sweep = os.environ.get("RAPIDUN_FAULT_SWEEP", "")
    if sweep == "all":
        return points
    per_stage = int(sweep) if sweep else KILLS_PER_STAGE
    rng = np.random.default_rng(0)
    chosen = [points[0], points[-1]]  # always: the first write (claiming --out) and the last (marking it complete)
    for stage in STAGES:
        mine = [p for p in points if p["stage"] == stage]
        idx = rng.choice(len(mine), size=min(per_stage, len(mine)), replace=False)
        chosen += [mine[i] for i in sorted(idx)]
    return sorted({p["n"]: p for p in chosen}.values(), key=lambda p: p["n"])


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny model + corpus, the warm runner, and the uninterrupted reference run with its logged fault points."""
    root = tmp_path_factory.mktemp("faults")
    model_dir, data = tiny_world(root)
    argv = [*OVERRIDES, f"model.name={model_dir}", f"data.source={data}"]
    runner = Runner(root, argv, exec_mode=os.environ.get("RAPIDUN_FAULT_EXEC") == "1")
    out, cache = fresh(root, "ref")
    log = root / "ref.log"
    t0 = time.perf_counter()
    r = runner.run(out, cache, {"RAPIDUN_FAULT_LOG": str(log)}, fresh=True)
    assert r["rc"] == 0, r["stderr"][-3000:]
    ref = {
        "out": out,
        "cache": cache,
        "report": json.loads((out / "report.json").read_text()),
        "artefacts": artefacts(out, cache),
        "points": read_points(log, out, cache),
        "seconds": time.perf_counter() - t0,
    }
    yield root, runner, ref
    runner.close()


def fresh(root: Path, name: str) -> tuple[Path, Path]:
    """A new run folder and a new empty cache folder."""
    base = root / name
    shutil.rmtree(base, ignore_errors=True)
    return base / "run", base / "cache"


# ---------------------------------------------------------------- tests


def test_reference_run_has_fault_points_in_every_stage(world):
    _, _, ref = world
    counts = Counter(p["stage"] for p in ref["points"])
    print(f"\nfault points of the reference run ({len(ref['points'])}, {ref['seconds']:.1f} s): {dict(counts)}")
    assert set(counts) == set(STAGES) and min(counts.values()) >= KILLS_PER_STAGE
    assert {p["tag"] for p in ref["points"]} >= {"sft:step", "influence:batch", "unlearn:step", "eval:batch",
                                                 "compare:cell", "report:section"}  # fmt: skip


def test_every_kill_point_resumes_to_the_identical_report(world):
    root, runner, ref = world
    chosen = chosen_kill_points(ref["points"])
    assert len(chosen) >= 20 or os.environ.get("RAPIDUN_FAULT_SWEEP")
    failures, t0 = [], time.perf_counter()
    for p in chosen:
        out, cache = fresh(root, f"kill-{p['n']}")
        what = f"kill point {p['n']} ({p['stage']}, {p['tag']} {Path(p['path']).name if p['path'] else ''})"
        killed = runner.run(out, cache, {"RAPIDUN_FAULT_KILL_AT": str(p["n"])})
        if killed["rc"] != -9:
            failures.append(f"{what}: the killed run exited {killed['rc']}, not by SIGKILL\n{killed['stderr'][-1500:]}")
            continue
        again = runner.run(out, cache)
        if again["rc"] != 0:
            failures.append(f"{what}: the rerun failed ({again['rc']})\n{again['stderr'][-1500:]}")
            continue
        diffs = differences(ref, out, cache) + [f"temp left behind: {t}" for t in leftover_temps(out, cache)]
        if diffs:
            failures.append(f"{what}: resumed to a different result:\n  " + "\n  ".join(diffs))
        else:
            shutil.rmtree(out.parent)
    by_stage = Counter(p["stage"] for p in chosen)
    print(f"\n{len(chosen) - len(failures)}/{len(chosen)} kill points resumed to the identical report "
          f"({dict(by_stage)}; {time.perf_counter() - t0:.0f} s)")  # fmt: skip
    assert not failures, "\n\n".join(failures)


def _enospc_point(points: list[dict[str, Any]], where: str) -> dict[str, Any]:
    def match(p: dict[str, Any]) -> bool:
        if not p["tag"].startswith("write:"):
            return False
        parts = Path(p["path"]).parts
        return {
            "sft-cache": "sft" in parts and p["tag"].startswith("write:poisoned-"),
            "sketch-cache": "sketches" in parts and p["tag"] == "write:shard-00000.pt",
            # the manifest after a shard: the shard is on disk but listed nowhere (an orphan, removed on reopen)
            "sketch-manifest": "sketches" in parts
            and p["tag"] == "write:manifest.json"
            and p["prev"] == "wrote:shard-00000.pt",
            "report": p["tag"] == "write:report.json",
        }[where]

    return next(p for p in points if match(p))


def corrupt_cache_entries(out: Path, cache: Path) -> list[str]:
    """Cache entries a rerun would trust that are partial or unreadable (empty when every entry is sound)."""
    import torch

    from rapidun.io import read_json

    bad = []
    for d in sorted((cache / "sft").glob("*")) if (cache / "sft").is_dir() else []:
        if d.name.startswith("."):
            continue  # an interrupted write's temp: never read (the cache looks up <tag>-<key> only)
        need = ("rapidun_sft.json", "config.json", "model.safetensors", "tokenizer.json")
        missing = [n for n in need if not (d / n).is_file()]
        if missing:
            bad.append(f"{d}: missing {missing}")
            continue
        try:
            read_json(d / "rapidun_sft.json")
            from safetensors.torch import load_file

            load_file(d / "model.safetensors")
        except Exception as e:
            bad.append(f"{d}: {type(e).__name__}: {e}")
    for man in sorted(out.glob("seeds/*/influence/sketches/*/manifest.json")):
        try:
            shards = read_json(man)["shards"]
            for s in shards:
                blob = torch.load(man.parent / s["file"], weights_only=True)
                assert blob["ids"] == s["ids"], f"{s['file']} ids differ from the manifest"
        except Exception as e:
            bad.append(f"{man.parent}: {type(e).__name__}: {e}")
    for views in sorted(out.glob("seeds/*/influence/views.json")):
        if not (views.parent / "views.pt").is_file():
            bad.append(f"{views}: no views.pt")
    for metrics in sorted(out.glob("seeds/*/methods/*/metrics.json")):
        try:
            read_json(metrics)["key"]
        except Exception as e:
            bad.append(f"{metrics}: {type(e).__name__}: {e}")
    return bad


@pytest.mark.parametrize("where", ["sft-cache", "sketch-cache", "sketch-manifest", "report"])
def test_a_full_disk_is_a_clear_error_leaves_no_corrupt_cache_and_resumes(world, where):
    root, runner, ref = world
    p = _enospc_point(ref["points"], where)
    out, cache = fresh(root, f"enospc-{where}")
    full = runner.run(out, cache, {"RAPIDUN_FAULT_ENOSPC_AT": str(p["n"])})
    assert corrupt_cache_entries(out, cache) == []
    assert leftover_temps(out, cache) == [], "a failed write left its temp behind"
    again = runner.run(out, cache)
    assert again["rc"] == 0, again["stderr"][-3000:]
    assert differences(ref, out, cache) == [] and leftover_temps(out, cache) == []
    # The message: exit 2, one line naming the file and saying what to do, no traceback.
    err = full["stderr"]
    assert full["rc"] == 2, err[-3000:]
    assert "Traceback" not in err
    msg = [line for line in err.splitlines() if line.startswith("rapidun: error:")]
    assert len(msg) == 1 and "space" in msg[0].lower(), err[-3000:]
    assert Path(p["path"]).name in msg[0] or str(Path(p["path"]).parent) in msg[0], msg


def test_the_comparison_ignores_measurements_and_sees_any_changed_result(world, tmp_path):
    _, _, ref = world
    out, cache = tmp_path / "run", tmp_path / "cache"
    shutil.copytree(ref["out"], out)
    shutil.copytree(ref["cache"], cache)
    rj = out / "report.json"
    rj.write_text(rj.read_text().replace(str(ref["cache"]), str(cache)).replace(str(ref["out"]), str(out)))
    assert differences(ref, out, cache) == []
    rep = json.loads((out / "report.json").read_text())
    cell = rep["methods"]["rapidun"]["per_seed"]["4"]
    rep["timings"]["scenario"] += 1
    cell["time_s"] += 1
    cell["peak_mem_mb"] = 1.0
    rep["models"]["poisoned"]["sft_cached"] = True
    rep["influence"]["per_seed"]["4"]["train"]["computed"] = 0
    (out / "report.json").write_text(json.dumps(rep))
    assert differences(ref, out, cache) == []
    cell["clean_ppl"] += 1e-9
    (out / "report.json").write_text(json.dumps(rep))
    assert differences(ref, out, cache) == [f"report.json .methods.rapidun.per_seed.4.clean_ppl: "
                                            f"{cell['clean_ppl'] - 1e-9!r} != {cell['clean_ppl']!r}"]  # fmt: skip
    cell["clean_ppl"] -= 1e-9
    (out / "report.json").write_text(json.dumps(rep))
    assert differences(ref, out, cache) == []
    w = out / "seeds" / "5" / "methods" / "uniform" / "weights.jsonl"
    w.write_text(w.read_text().replace("1.0", "1.00", 1))
    assert differences(ref, out, cache) == ["out/seeds/5/methods/uniform/weights.jsonl: bytes differ"]
