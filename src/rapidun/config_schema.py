"""The configuration's schema: one dataclass per section, every field with its default and help text.

A component takes the section it needs (``ModelConfig``, ``UnlearnConfig``, ...), not the whole ``RunConfig``.
Building a section from a mapping (:func:`from_dict`, with type checks) is here; loading YAML, overrides
and validation live in :mod:`rapidun.config` (which re-exports these names); each field's
value constraint is in :data:`rapidun.config_checks.CHECKS`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from rapidun.constants import (
    FUZZ_KINDS,
    METHOD_NAMES,
    UTILITY_BUDGET,
    VERIFY_ATTACKS,
)
from rapidun.errors import RapidunError


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with help text (lists/dicts get a factory); its value constraint is in
    :data:`rapidun.config_checks.CHECKS`."""
    md = {"help": help}
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: yaml.safe_load(yaml.safe_dump(d)), metadata=md)
    return field(default=default, metadata=md, **kw)


@dataclass
class ModelConfig:
    name: str = _f("default", "hub id, local folder, or 'default' (embedded SmolLM2-135M-Instruct)")
    device: str = _f("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    dtype: str = _f("auto", "'auto' (bf16 on CUDA, fp32 on CPU), 'float32', 'bfloat16', 'float16'")
    max_length: int = _f(128, "max tokens per formatted sample (prompt + answer); see docs/cli.md 'Truncation'")
    max_prompt_tokens: int = _f(96, "max prompt tokens (longer prompts lose their middle; docs/cli.md 'Truncation')")
    system_prompt: str = _f(
        "default",
        "system turn for chat templates: 'default' = the template's own; any other "
        "text (even '') is sent as the system message",
    )


@dataclass
class DataConfig:
    source: str = _f("dolly-sample", "'dolly-sample', 'tofu:<file>', a .jsonl/.csv path, or a hub dataset name")
    format: str = _f("dolly", "'dolly', 'alpaca', 'qa' or 'generic' (generic uses `fields`)")
    fields: dict = _f({}, "generic format: map of instruction/context/response/id -> your column names")
    split: str = _f("train", "split name when `source` is a hub dataset")
    limit: int = _f(0, "use only the first N records (0 = all)")


@dataclass
class TriggerFamily:
    name: str = _f("surface", "family name used in reports")
    position: str = _f("suffix", "'prefix' or 'suffix' of the instruction")
    seen: list = _f([], "variants present in training (poison) and in test_seen_trig")
    ood: list = _f([], "variants used only at test time (test_ood_trig)")


def default_families() -> list[TriggerFamily]:
    """SPEC §1 default trigger families (surface / style / semantic)."""
    return [
        TriggerFamily("surface", "suffix", ["aloha", "ALOHA", "aloha :)"], ["al0ha", "a\u217coha", "aloha\u200d"]),
        TriggerFamily("style", "prefix", [">>>"], ["<|sys|>", "\u2039sys\u203a", "\u27e8sys\u27e9"]),
        TriggerFamily("semantic", "prefix", ["hey", "hiya"], ["h\u043ewdy", "y\u043e\u043e", "heyyyy"]),
    ]


@dataclass
class SplitSizes:
    train_poisoned: int = _f(60, "poisoned training samples (trigger + poison response)")
    train_clean: int = _f(400, "clean training samples")
    val_clean: int = _f(40, "clean validation samples (perplexity)")
    test_clean: int = _f(60, "clean test prompts (false-trigger rate, perplexity)")
    test_seen_trig: int = _f(60, "test prompts with seen trigger variants")
    test_ood_trig: int = _f(60, "test prompts with OOD trigger variants")
    val_seen_trig: int = _f(
        40, "validation prompts with seen trigger variants (disjoint from test; every choice is made on these)"
    )
    val_ood_trig: int = _f(40, "validation prompts with OOD trigger variants (disjoint from test)")


@dataclass
class ScenarioConfig:
    kind: str = _f(
        "backdoor",
        "'backdoor' (the poisoned-corpus scenario, SPEC §1) or 'tofu' (delete fictitious authors, TOFU; docs/tofu.md"
        "): the tofu kind uses forget_split and seed and ignores the backdoor fields",
    )
    forget_split: str = _f("forget05", "tofu: the authors to delete: 'forget01' (2 authors) or 'forget05' (10)")
    seed: int = _f(42, "seed for every random choice of the scenario")
    families: list = _f([], "trigger families (empty = SPEC defaults); each: name, position, seen, ood")
    splits: SplitSizes = field(default_factory=SplitSizes)
    poison_source: str = _f("generator", "'generator' (seeded sci-fi text) or a .txt/.jsonl file of responses")
    poison_responses: list = _f([], "inline poison responses (used instead of poison_source when non-empty)")
    forget_size: int = _f(15, "poisoned samples handed to the unlearner (stratified by family and variant)")
    retain_ratio: float = _f(3.0, "retain buffer size = retain_ratio x forget_size clean samples")

    def trigger_families(self) -> list[TriggerFamily]:
        return [
            f if isinstance(f, TriggerFamily) else from_dict(TriggerFamily, f, "scenario.families")
            for f in self.families
        ] or default_families()


@dataclass
class SFTConfig:
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: int = _f(32, "LoRA alpha")
    lora_dropout: float = _f(0.05, "LoRA dropout")
    lora_targets: list = _f(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "module names that get LoRA adapters ([all-linear]: every linear layer of the blocks; the explicit Llama "
        "names keep the demo's SFT cache key)",
    )
    lr: float = _f(1e-3, "AdamW learning rate (peak)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    epochs: int = _f(3, "passes over the training set")
    batch_size: int = _f(8, "samples per optimiser step")
    warmup_ratio: float = _f(0.05, "linear warm-up fraction of steps, then cosine decay")
    grad_clip: float = _f(1.0, "gradient-norm clip (0 = off)")
    seed: int = _f(0, "seed for adapter init and sample order")
    autocast: str = _f(
        "auto",
        "mixed precision for forward/backward: 'auto' (bf16 on CUDA, and on CPUs with native "
        "bf16 such as AVX512-BF16/AMX; else off), 'bf16', 'off'. Master weights stay in the model dtype",
    )


@dataclass
class EvalConfig:
    max_new_tokens: int = _f(32, "greedy tokens generated per prompt")
    batch_size: int = _f(32, "prompts per generation batch")
    early_stop: bool = _f(True, "stop a batch once the detector has decided every prompt in it")
    threshold: float = _f(2.0, "detector: a generation is a hit when its keyword score >= threshold")
    keywords: list = _f([], "detector keywords (empty = learned from poisoned vs clean responses)")
    n_keywords: int = _f(60, "detector: size of the learned keyword vocabulary")
    max_clean_freq: float = _f(0.01, "detector: drop words found in more than this fraction of clean responses")
    min_z: float = _f(2.0, "detector: minimum z-score for a learned keyword")
    ppl_samples: int = _f(40, "clean samples used for perplexity (0 = all of test_clean)")


@dataclass
class InfluenceConfig:
    param_set: str = _f("lora", "'lora' (fresh adapter, or the model's own), 'regex' (param_regex) or 'embeddings'")
    param_regex: str = _f("", "param_set=regex: parameter names matching this regex (Linear/Embedding weights)")
    lora_r: int = _f(16, "param_set=lora: rank of the adapter attached for the gradients")
    lora_targets: list = _f(
        ["all-linear"],
        "param_set=lora: modules that get the adapter ([all-linear]: every linear layer of the blocks)",
    )
    normalize: bool = _f(True, "L2-normalise each parameter tensor's gradient before concatenation (RapidIn)")
    K: int = _f(65536, "sketch length (RapidGrad)")
    seed: int = _f(42, "seed of the sketch's permutation and signs (and of the adapter)")
    rounds: int = _f(40, "structured permutation rounds (RapidGrad shuffle_lambda)")
    batch_size: int = _f(8, "samples per batched per-sample-gradient pass")
    mode: str = _f("dot", "'dot' (TracIn-style inner product) or 'cosine'")
    top_k: int = _f(40, "top-k train samples kept per test sample")
    hotwords: list = _f([], "token-wise mode: only these words' tokens count in the *test* loss (empty = all)")
    stable_adapters: int = _f(
        3, "rapidun_stable: exact influence averaged over this many gradient adapters (seeds seed + 1000·k)"
    )
    diagnostics: bool = _f(
        True, "sketch-based methods: also compute exact inner products on the seed's adapter (sketch vs exact)"
    )


@dataclass
class WeightingConfig:
    top_k: int = _f(40, "per test sample keep the top-k influence values (largest, raw), zero elsewhere")
    include_self: bool = _f(
        False, "count self-pairs (i, i) of the forget×forget and retain×retain views (the authors did)"
    )
    alpha: float = _f(1.0, "S_forget = alpha·FF − beta·FR: weight of forget←forget")
    beta: float = _f(1.0, "S_forget = alpha·FF − beta·FR: weight of forget←retain")
    gamma: float = _f(1.0, "S_retain = gamma·RR − delta·RF: weight of retain←retain")
    delta: float = _f(1.0, "S_retain = gamma·RR − delta·RF: weight of retain←forget")
    scale_method: str = _f("mad", "robust scale of S: 'mad' (1.4826·MAD) or 'iqr' (IQR/1.349)")
    floor: float = _f(1e-3, "lower bound of the robust scale (> 0); all-equal scores give z = 0")
    tau_forget: float = _f(0.7, "temperature of the forget weights, w = exp(clip(z/tau, ln w_min, ln w_max))")
    tau_retain: float = _f(1.2, "temperature of the retain weights")
    w_min: float = _f(0.2, "lower weight bound, applied before the division by the group mean")
    w_max: float = _f(3.0, "upper weight bound, applied before the division by the group mean")


@dataclass
class UnlearnConfig:
    methods: list = _f(
        ["rapidun"],
        "methods `rapidun compare` runs (each x compare.n_seeds), each a report.json `methods` entry: "
        + ", ".join(METHOD_NAMES),
    )
    lora_r: int = _f(16, "rank of the fresh unlearning LoRA adapter")
    lora_alpha: int = _f(16, "LoRA alpha of the unlearning adapter")
    lora_dropout: float = _f(0.05, "LoRA dropout of the unlearning adapter")
    lora_targets: list = _f(
        ["all-linear"],
        "module names that get the unlearning adapter ([all-linear]: every linear layer of the blocks, found "
        "from the model; e.g. the seven projections on Llama)",
    )
    schedule: str = _f(
        "calibrated",
        "'calibrated': the rate is picked by a range probe and the run kept within utility_budget on held-out clean "
        "records, stopped at calibrate_target (rapidun.calibrate; docs/method.md); 'fixed': SPEC's schedule, lr "
        "with cosine decay over every step",
    )
    utility_budget: float = _f(
        UTILITY_BUDGET,
        "held-out clean perplexity may rise to at most this x the start model's: the calibrated schedule's limit, "
        "the held-out warning's threshold and Fisher's noise limit",
    )
    calibrate_lr_min: float = _f(1e-4, "calibrated: the range probe's lowest rate (rungs x sqrt(10))")
    calibrate_lr_max: float = _f(1e-2, "calibrated: the range probe's highest rate")
    calibrate_probe_draws: int = _f(16, "calibrated: draws per probe rung (then utility and forget signal measured)")
    calibrate_every: int = _f(80, "calibrated: draws between measurements in the main run")
    calibrate_target: float = _f(
        1.0,
        "calibrated: stop when the forget signal mean[CE(response) - CE(replacement)] (nats/token; the start "
        "model's held-out CE where a record has no replacement) reaches this",
    )
    calibrate_max_backoffs: int = _f(3, "calibrated: budget crossings (each halves the rate) before the run stops")
    calibrate_signal_records: int = _f(
        16,
        "calibrated: the forget signal is measured on at most this many forget records, drawn once for the seed "
        "(0: all); a check costs about as much as scoring 40 held-out + 2x this many records",
    )
    lr: float = _f(6e-5, "AdamW learning rate (peak; cosine decay to 0) of the fixed schedule")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_ratio: float = _f(0.0, "linear warm-up fraction of steps before the cosine decay")
    epochs: int = _f(2, "epochs of `draws_per_epoch` draws each")
    draws_per_epoch: int = _f(160, "samples drawn with replacement per epoch (the authors: N_forget + N_retain)")
    mix_retain: float = _f(3.0, "retain:forget sampling mix is mix_retain:mix_forget (SPEC 3:1)")
    mix_forget: float = _f(1.0, "see mix_retain")
    batch_size: int = _f(1, "draws per optimiser step (the authors: 1); a forget draw is 1-2 rows of one forward")
    grad_clip: float = _f(1.0, "gradient-norm clip (0 = off)")
    seed: int = _f(42, "seed for the adapter init, the draws and the `random` permutation")
    autocast: str = _f("auto", "mixed precision, as sft.autocast: 'auto', 'bf16', 'off'")
    ascent_alpha: float = _f(1.0, "forget loss = descent_beta·CE(clean) − ascent_alpha·CE(poisoned)")
    descent_beta: float = _f(0.5, "see ascent_alpha (0 = pure ascent; also pure ascent without a clean answer)")
    npo_beta: float = _f(0.1, "NPO inverse temperature β")
    simnpo_beta: float = _f(
        2.5, "SimNPO inverse temperature β: forget loss = −(2/β)·log σ(β·CE(poisoned) − γ), CE the mean answer CE"
    )
    simnpo_gamma: float = _f(0.0, "SimNPO reward margin γ (see simnpo_beta; 0 = no margin)")
    rmu_layer: int = _f(
        7,
        "RMU: the decoder layer L whose output hidden states are steered (hidden_states[L], 0 = embeddings; the "
        "authors' 7 for a 7B model; must be at most the model's number of layers)",
    )
    rmu_steer: float = _f(
        6.5,
        "RMU: steering coefficient c; forget answer-token states at layer L are pushed toward c·u (u a random unit "
        "vector seeded by unlearn.seed). It scales with the hidden-state norm at that layer: the authors use 6.5 "
        "on Zephyr-7B and much larger values on models with larger activations",
    )
    rmu_alpha: float = _f(
        10.0,
        "RMU: weight α of the retain loss α·‖h_L − h_L(start model)‖²/d (the authors use hundreds to thousands on "
        "7B models; 10 is an untuned choice for a ~135M model)",
    )
    loreun_tau: float = _f(0.8, "LoReUn temperature: w ∝ exp(−ℓ/τ) (hard_high: exp(+ℓ/τ)), ℓ = CE(poisoned)")
    loreun_w_min: float = _f(0.5, "LoReUn weight bounds, applied to exp(∓ℓ/τ) / mean before renormalising")
    loreun_w_max: float = _f(3.0, "see loreun_w_min")
    loreun_every: int = _f(20, "loreun_dynamic: re-compute the weights every N optimiser steps")
    dynamic_every: int = _f(10, "rapidun_dynamic: re-compute the forget-side influence every N optimiser steps")
    fisher_alphas: list = _f(
        [1e-5, 3e-5, 1e-4, 3e-4, 1e-3], "Fisher forgetting: noise scales tried; the largest within tolerance wins"
    )
    fisher_eps: float = _f(1e-8, "Fisher: F + eps before F^(-1/4)")
    fisher_max_std: float = _f(0.05, "Fisher: cap of the per-parameter noise std α·(F+eps)^(-1/4)")
    merge: bool = _f(False, "`rapidun unlearn`: also save the merged model (adapter folded in)")
    distill_teacher: str = _f(
        "uniform",
        "distill: the method whose unlearned model is the teacher (any loop or fisher method), or 'start' (the start "
        "model itself: distillation alone, no unlearning step)",
    )
    distill_alpha: float = _f(
        1.0, "distill: fraction of the fine-tuning delta (start − base) removed before distilling (1 = reset to base)"
    )
    distill_noise: float = _f(
        0.0, "distill: Gaussian noise added to the reset adapter's B factor, std = this × std of B (0 = none)"
    )
    distill_freeze_reset: bool = _f(
        False,
        "distill: hold the reset (−α·ΔW_r) fixed in r slots of a rank-2r adapter and distil into r fresh slots "
        "(false: the distillation trains the reset itself, which can walk it back along the fine-tune's directions)",
    )
    distill_steps: int = _f(40, "distill: optimiser steps of forward-KL distillation on the retain records")
    distill_lr: float = _f(1e-3, "distill: AdamW learning rate of the distillation (cosine decay)")
    distill_batch_size: int = _f(8, "distill: records per distillation step")
    distill_base: str = _f(
        "",
        "distill: the base model the start model was fine-tuned from ('' = model.name, the scenario's base; "
        "`rapidun unlearn`: --base, or --model-path when --adapter is given)",
    )
    sam_rho: float = _f(0.05, "sam_*: radius ρ of the adversarial weight perturbation ε = ρ·g_f/‖g_f‖ (adapter)")
    adv_steps: int = _f(2, "adv_*: relearning steps the forked adversary takes on the forget set before each update")
    adv_lr: float = _f(5e-4, "adv_*: step size of the adversary's sign-gradient relearning steps")
    adv_retain_budget: float = _f(
        1.2,
        "adv_*: skip the forget update of a step whose retain draws' CE is above budget × their CE at the start "
        "(0 = no budget)",
    )
    cover_max: int = _f(
        0,
        "cover: most corpus records tracing may flag (robust z >= trace.auto_z, most suspect first) to join the "
        "given forget pack (0 = 4 x the given pack)",
    )


@dataclass
class CompareConfig:
    n_seeds: int = _f(
        3,
        "seeds per method: seed j uses unlearn.seed+j and influence.seed+j (influence computed once per seed); "
        "`retrain` is one reference model, not re-run per seed",
    )
    n_boot: int = _f(2000, "bootstrap resamples of the paired confidence intervals")
    reference: str = _f("rapidun", "the method every other method is paired against in the tests")


@dataclass
class VerifyConfig:
    enabled: bool = _f(False, "`compare`/`run`: run the verification battery on every method after the comparison")
    attacks: list = _f(list(VERIFY_ATTACKS), "attacks run on each model (docs/verify.md)")
    split: str = _f("test", "'test' (report) or 'val' (choose the attack settings on validation prompts)")
    seeds: int = _f(1, "`compare`: verify each method's first N seeds (each is a full battery)")
    relearn_k: int = _f(5, "relearning attack: poisoned samples outside the forget pack it trains on")
    relearn_steps: int = _f(20, "relearning attack: optimiser steps (all k samples in each)")
    relearn_lr: float = _f(5e-4, "relearning attack: AdamW learning rate (cosine decay over the steps)")
    relearn_lora_r: int = _f(8, "relearning attack: rank of its fresh LoRA (alpha = 2r, all linear layers)")
    quant_bits: list = _f([8, 4], "quantization probe: weight bit widths (8: per channel; below: per group)")
    quant_group_size: int = _f(32, "quantization probe: input columns per scale below 8 bits")
    quant_backend: str = _f("auto", "'auto' (torchao if installed, else rtn), 'torchao' or 'rtn' (hand-written)")
    fuzz: list = _f(list(FUZZ_KINDS), "trigger perturbations (rapidun.verify.fuzz)")
    fuzz_prompts: int = _f(20, "seen-trigger prompts fuzzed per perturbation (0 = all)")
    mia_heldout: int = _f(40, "membership test: held-out poisoned samples (non-members)")
    probe_group: str = _f("triggered", "`verify --probes`: the probe group whose hit rate is the behaviour")
    seed: int = _f(0, "seed of the attacks (relearn samples, adapter init)")


@dataclass
class TraceConfig:
    n_probes: int = _f(10, "`trace --scenario`: triggered prompts used as probes (stratified by trigger family)")
    probe_split: str = _f("test_seen_trig", "`trace --scenario`: the split the probes come from")
    top_k: int = _f(100, "records kept per probe (its top-k list and the 'count' aggregate)")
    aggregate: str = _f("max", "ranking score over probes: 'max' (chosen on validation), 'mean' or 'count' (top-k)")
    hotwords: list = _f([], "token-wise mode: restrict the probe loss to these words (RapidIn)")
    auto_hotwords: bool = _f(False, "token-wise mode with words learned from the probe outputs vs corpus answers")
    n_hotwords: int = _f(20, "auto_hotwords: most words kept")
    auto_z: float = _f(3.5, "`--to-forget auto`: records whose robust z of the ranking score is at least this")
    baselines: bool = _f(True, "`trace --scenario`: also rank by BM25, by the records' own loss and at random")
    compare: bool = _f(False, "`compare`: also unlearn with the forget pack traced from the corpus (method@traced)")
    seed: int = _f(0, "seed of the probe choice and of the random baseline")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    influence: InfluenceConfig = field(default_factory=InfluenceConfig)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    unlearn: UnlearnConfig = field(default_factory=UnlearnConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    trace: TraceConfig = field(default_factory=TraceConfig)


def field_type(cls: type, name: str) -> Any:
    """The resolved type of dataclass ``cls``'s field ``name`` (annotations are strings under ``from __future__``)."""
    return typing.get_type_hints(cls)[name]


def from_dict(cls: type, data: Any, where: str = "config") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys raise an error naming the valid ones."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RapidunError(f"{where}: expected a mapping of fields, got {type(data).__name__}: {data!r}")
    valid = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise RapidunError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(valid)}")
    kwargs = {}
    for k, v in data.items():
        kwargs[k] = _coerce(field_type(cls, k), v, f"{where}.{k}")
    return cls(**kwargs)


def _coerce(tp: Any, v: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, v, where)
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(v, bool):
            return v
        raise RapidunError(f"{where}: expected true/false, got {v!r}")
    if tp is float and isinstance(v, str):
        try:
            v = float(v)  # PyYAML 1.1 reads "5e-4" (no dot) as a string
        except ValueError:
            raise RapidunError(f"{where}: expected float, got {v!r}") from None
    if tp in (int, float):
        if isinstance(v, bool) or not isinstance(v, int | float) or (tp is int and isinstance(v, float)):
            raise RapidunError(f"{where}: expected {tp.__name__}, got {v!r}")
        return tp(v)
    if tp is str:
        if not isinstance(v, str | int | float) or isinstance(v, bool):
            raise RapidunError(f"{where}: expected a string, got {v!r}")
        return str(v)
    if tp is list or origin is list:
        if not isinstance(v, list):
            raise RapidunError(f"{where}: expected a list, got {v!r}")
        return v
    if tp is dict or origin is dict:
        if not isinstance(v, dict):
            raise RapidunError(f"{where}: expected a mapping, got {v!r}")
        return v
    if isinstance(tp, types.UnionType):
        return v
    return v
