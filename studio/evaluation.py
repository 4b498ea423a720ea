"""Batch evaluation: a suite YAML -> jobs -> images, ``results.jsonl``, ``summary.csv``, grids, report.

A suite expands methods × adapter sets × weights × prompts × samples into jobs (a prompt with
``sets:`` is used only with those adapter sets). Seeds depend on
(base seed, adapter set, prompt, sample) only, never on the method, so every method starts from the
same noise. A job's id is a hash of everything that determines its image, which makes runs
resumable (finished ids are skipped) and data-parallel (``accelerate launch`` splits the jobs,
each rank writes ``results.rank<k>.jsonl``, rank 0 merges in job order).

Run folder: ``config.resolved.yaml``, ``env.json``, ``images/<job>.png`` (with studio metadata),
``results.jsonl``, ``summary.csv`` (long form), ``table.md`` (method × N means, the table in
docs/benchmark.md), ``grids/``, ``report.html``.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import html
import io
import itertools
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from .adapters.formats import addnet_hash
from .atomic import write_atomic
from .errors import StudioError

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_KEYWORDS = ("toy", "tiny-sd1", "tiny-sdxl")
METRICS = ("clipscore", "clipscore_hessel", "clip_prompt", "clip_t", "clip_i", "oracle")
SUITE_KEYS = {
    "name", "model", "scorer", "device", "steps", "guidance", "sampler", "size", "negative_prompt",
    "base_seed", "samples", "adapters", "adapter_sets", "combinations", "weights", "prompts",
    "methods", "metrics", "oracle", "grids", "report", "notes",
}
ADAPTER_KEYS = {"name", "path", "trigger", "kind", "category", "concept", "concept_prompt", "references", "weight"}


class SuiteError(StudioError):
    """A suite file is malformed or names something that does not exist."""


class DiskFullError(StudioError):
    """The disk filled up during a run; finished jobs are kept and the run can be resumed."""


# ---------------------------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------------------------
@dataclass
class AdapterEntry:
    name: str
    path: str
    trigger: str | None = None
    kind: str | None = None  # object / style / background / character
    concept: str | None = None  # toy-world concept word the oracle checks, e.g. "crescent"
    concept_prompt: str | None = None  # text for per-concept CLIP-T, e.g. "a crescent"
    references: list[str] = field(default_factory=list)  # reference images for CLIP-I
    weight: float = 1.0
    sha256: str = ""


@dataclass
class MethodSpec:
    """One method column of a suite; ``guidance`` overrides the suite's CFG scale for it alone, and
    ``weights`` ({adapter: weight}) the adapters' preferred weights: averaging and summing methods
    balance concepts at different weights, as they do at different CFG scales."""

    name: str
    params: dict = field(default_factory=dict)
    guidance: float | None = None
    weights: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        label = self.name
        if self.params:
            label += "(" + ",".join(f"{k}={v}" for k, v in sorted(self.params.items())) + ")"
        if self.weights:
            label += "[" + ",".join(f"{k}={v:g}" for k, v in sorted(self.weights.items())) + "]"
        return label if self.guidance is None else f"{label} cfg {self.guidance:g}"


@dataclass
class Suite:
    name: str
    path: str
    model: str = "toy"
    scorer: str = "toy"  # "toy", an open_clip folder, open_clip:ARCH/TAG, or "none"
    device: str | None = None
    steps: int = 25
    guidance: float = 7.5
    sampler: str = "ddim"
    width: int = 64
    height: int = 64
    negative_prompt: str = ""
    base_seed: int = 0
    samples: int = 1
    adapters: dict[str, AdapterEntry] = field(default_factory=dict)
    sets: list[tuple[str, list[str]]] = field(default_factory=list)
    weights: list = field(default_factory=lambda: [None])  # None = each adapter's preferred weight
    prompts: list[tuple[str, str]] = field(default_factory=list)
    prompt_sets: dict[str, list[str]] = field(default_factory=dict)  # prompt id -> the only set ids it is used with
    methods: list[MethodSpec] = field(default_factory=list)
    metrics: list[str] = field(default_factory=lambda: list(METRICS))
    oracle: str = "auto"  # auto: use it when built; on: require it; off
    grids: bool = True
    report: bool = True


@dataclass
class Job:
    """One image to generate, fully resolved."""

    job_id: str
    index: int
    method: str
    method_params: dict
    method_label: str
    loraset_id: str
    adapters: list[dict]  # [{name, weight, sha256}]
    weight_id: str
    prompt_id: str
    prompt: str
    negative_prompt: str
    sample_idx: int
    seed: int
    steps: int
    guidance: float
    sampler: str
    width: int
    height: int
    model: str

    @property
    def combo(self) -> str:
        return f"{self.loraset_id}__{self.weight_id}__{self.prompt_id}"


def derive_seed(base_seed: int, loraset_id: str, prompt_id: str, sample_idx: int | str) -> int:
    """uint32 from the first 4 bytes (big-endian) of SHA-256 of "{base}|{set}|{prompt}|{sample}"."""
    digest = hashlib.sha256(f"{base_seed}|{loraset_id}|{prompt_id}|{sample_idx}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def job_id(resolved: dict) -> str:
    """First 12 hex digits of SHA-1 of the canonical JSON of a resolved job."""
    canon = json.dumps(resolved, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha1(canon.encode()).hexdigest()[:12]


def _fail(path: str, msg: str) -> None:
    raise SuiteError(f"{path}: {msg}")


def read_yaml(path: str | os.PathLike) -> dict:
    """Parse a suite file; syntax errors name the line and column."""
    import yaml

    from .schema import Limits, env_name

    limits = Limits.from_env()
    path = os.fsdecode(path)
    try:
        if Path(path).stat().st_size > limits.max_suite_bytes:
            _fail(path, f"the suite file is over {limits.max_suite_bytes} bytes ({env_name('max_suite_bytes')}); "
                        "is it the right file?")
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise SuiteError(f"cannot read suite {path} ({e.strerror}); check the path") from None
    except UnicodeDecodeError:
        raise SuiteError(f"{path}: not UTF-8 text; save the suite as UTF-8 YAML") from None
    try:
        data = yaml.load(text, Loader=_bounded_loader(limits.max_yaml_aliases))
    except _TooManyAliases:
        raise SuiteError(f"{path}: more than {limits.max_yaml_aliases} YAML aliases (*name), e.g. an alias bomb; "
                         f"write the suite out, or raise {env_name('max_yaml_aliases')}") from None
    except RecursionError:
        raise SuiteError(f"{path}: the YAML is nested too deeply; flatten it") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SuiteError(f"{path}: malformed YAML at {where}: {problem}; fix the syntax there") from None
    if not isinstance(data, dict):
        _fail(path, "a suite must be a YAML mapping (name:, methods:, adapters:, prompts: …)")
    return data


class _TooManyAliases(Exception):
    pass


def _bounded_loader(max_aliases: int):
    """A SafeLoader that refuses more than ``max_aliases`` alias uses: an alias bomb
    (``a: &a [x, x]``, ``b: &b [*a, *a]``, …) is refused while it is parsed, before it expands."""
    import yaml

    class Loader(yaml.SafeLoader):
        aliases = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                self.aliases += 1
                if self.aliases > max_aliases:
                    raise _TooManyAliases()
            return super().compose_node(parent, index)

    return Loader


def _resolve_path(base: Path, p: str) -> Path:
    q = Path(os.path.expanduser(str(p)))
    return Path(os.path.normpath(q if q.is_absolute() else base / q))


def load_suite(path: str | os.PathLike) -> Suite:
    """Read and validate a suite; every name is checked before anything is generated."""
    from composers import COMPOSERS, make_composer

    path = str(path)
    data = read_yaml(path)
    base = Path(path).resolve().parent
    unknown = sorted(map(str, set(data) - SUITE_KEYS))
    if unknown:
        _fail(path, f"unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(SUITE_KEYS))}")
    from .adapters.library import safe_name
    from .schema import Limits, check_method_params, check_suite_scalars, env_name

    limits = Limits.from_env()
    check_suite_scalars(data, path, limits)
    for key, kind in (("adapters", list), ("adapter_sets", list), ("prompts", list), ("methods", list),
                      ("metrics", list), ("combinations", dict)):
        if data.get(key) is not None and not isinstance(data[key], kind):
            _fail(path, f"{key}: must be a {'list' if kind is list else 'mapping'}, got {type(data[key]).__name__} "
                        f"{str(data[key])[:40]!r}")
    size = data.get("size", 64)
    width, height = (size, size) if isinstance(size, int) else tuple(size)
    suite = Suite(
        name=str(data.get("name") or Path(path).stem), path=path, model=str(data.get("model", "toy")),
        scorer=str(data.get("scorer", "toy")), device=data.get("device"), steps=int(data.get("steps", 25)),
        guidance=float(data.get("guidance", 7.5)), sampler=str(data.get("sampler", "ddim")),
        width=int(width), height=int(height), negative_prompt=str(data.get("negative_prompt") or ""),
        base_seed=int(data.get("base_seed", 0)), samples=int(data.get("samples", 1)),
        oracle=str(data.get("oracle", "auto")).lower(), grids=bool(data.get("grids", True)),
        report=bool(data.get("report", True)),
    )
    if suite.samples < 1:
        _fail(path, f"samples must be ≥ 1, got {suite.samples}")
    if suite.oracle not in ("auto", "on", "off", "true", "false"):
        _fail(path, f"oracle must be auto, on or off, got {suite.oracle!r}")
    suite.oracle = {"true": "on", "false": "off"}.get(suite.oracle, suite.oracle)

    # adapters
    for i, raw in enumerate(data.get("adapters") or []):
        if not isinstance(raw, dict) or "name" not in raw or "path" not in raw:
            _fail(path, f"adapters[{i}] needs at least name: and path:")
        bad = sorted(set(raw) - ADAPTER_KEYS)
        if bad:
            _fail(path, f"adapters[{i}] has unknown key(s) {', '.join(bad)}; valid: {', '.join(sorted(ADAPTER_KEYS))}")
        for key in ("name", "path", "trigger", "concept", "concept_prompt", "kind", "category"):
            if raw.get(key) is not None and not isinstance(raw[key], str):
                _fail(path, f"adapters[{i}].{key} must be text, got {raw[key]!r}"[:300])
        if raw.get("weight") is not None:
            try:
                from .schema import finite

                finite(f"adapters[{i}].weight", raw["weight"], -limits.max_weight, limits.max_weight)
            except StudioError as e:
                _fail(path, str(e))
        if raw.get("references") is not None and (not isinstance(raw["references"], list)
                                                   or not all(isinstance(r, str) for r in raw["references"])):
            _fail(path, f"adapters[{i}].references must be a list of image paths")
        name = str(raw["name"])
        if safe_name(name) != name:
            _fail(path, f"adapters[{i}] name {name!r} is not a library name (letters, digits, - and _); "
                        f"write name: {safe_name(name)}")
        if name in suite.adapters:
            _fail(path, f"adapter {name!r} is listed twice; give each adapter one entry")
        file = _resolve_path(base, raw["path"])
        refs = [str(_resolve_path(base, r)) for r in (raw.get("references") or [])]
        suite.adapters[name] = AdapterEntry(
            name=name, path=str(file), trigger=raw.get("trigger"), kind=raw.get("kind") or raw.get("category"),
            concept=raw.get("concept"), concept_prompt=raw.get("concept_prompt"), references=refs,
            weight=float(raw.get("weight", 1.0)),
        )
    if not suite.adapters and (data.get("adapter_sets") or data.get("combinations")):
        _fail(path, "adapter sets are given but no adapters: list their files under adapters:")

    # adapter sets: explicit and/or generated combinations
    valid = ", ".join(suite.adapters) or "none"
    for i, raw in enumerate(data.get("adapter_sets") or []):
        names = raw.get("adapters") if isinstance(raw, dict) else raw
        if not isinstance(names, list) or not names:
            _fail(path, f"adapter_sets[{i}] must be a list of adapter names (or {{id:, adapters: […]}})")
        names = [str(n) for n in names]
        set_id = str(raw.get("id")) if isinstance(raw, dict) and raw.get("id") else "+".join(names)
        suite.sets.append((set_id, names))
    if data.get("combinations"):
        suite.sets.extend(_combinations(path, data["combinations"]))
    if not suite.sets:
        suite.sets.append(("none", []))
    for set_id, names in suite.sets:
        for n in names:
            if n not in suite.adapters:
                _fail(path, f"adapter set {set_id!r} names unknown adapter {n!r}; valid: {valid}")
        if len(set(names)) != len(names):
            _fail(path, f"adapter set {set_id!r} lists an adapter twice")
    ids = [s for s, _ in suite.sets]
    dup = sorted({s for s in ids if ids.count(s) > 1})
    if dup:
        _fail(path, f"adapter set id(s) {', '.join(dup)} used twice; give each set a distinct id")

    # weights: a number (all adapters), null (preferred weights), or {name: weight}
    weights = data.get("weights", [None])
    suite.weights = weights if isinstance(weights, list) else [weights]
    from .schema import finite

    for w in suite.weights:
        if isinstance(w, dict):
            _weight_map(path, "weights", w, suite, limits.max_weight)
        elif w is not None and (isinstance(w, bool) or not isinstance(w, (int, float))):
            _fail(path, f"weight {w!r} is not a number, null or {{adapter: weight}}")
        elif w is not None:
            try:
                finite("weight", w, -limits.max_weight, limits.max_weight)
            except StudioError as e:
                _fail(path, str(e))

    # prompts
    raw_prompts = data.get("prompts")
    if not raw_prompts:
        _fail(path, "no prompts: give a list of texts (\"{triggers}\" inserts the set's trigger phrases)")
    for i, p in enumerate(raw_prompts):
        if not isinstance(p, (str, dict)) or (isinstance(p, dict) and not isinstance(p.get("text"), str)):
            _fail(path, f"prompts[{i}] must be text or {{id:, text:}} with text, got {p!r}"[:300])
        if len(p if isinstance(p, str) else p["text"]) > limits.max_prompt_chars:
            _fail(path, f"prompts[{i}] is over {limits.max_prompt_chars} characters; shorten it")
        if isinstance(p, dict):
            if "text" not in p:
                _fail(path, f"prompts[{i}] needs text:")
            suite.prompts.append((str(p.get("id", f"p{i}")), str(p["text"])))
            if p.get("sets") is not None:  # a prompt written for some adapter sets only
                only = [str(x) for x in (p["sets"] if isinstance(p["sets"], list) else [p["sets"]])]
                bad = sorted(set(only) - {s for s, _ in suite.sets})
                if bad:
                    _fail(path, f"prompts[{i}] sets: names unknown adapter set(s) {', '.join(bad)}; "
                                f"valid: {', '.join(s for s, _ in suite.sets)}")
                suite.prompt_sets[suite.prompts[-1][0]] = only
        else:
            suite.prompts.append((f"p{i}", str(p)))
    pids = [p for p, _ in suite.prompts]
    if len(set(pids)) != len(pids):
        _fail(path, "two prompts share an id; give each prompt a distinct id")
    for set_id, _ in suite.sets:
        if not any(set_id in suite.prompt_sets.get(pid, [set_id]) for pid in pids):
            _fail(path, f"adapter set {set_id!r} has no prompt: every prompt's sets: leaves it out")

    # methods
    raw_methods = data.get("methods") or ["merge"]
    for i, m in enumerate(raw_methods):
        if not isinstance(m, (str, dict)) or (isinstance(m, dict) and not isinstance(m.get("params") or {}, dict)):
            _fail(path, f"methods[{i}] must be a method name or {{name:, params: {{…}}, guidance: …, weights: {{…}}}}, "
                        f"got {m!r}"[:300])
        extra = sorted(map(str, set(m) - {"name", "params", "guidance", "weights"})) if isinstance(m, dict) else []
        if extra:
            _fail(path, f"methods[{i}] has unknown key(s) {', '.join(extra)}; valid: name, params, guidance, weights")
        spec = MethodSpec(str(m)) if not isinstance(m, dict) else MethodSpec(str(m.get("name")), dict(m.get("params") or {}))
        if isinstance(m, dict) and m.get("guidance") is not None:
            try:
                spec.guidance = finite(f"methods[{i}].guidance", m["guidance"], 0.0, limits.max_guidance)
            except StudioError as e:
                _fail(path, str(e))
        if isinstance(m, dict) and m.get("weights") is not None:
            if not isinstance(m["weights"], dict) or not m["weights"]:
                _fail(path, f"methods[{i}].weights must be {{adapter: weight}}, e.g. {{plus: 1.25}}, got {m['weights']!r}"[:300])
            spec.weights = _weight_map(path, f"methods[{i}].weights", m["weights"], suite, limits.max_weight)
        try:
            check_method_params(spec.params, f"methods[{i}].params")
        except StudioError as e:
            _fail(path, str(e))
        if spec.name not in COMPOSERS:
            _fail(path, f"unknown method {spec.name!r}; valid methods: {', '.join(COMPOSERS)}")
        try:
            make_composer(spec.name, spec.params)
        except StudioError as e:
            _fail(path, f"methods[{i}]: {e}")
        suite.methods.append(spec)

    metrics = data.get("metrics", list(METRICS))
    bad = [m for m in metrics if not isinstance(m, str) or m not in METRICS]
    if bad:
        _fail(path, f"unknown metric(s) {', '.join(map(str, bad))}; valid: {', '.join(METRICS)}")
    suite.metrics = list(metrics)
    if suite.scorer == "none":
        suite.metrics = [m for m in suite.metrics if m == "oracle"]
    from .base import resolve_sampler

    try:
        suite.sampler = resolve_sampler(suite.sampler)
    except StudioError as e:
        _fail(path, str(e))
    if suite.steps < 1 or suite.width % 8 or suite.height % 8:
        _fail(path, "steps must be ≥ 1 and size a multiple of 8")
    count = len(suite.sets) * len(suite.weights) * len(suite.prompts) * suite.samples * len(suite.methods)
    if count > limits.max_jobs:
        _fail(path, f"the suite expands to up to {count} jobs, over the bound of {limits.max_jobs}; lower samples, "
                    f"prompts or methods, or raise {env_name('max_jobs')}")
    return suite


def _weight_map(path: str, where: str, raw: dict, suite: Suite, max_weight: float) -> dict[str, float]:
    """{adapter: weight} checked: every name a suite adapter, every weight a finite number in range."""
    from .schema import finite

    out = {}
    for n, v in raw.items():
        if str(n) not in suite.adapters:
            _fail(path, f"{where} names unknown adapter {n!r}; valid: {', '.join(suite.adapters) or 'none'}")
        try:
            out[str(n)] = finite(f"{where}: {n}", v, -max_weight, max_weight)
        except StudioError as e:
            _fail(path, str(e))
    return out


def _combinations(path: str, spec: dict) -> list[tuple[str, list[str]]]:
    """Every choice of one adapter per category, over category subsets of the given sizes that
    contain the required categories (ComposLoRA's protocol)."""
    cats = spec.get("categories") or {}
    if not isinstance(cats, dict) or not cats:
        _fail(path, "combinations: needs categories: {category: [adapter, …]}")
    sizes = spec.get("n", [2])
    sizes = sizes if isinstance(sizes, list) else [sizes]
    if not all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= len(cats) for n in sizes):
        _fail(path, f"combinations: n must be whole numbers from 1 to {len(cats)}, got {sizes!r}"[:300])
    if not all(isinstance(v, list) for v in cats.values()):
        _fail(path, "combinations: categories: each category is a list of adapter names")
    require = spec.get("require") or []
    for r in require:
        if r not in cats:
            _fail(path, f"combinations: required category {r!r} is not one of {', '.join(cats)}")
    out = []
    for n in sizes:
        for chosen in itertools.combinations(list(cats), int(n)):
            if not set(require) <= set(chosen):
                continue
            for names in itertools.product(*[cats[c] for c in chosen]):
                if len(set(names)) == len(names):
                    out.append(("+".join(map(str, names)), [str(x) for x in names]))
    return out


def _weight_for(w, entry: AdapterEntry, method: MethodSpec) -> float:
    """The weights axis wins; otherwise the method's own weight for the adapter, then the adapter's."""
    preferred = method.weights.get(entry.name, entry.weight)
    if w is None:
        return preferred
    if isinstance(w, dict):
        return float(w.get(entry.name, preferred))
    return float(w)


def _weight_id(w) -> str:
    if w is None:
        return "wpref"
    if isinstance(w, dict):
        return "w" + "_".join(f"{k}{v:g}" for k, v in sorted(w.items()))
    return f"w{float(w):g}"


def trigger_phrases(suite: Suite, names: list[str]) -> list[str]:
    return [suite.adapters[n].trigger or n for n in names]


def fill_prompt(template: str, triggers: list[str]) -> str:
    """Insert the set's trigger phrases at ``{triggers}``; dangling commas are removed when there are none."""
    text = template.replace("{triggers}", ", ".join(triggers))
    text = re.sub(r"\s*,(\s*,)+", ",", text)
    return re.sub(r"\s{2,}", " ", text).strip(" ,")


def expand_jobs(suite: Suite, hashes: dict[str, str] | None = None) -> list[Job]:
    """The Cartesian product, ordered set → weight → prompt → sample → method, so a --limit keeps
    every method on the same seeds. Raises on duplicate job ids."""
    if hashes is None:
        hashes = hash_adapters(suite)
    jobs: list[Job] = []
    seen: dict[str, str] = {}
    seeds_used: set = set()
    seed_of: dict = {}
    for (set_id, names), w, (pid, ptext), sample in itertools.product(
        suite.sets, suite.weights, suite.prompts, range(suite.samples)
    ):
        if set_id not in suite.prompt_sets.get(pid, [set_id]):
            continue
        prompt = fill_prompt(ptext, trigger_phrases(suite, names))
        seed = seed_of.get((set_id, pid, sample))
        if seed is None:
            seed, salt = derive_seed(suite.base_seed, set_id, pid, sample), 0
            while (set_id, pid, seed) in seeds_used:  # a 32-bit collision between samples: rehash, not a false duplicate
                salt += 1
                seed = derive_seed(suite.base_seed, set_id, pid, f"{sample}#{salt}")
            seeds_used.add((set_id, pid, seed))
            seed_of[(set_id, pid, sample)] = seed
        for m in suite.methods:
            adapters = [{"name": n, "weight": _weight_for(w, suite.adapters[n], m), "sha256": hashes[n]} for n in names]
            guidance = suite.guidance if m.guidance is None else m.guidance
            resolved = {
                "method": m.name, "method_params": m.params, "adapters": adapters, "prompt": prompt,
                "negative_prompt": suite.negative_prompt, "seed": seed, "size": [suite.width, suite.height],
                "steps": suite.steps, "cfg": guidance, "scheduler": suite.sampler, "model": suite.model,
            }
            jid = job_id(resolved)
            where = f"set {set_id}, weight {_weight_id(w)}, prompt {pid}, sample {sample}, method {m.label}"
            if jid in seen:
                raise SuiteError(
                    f"{suite.path}: duplicate job {jid} ({where}) equals ({seen[jid]}); remove the repeated method, weight or prompt"
                )
            seen[jid] = where
            jobs.append(Job(
                job_id=jid, index=len(jobs), method=m.name, method_params=dict(m.params), method_label=m.label,
                loraset_id=set_id, adapters=adapters, weight_id=_weight_id(w), prompt_id=pid, prompt=prompt,
                negative_prompt=suite.negative_prompt, sample_idx=sample, seed=seed, steps=suite.steps,
                guidance=guidance, sampler=suite.sampler, width=suite.width, height=suite.height,
                model=suite.model,
            ))
    return jobs


def hash_adapters(suite: Suite) -> dict[str, str]:
    used = {n for _, names in suite.sets for n in names}
    out = {}
    for name in sorted(used):
        entry = suite.adapters[name]
        if not Path(entry.path).is_file():
            raise SuiteError(f"{suite.path}: adapter {name!r} file {entry.path} not found; fix its path: (relative to the suite file)")
        for ref in entry.references:
            if not Path(ref).is_file():
                raise SuiteError(f"{suite.path}: reference image {ref} of adapter {name!r} not found; fix references:")
        out[name] = entry.sha256 = addnet_hash(entry.path)
    return out


# ---------------------------------------------------------------------------------------------
# Files: atomic writes, JSONL with a possibly truncated last line, disk-full handling
# ---------------------------------------------------------------------------------------------
def _disk_guard(what: str):
    class _Guard:
        def __enter__(self):
            return self

        def __exit__(self, et, e, tb):
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                raise DiskFullError(f"disk full while writing {what}; free space and rerun with --resume (finished jobs are kept)") from e
            return False

    return _Guard()


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over the target."""
    with _disk_guard(str(path)):
        write_atomic(path, data, fsync=True)


def _jsonl_line(row: dict) -> str:
    """One results row as the run folder stores it."""
    return json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n"


def append_row(path: Path, row: dict) -> None:
    """Append one JSON line in a single write; a crash can only leave a truncated last line."""
    line = _jsonl_line(row)
    with _disk_guard(str(path)):
        with open(path, "ab") as f:
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())


def read_rows(path: Path) -> list[dict]:
    """Rows of a JSONL file; unparsable lines (a truncated last line after a crash) are dropped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "job_id" in row:
            rows.append(row)
    return rows


RETIRED = "results.retired.jsonl"  # rows of jobs the suite no longer holds (an adapter retrained, a scale changed)


def collect_rows(out: Path) -> dict[str, dict]:
    """Finished rows from results.jsonl, any rank files and the retired rows, first occurrence wins."""
    rows: dict[str, dict] = {}
    for p in [out / "results.jsonl", *sorted(out.glob("results.rank*.jsonl")), out / RETIRED]:
        for row in read_rows(p):
            rows.setdefault(row["job_id"], row)
    return rows


def merge_results(out: Path, jobs: list[Job]) -> list[dict]:
    """Write results.jsonl with exactly this suite's finished rows, in job order; drop rank files.

    Rows of jobs the suite no longer holds (after ``--resume`` with a retrained adapter or another CFG
    scale) move to ``results.retired.jsonl``: kept, and reused if the suite goes back, but never in the
    reports, where they would share a cell with the new rows of the same set and method label.
    A finished row takes its job's current ``method_label``: a method given ``weights`` for an adapter
    that a set does not hold draws the same job (same id) under a new label, and a resumed run must
    not show that column under two names."""
    rows = collect_rows(out)
    by_id = {j.job_id: j for j in jobs}
    current = sorted((r for r in rows.values() if r["job_id"] in by_id), key=lambda r: by_id[r["job_id"]].index)
    for row in current:
        row["method_label"] = by_id[row["job_id"]].method_label
    retired = [r for r in rows.values() if r["job_id"] not in by_id]
    if retired or (out / RETIRED).exists():
        atomic_write(out / RETIRED, "".join(map(_jsonl_line, retired)))
    atomic_write(out / "results.jsonl", "".join(map(_jsonl_line, current)))
    for p in out.glob("results.rank*.jsonl"):
        p.unlink()
    return current


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------
@dataclass
class RunSummary:
    out: str
    total: int
    done_before: int
    generated: int
    rows: int


def env_info(device: str, num_processes: int) -> dict:
    """Package versions, git SHA and device, for env.json."""
    import importlib.metadata as md
    import platform

    import torch

    versions = {}
    for pkg in ("torch", "diffusers", "transformers", "peft", "accelerate", "open_clip_torch", "safetensors",
                "numpy", "pillow", "pyyaml", "lora-composition-studio"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    git = {"sha": None, "dirty": None}
    try:
        git["sha"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip() or None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        git["dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"python": platform.python_version(), "platform": platform.platform(), "packages": versions, "git": git,
            "device": device, "gpu": gpu, "num_processes": num_processes,
            "threads": torch.get_num_threads(), "argv": sys.argv}


def resolved_config(suite: Suite, jobs: list[Job]) -> dict:
    d = {k: v for k, v in asdict(suite).items() if k not in ("adapters", "sets", "methods", "prompts", "prompt_sets")}
    d["adapters"] = {n: asdict(a) for n, a in suite.adapters.items()}
    d["adapter_sets"] = [{"id": s, "adapters": names} for s, names in suite.sets]
    d["methods"] = [{"name": m.name, "params": m.params, "guidance": m.guidance, "weights": m.weights, "label": m.label}
                    for m in suite.methods]
    d["prompts"] = [{"id": p, "text": t, **({"sets": suite.prompt_sets[p]} if p in suite.prompt_sets else {})}
                    for p, t in suite.prompts]
    d["jobs"] = len(jobs)
    d["seed_rule"] = "uint32 big-endian of sha256('{base_seed}|{loraset_id}|{prompt_id}|{sample_idx}')[:4]"
    return d


def load_studio(model: str, device=None):
    """A Studio for a suite's model: ``toy`` (must be built), ``tiny-sd1``/``tiny-sdxl`` (random, for tests), or a path/hub id."""
    from .base import build_tiny_pipeline
    from .studio import Studio

    if model == "toy":
        from .toyworld.paths import require_toy_model

        require_toy_model()
        return Studio.load(None, device=device)
    if model in ("tiny-sd1", "tiny-sdxl"):
        pipe = build_tiny_pipeline(model.split("-")[1]).to(device or "cpu")
        return Studio(pipe, model)
    return Studio.load(model, device=device)


def _load_oracle(mode: str, second: bool = False):
    """The shipped oracle (``second``: the independently trained oracle-b), or None when off or
    (mode auto) missing."""
    if mode == "off":
        return None
    try:
        from .toyworld.oracle import load_oracle
        from .toyworld.paths import ORACLE_B_DIR

        return load_oracle(ORACLE_B_DIR if second else None)
    except (ImportError, FileNotFoundError, StudioError) as e:
        if mode == "on":
            raise StudioError(f"the toy-world oracle is not available ({str(e).splitlines()[0][:160]}); build it with: python -m training.toyworld") from e
        return None


class Evaluator:
    """Everything loaded once per process: the studio with the suite's adapters, the scorer, the oracle."""

    def __init__(self, suite: Suite, device=None):
        from .metrics import Scorer

        self.suite = suite
        self.studio = load_studio(suite.model, device)
        used = {n for _, names in suite.sets for n in names}
        for name in sorted(used):
            e = suite.adapters[name]
            self.studio.adapters.load(e.path, name=name, weight=e.weight, kind=e.kind)
        clip_metrics = {"clipscore", "clipscore_hessel", "clip_prompt", "clip_t", "clip_i"} & set(suite.metrics)
        self.scorer = Scorer.load(suite.scorer, device or "cpu") if clip_metrics and suite.scorer != "none" else None
        self.oracle = _load_oracle(suite.oracle) if "oracle" in suite.metrics else None
        # its agreement with the first is reported when both are there
        self.oracle_b = _load_oracle("auto", second=True) if self.oracle is not None else None
        self._refs: dict[str, list] = {}

    def references(self, name: str) -> list:
        from PIL import Image

        if name not in self._refs:
            self._refs[name] = [Image.open(p).convert("RGB") for p in self.suite.adapters[name].references]
        return self._refs[name]

    def run_job(self, job: Job):
        """Generate one image; return (image, row)."""
        return self.run_jobs([job])[0]

    def run_jobs(self, jobs: list[Job]) -> list[tuple]:
        """Generate jobs that differ only in their seed as one batched request; [(image, row)].

        Each image equals its one-job twin within 1/255 per pixel (``Studio.run``); a row's
        ``seconds`` is the batch's time divided by its images (``batch`` says how many shared it)."""
        import torch

        job = jobs[0]
        if any(batch_key(j) != batch_key(job) for j in jobs):
            raise StudioError("run_jobs batches jobs that differ only in their seed")
        names = [a["name"] for a in job.adapters]
        start = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        result = self.studio.run(
            job.prompt, [(a["name"], a["weight"]) for a in job.adapters], method=job.method,
            method_params=job.method_params, steps=job.steps, guidance=job.guidance, width=job.width,
            height=job.height, seeds=[j.seed for j in jobs], negative_prompt=job.negative_prompt,
            sampler=job.sampler, progress=False, batch_size=len(jobs),
        )
        seconds = (time.perf_counter() - start) / len(jobs)
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        out = []
        for job, image, recipe in zip(jobs, result.images, result.recipes):
            row = {
                "job_id": job.job_id, "method": job.method, "method_label": job.method_label,
                "method_params": job.method_params, "effective": recipe.effective,
                "from_preset": recipe.from_preset, "loraset_id": job.loraset_id, "n_adapters": len(names),
                "loras": [{"name": a["name"], "type": self.studio.adapters.get(a["name"]).kind, "weight": a["weight"],
                           "sha256": a["sha256"], "shorthash": a["sha256"][:12]} for a in job.adapters],
                "weight_id": job.weight_id, "prompt_id": job.prompt_id, "prompt": job.prompt,
                "negative_prompt": job.negative_prompt, "sample_idx": job.sample_idx, "seed": job.seed,
                "generator_device": "cpu", "steps": job.steps, "cfg": job.guidance, "scheduler": job.sampler,
                "size": [job.width, job.height], "model": job.model, "image": f"images/{job.job_id}.png",
                "timing": {"seconds": round(seconds, 4), "batch": len(jobs),
                           "peak_vram_gb": None if peak is None else round(peak, 3),
                           "unet_calls": result.report.get("unet_calls", 0) // len(jobs)},
                "metrics": self.score(image, job, names),
            }
            out.append((image, row))
        return out

    def score(self, image, job: Job, names: list[str]) -> dict:
        from .metrics import compat_text
        from .prompts import parse_prompt

        s, m, out = self.suite, self.suite.metrics, {}
        if self.scorer is not None:
            emb = self.scorer.image_embeddings([image])[0]
            caption = parse_prompt(job.prompt)[0]
            if "clipscore" in m and names:
                out["clipscore"] = self.scorer.clipscore(image, compat_text(trigger_phrases(s, names)), "compat", emb).to_dict()
            if "clipscore_hessel" in m:
                out["clipscore_hessel"] = self.scorer.clipscore(image, caption, "hessel", emb).to_dict()
            if "clip_prompt" in m:
                out["clip_prompt"] = self.scorer.clipscore(image, caption, "raw", emb).to_dict()
            if "clip_t" in m and names:
                concepts = {n: s.adapters[n].concept_prompt or s.adapters[n].concept or s.adapters[n].trigger or n for n in names}
                out["clip_t"] = self.scorer.concept_scores(image, concepts, emb)
            if "clip_i" in m:
                refs = {n: self.references(n) for n in names if s.adapters[n].references}
                if refs:
                    out["clip_i"] = self.scorer.clip_i(image, refs, emb)
        if self.oracle is not None and names:
            out["oracle"] = oracle_presence(self.oracle, image, {n: s.adapters[n].concept for n in names},
                                            second=self.oracle_b)
        return out


def batch_key(job: Job) -> tuple:
    """What jobs must share to be drawn as one batched request: everything but the seed."""
    return (job.model, job.method, json.dumps(job.method_params, sort_keys=True, default=str),
            tuple((a["name"], a["weight"]) for a in job.adapters), job.prompt, job.negative_prompt,
            job.steps, job.guidance, job.sampler, job.width, job.height)


def batch_jobs(jobs: list[Job], size: int) -> list[list[Job]]:
    """Jobs grouped by ``batch_key`` (first-seen order), in batches of at most ``size``."""
    groups: dict[tuple, list[Job]] = {}
    for j in jobs:
        groups.setdefault(batch_key(j), []).append(j)
    return [g[i:i + size] for g in groups.values() for i in range(0, len(g), max(1, size))]


def rejudge(suite_path: str | os.PathLike, out: str | os.PathLike, log: Callable[[str], None] = print) -> int:
    """Judge a finished run's saved images again with the oracles now installed, and rewrite
    results.jsonl and the reports; nothing is generated. For an oracle rebuild: the run's images
    are kept, only the verdicts change. Returns the number of rows judged."""
    from PIL import Image

    suite = load_suite(suite_path)
    out = Path(out)
    if not (out / "results.jsonl").is_file():
        raise StudioError(f"{out} holds no results.jsonl; run the suite into it first (studio eval SUITE --out {out})")
    if any(out.glob("results.rank*.jsonl")):
        raise StudioError(f"{out} has unmerged rank files (an interrupted run); finish it with --resume first")
    jobs = expand_jobs(suite)
    rows = read_rows(out / "results.jsonl")
    oracle = _load_oracle("on")
    oracle_b = _load_oracle("auto", second=True)
    concepts = {n: e.concept for n, e in suite.adapters.items()}
    judged = 0
    for row in rows:
        names = [a["name"] for a in row.get("loras", [])]
        if "oracle" not in row.get("metrics", {}) or not names:
            continue
        missing = [n for n in names if n not in concepts]
        if missing:
            raise StudioError(f"{out}: row {row['job_id']} uses adapter(s) {missing} that {suite_path} does not list; "
                              "rejudge with the suite the run was made from")
        path = out / row["image"]
        if not path.is_file():
            raise StudioError(f"{path} is missing; rejudge needs every image of the run (rerun with --resume)")
        with Image.open(path) as im:
            image = im.convert("RGB")
        row["metrics"]["oracle"] = oracle_presence(oracle, image, {n: concepts[n] for n in names}, second=oracle_b)
        judged += 1
    atomic_write(out / "results.jsonl", "".join(map(_jsonl_line, rows)))
    write_reports(out, suite, jobs, rows)
    log(f"rejudged {judged} of {len(rows)} rows in {out}; rewrote results.jsonl and the reports")
    return judged


def oracle_presence(oracle, image, concepts: dict[str, str | None], second=None) -> dict:
    """Which adapters' concepts the toy-world oracle sees in the image; rates over known concepts.
    With ``second`` (the independently trained oracle-b) also its verdicts and whether the two
    oracles agree on every concept (``agree``)."""
    from .toyworld.concepts import concept_kind

    def judge(orc):
        pred = orc.predict([image])[0]
        present: dict[str, bool | None] = {}
        for name, word in concepts.items():
            try:
                concept_kind(word) if word else None
                present[name] = bool(orc.has_concept(pred, word)) if word else None
            except KeyError:
                present[name] = None
        return pred, present

    pred, present = judge(oracle)
    known = [v for v in present.values() if v is not None]
    out = {
        "present": present, "concept_rate": (sum(known) / len(known)) if known else None,
        "all_present": all(known) if known else None, "prediction": pred, "backend": "toyworld-oracle",
        "judges": {"oracle": getattr(oracle, "sha", None)},
    }
    if second is not None and known:
        _, present_b = judge(second)
        out["present_b"] = present_b
        out["all_present_b"] = all(v for v in present_b.values() if v is not None)
        out["agree"] = present == present_b
        out["judges"]["oracle_b"] = getattr(second, "sha", None)
    return out


def process_state():
    """accelerate's PartialState; on a machine without CUDA (or with ACCELERATE_USE_CPU) it is told
    to use CPU, which is what makes a multi-process launch form a gloo group there."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())


def check_run_inputs(suite: Suite, out: Path) -> None:
    """Before a run folder is made: it can be written, and every adapter the jobs use reads cleanly
    (format, dtypes, finite values); method parameters were checked by ``load_suite``."""
    from .adapters.formats import read_adapter
    from .cli import check_writable

    check_writable(out, folder=True)
    for name in sorted({n for _, names in suite.sets for n in names}):
        try:
            read_adapter(suite.adapters[name].path, name=name)
        except StudioError as e:
            raise SuiteError(f"{suite.path}: adapter {name!r}: {e}") from None


def run_suite(
    suite_path: str | os.PathLike,
    out: str | os.PathLike,
    resume: bool = False,
    limit: int | None = None,
    dry_run: bool = False,
    on_job: Callable[[Job, dict], None] | None = None,
    log: Callable[[str], None] = print,
    batch_size: int | None = None,
) -> RunSummary:
    """Run (or count) a suite into a run folder; see the module docstring for the layout."""
    suite = load_suite(suite_path)
    jobs = expand_jobs(suite)
    if limit is not None:
        if limit < 0:
            raise StudioError(f"--limit must be ≥ 0, got {limit}")
        jobs = jobs[:limit]
    out = Path(out)
    if dry_run:
        by_method: dict[str, int] = {}
        for j in jobs:
            by_method[j.method_label] = by_method.get(j.method_label, 0) + 1
        log(f"{len(jobs)} jobs: " + ", ".join(f"{k} {v}" for k, v in by_method.items())
            + f" ({len(suite.sets)} adapter sets × {len(suite.weights)} weights × {len(suite.prompts)} prompts × {suite.samples} samples"
            + (", each prompt only with the sets its sets: names)" if suite.prompt_sets else ")"))
        return RunSummary(str(out), len(jobs), 0, 0, 0)

    check_run_inputs(suite, out)  # the run folder is written only once everything it needs is known good
    state = process_state()
    has_results = (out / "results.jsonl").exists() or any(out.glob("results.rank*.jsonl"))
    if has_results and not resume:
        raise StudioError(f"{out} already holds results; pass --resume to continue it or choose a new --out folder")
    state.wait_for_everyone()
    if state.is_main_process:
        (out / "images").mkdir(parents=True, exist_ok=True)
        import yaml

        atomic_write(out / "config.resolved.yaml", yaml.safe_dump(resolved_config(suite, jobs), sort_keys=False, allow_unicode=True))
        atomic_write(out / "env.json", json.dumps(env_info(str(state.device), state.num_processes), indent=2))
        if has_results:
            merge_results(out, jobs)  # fold crashed rank files in; drops a truncated last line
    state.wait_for_everyone()
    done = collect_rows(out)
    pending = [j for j in jobs if j.job_id not in done or not (out / "images" / f"{j.job_id}.png").is_file()]
    done_before = len(jobs) - len(pending)
    if state.is_main_process:
        log(f"{len(jobs)} jobs, {done_before} already done, {len(pending)} to run on {state.num_processes} process(es)")

    generated = 0
    evaluator, batches = None, []
    if pending:
        from .studio import auto_batch_size

        device = suite.device or str(state.device)
        evaluator = Evaluator(suite, device)
        size = batch_size or auto_batch_size(device, suite.width, suite.height, evaluator.studio.pipe.vae_scale_factor)
        # batches are formed before the jobs are shared out, so an image is drawn in the same
        # batch (and so to the same bits) whatever the number of processes
        batches = batch_jobs(pending, size)
    with state.split_between_processes(batches, apply_padding=False) as mine:
        if mine:
            from .metadata import save_png

            rank_file = out / f"results.rank{state.process_index}.jsonl"
            for batch in mine:
                for job, (image, row) in zip(batch, evaluator.run_jobs(batch)):
                    with _disk_guard(f"images/{job.job_id}.png"):
                        save_png(image, out / "images" / f"{job.job_id}.png")
                    append_row(rank_file, row)
                    generated += 1
                    if on_job is not None:
                        on_job(job, row)
                    if state.is_main_process:
                        log(f"[{done_before + generated}/{len(jobs)}] {job.job_id} {job.method_label} {job.loraset_id} "
                            f"seed {job.seed}: {row['timing']['seconds']:.2f}s (batch of {len(batch)})")
    state.wait_for_everyone()
    rows = []
    if state.is_main_process:
        rows = merge_results(out, jobs)
        write_reports(out, suite, jobs, rows)
        log(f"wrote {out / 'results.jsonl'} ({len(rows)} rows), summary.csv" + (", report.html" if suite.report else ""))
    state.wait_for_everyone()
    return RunSummary(str(out), len(jobs), done_before, generated, len(rows))


# ---------------------------------------------------------------------------------------------
# Summary, grids, report
# ---------------------------------------------------------------------------------------------
def _metric_values(row: dict) -> dict[str, tuple[float, str]]:
    """(per-image value, aggregation) per summarised metric; CLIPScore aggregates from raw cosines."""
    m, out = row.get("metrics", {}), {}
    for name in ("clipscore", "clipscore_hessel", "clip_prompt"):
        if name in m:
            out[name] = (m[name]["raw_cos"], m[name]["convention"])
    for name in ("clip_t", "clip_i"):
        if m.get(name):
            out[name] = (m[name]["value"], "plain")
            out[name + "_min"] = (m[name]["min"], "plain")
    o = m.get("oracle")
    if o and o.get("concept_rate") is not None:
        out["concept_rate"] = (float(o["concept_rate"]), "plain")
        out["all_present"] = (float(o["all_present"]), "plain")
        if o.get("agree") is not None:
            out["all_present_b"] = (float(o["all_present_b"]), "plain")
            out["oracle_agree"] = (float(o["agree"]), "plain")
    t = row.get("timing", {})
    out["seconds"] = (float(t.get("seconds", math.nan)), "plain")
    if t.get("unet_calls") is not None:
        out["unet_calls"] = (float(t["unet_calls"]), "plain")
    return out


def summarize(rows: Iterable[dict]) -> list[dict]:
    """One record per (method, N, metric): mean (the convention's aggregate for CLIPScores), min, std, n."""
    from .metrics import aggregate, per_image

    groups: dict[tuple, dict[str, list]] = {}
    conv: dict[str, str] = {}
    for row in rows:
        key = (row.get("method_label", row["method"]), row.get("n_adapters", len(row.get("loras", []))))
        for name, (v, c) in _metric_values(row).items():
            groups.setdefault(key, {}).setdefault(name, []).append(v)
            conv[name] = c
    out = []
    for (method, n), metrics in sorted(groups.items()):
        for name, vals in metrics.items():
            c = conv[name]
            per = [per_image(v, c) for v in vals] if c != "plain" else vals
            mean = aggregate(vals, c) if c != "plain" else statistics.fmean(vals)
            out.append({"method": method, "n_adapters": n, "metric": name, "mean": mean, "min": min(per),
                        "std": statistics.pstdev(per) if len(per) > 1 else 0.0, "n": len(per)})
    return out


def write_reports(out: Path, suite: Suite, jobs: list[Job], rows: list[dict]) -> None:
    summary = summarize(rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["method", "n_adapters", "metric", "mean", "min", "std", "n"], lineterminator="\n")
    w.writeheader()
    for rec in summary:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in rec.items()})
    atomic_write(out / "summary.csv", buf.getvalue())
    header, body = summary_table(summary)
    md = "| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n" + "".join("| " + " | ".join(r) + " |\n" for r in body)
    atomic_write(out / "table.md", md)
    from . import composition_report

    judged = composition_report.judged(rows)
    if judged:  # per set and method, with 95 % intervals
        atomic_write(out / "composition.md", composition_report.markdown(judged))
    grids = write_grids(out, suite, jobs, rows) if suite.grids else []
    if suite.report:
        atomic_write(out / "report.html", report_html(suite, summary, grids, len(rows)))


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+\-]+", "_", s)[:120]


def write_grids(out: Path, suite: Suite, jobs: list[Job], rows: list[dict]) -> list[str]:
    """One PNG per (adapter set, weight, prompt): rows = methods, columns = samples."""
    from PIL import Image, ImageDraw

    done = {r["job_id"] for r in rows}
    combos: dict[str, list[Job]] = {}
    for j in jobs:
        if j.job_id in done and (out / "images" / f"{j.job_id}.png").is_file():
            combos.setdefault(j.combo, []).append(j)
    written = []
    head_h = 14
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    for combo, cjobs in combos.items():
        methods = list(dict.fromkeys(j.method_label for j in cjobs))
        samples = sorted({j.sample_idx for j in cjobs})
        cw, ch = cjobs[0].width, cjobs[0].height
        # the whole label, never cut: "merge[crescent=0.85]" cut short reads as another weight
        label_w = max(110, 8 + math.ceil(max(measure.textlength(m) for m in methods)))
        grid = Image.new("RGB", (label_w + cw * len(samples), head_h + ch * len(methods)), "white")
        draw = ImageDraw.Draw(grid)
        draw.text((2, 1), combo[: (label_w + cw * len(samples)) // 6], fill="black")
        for j in cjobs:
            r, c = methods.index(j.method_label), samples.index(j.sample_idx)
            with Image.open(out / "images" / f"{j.job_id}.png") as im:
                grid.paste(im.convert("RGB").resize((cw, ch)), (label_w + c * cw, head_h + r * ch))
        for r, m in enumerate(methods):
            draw.text((2, head_h + r * ch + ch // 2 - 5), m, fill="black")
        buf = io.BytesIO()
        grid.save(buf, format="PNG")
        name = f"grids/{_safe(combo)}.png"
        atomic_write(out / name, buf.getvalue())
        written.append(name)
    return written


REPORT_COLUMNS = [("all_present", "all present"), ("all_present_b", "all present (oracle B)"),
                  ("oracle_agree", "oracles agree"), ("concept_rate", "concept rate"), ("clipscore", "CLIPScore (compat)"),
                  ("clip_t", "CLIP-T mean"), ("clip_t_min", "CLIP-T min"), ("clip_i", "CLIP-I"),
                  ("seconds", "s / image"), ("unet_calls", "UNet calls")]


def summary_table(summary: list[dict]) -> tuple[list[str], list[list[str]]]:
    """A method × N table of means (the one in report.html and docs/benchmark.md)."""
    cells: dict[tuple, dict[str, float]] = {}
    for rec in summary:
        cells.setdefault((rec["method"], rec["n_adapters"]), {})[rec["metric"]] = rec["mean"]
    cols = [c for c in REPORT_COLUMNS if any(c[0] in v for v in cells.values())]
    header = ["method", "N", "images"] + [label for _, label in cols]
    counts = {(r["method"], r["n_adapters"]): r["n"] for r in summary if r["metric"] == "seconds"}
    body = []
    for key in sorted(cells, key=lambda k: (k[1], k[0])):
        v = cells[key]
        body.append([key[0], str(key[1]), str(counts.get(key, ""))] + [f"{v[c]:.3g}" if c in v else "" for c, _ in cols])
    return header, body


def report_html(suite: Suite, summary: list[dict], grids: list[str], n_rows: int) -> str:
    header, body = summary_table(summary)
    esc = html.escape
    table = "<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>" + "".join(
        "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in body) + "</table>"
    figs = "".join(f'<figure><img src="{esc(g)}"><figcaption>{esc(Path(g).stem)}</figcaption></figure>' for g in grids)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{esc(suite.name)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
figure{{display:inline-block;margin:6px}}img{{image-rendering:pixelated;max-width:100%}}</style></head><body>
<h1>{esc(suite.name)}</h1><p>{n_rows} images; model {esc(suite.model)}; scorer {esc(suite.scorer)}; {suite.steps} steps,
CFG {suite.guidance:g}, {esc(suite.sampler)}. CLIPScore (compat) = max(100·mean(cos), 0) on the joined trigger phrases;
use it as a sanity metric only.</p>{table}<h2>Grids (rows: methods, columns: samples)</h2>{figs}
<p>Details per image: results.jsonl; groups: summary.csv; environment: env.json.</p></body></html>
"""


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def cmd_eval(args) -> int:
    if args.rejudge:
        rejudge(args.suite, args.out)
        return 0
    run_suite(args.suite, args.out, resume=args.resume, limit=args.limit, dry_run=args.dry_run,
              batch_size=args.batch_size)
    return 0


def add_cli(subparsers) -> None:
    """``studio eval SUITE.yaml --out RUNDIR [--resume] [--limit N] [--dry-run] [--batch-size N] [--rejudge]``."""
    p = subparsers.add_parser("eval", help="run an evaluation suite (resumable; accelerate launch for several processes)")
    p.add_argument("suite", help="suite YAML (see workflows/)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue a run folder, skipping finished jobs")
    p.add_argument("--limit", type=int, default=None, help="run only the first N jobs")
    p.add_argument("--dry-run", action="store_true", help="print the job count and exit")
    p.add_argument("--rejudge", action="store_true",
                   help="judge a finished run's saved images again with the installed oracles (after an oracle "
                        "rebuild) and rewrite results.jsonl and the reports; generates nothing")
    p.add_argument("--batch-size", type=int, default=None,
                   help="jobs that differ only in their seed drawn together, at most this many (default: auto; 1: one by one)")
    p.set_defaults(func=cmd_eval)
