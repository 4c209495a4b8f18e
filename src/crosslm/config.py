"""Every setting of a run, in one place: dataclasses with help text, loaded from YAML plus `--set` overrides.

The resolved config is saved with every run (config.yaml in the run directory), so a result can always be
traced back to the exact settings that produced it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from crosslm.errors import ConfigError
from crosslm.methods import METHOD_NAMES, METHODS
from crosslm.precision import COMPUTE_DTYPES, DEVICE_NAME

MISSING_LABEL_RULES = ("empty", "skip", "fill")
DISTILL_SOURCES = ("splus", "pool")
"""distill.source: what an enhanced SLM is distilled on (crosslm.server.update.distillation_set)."""
LABELLERS = ("slms", "llm", "generator")
"""distill.labeller: whose posteriors over labels (one, or several joined by '+') filter and soft-label the
distilled texts."""
"""What S+ does when some label has no qualifying sample (crosslm.server.feedback.select_good)."""
TAU_AUTO_FACTOR = 1.2
"""feedback.tau: auto = TAU_AUTO_FACTOR / number of labels."""
PRECISION_KEYS = (
    "generation.dtype",
    "eval.llm_dtype",
    "tune.autocast",
    "clients.autocast",
    "distill.autocast",
)
"""The keys naming a compute dtype (COMPUTE_DTYPES). Their `auto` resolves per machine, so a finished
cell's `auto` is compared by what it resolved to (crosslm.experiment.grid.config_drift)."""


def option(default: Any, help: str) -> Any:
    """A dataclass field with help text (shown by `crosslm run --help-config`)."""
    if isinstance(default, list | dict):
        return field(
            default_factory=functools.partial(type(default), default), metadata={"help": help}
        )  # a copy per instance
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    dataset: str = option(
        "rotten-tomatoes",
        "Catalogue name (see `crosslm datasets`), a Hugging Face dataset id, or a local CSV/JSONL/Parquet file.",
    )
    text_column: str = option("text", "Text column, for Hugging Face ids and local files.")
    label_column: str = option("label", "Label column, for Hugging Face ids and local files.")
    hf_split: str = option("train", "Split to read from a Hugging Face dataset id.")
    task_description: str = option(
        "",
        "What the texts are, e.g. 'patient reviews of a medicine': the LLM writes training data from it and "
        "the label names. Required for a dataset outside the catalogue (the catalogue tasks carry their own).",
    )
    label_descriptions: dict = option(
        {}, "Optional label -> description d(y) used in generation prompts (non-catalogue datasets)."
    )
    generation_prompt: str = option(
        "", "Optional generation prompt template with {description}; empty = the task's default."
    )
    num_clients: int = option(4, "Number of clients K.")
    dirichlet_alpha: float = option(
        0.5, "Label skew: Dirichlet(alpha) over labels per client; smaller = more skewed."
    )
    train_per_client: int = option(150, "Private training examples per client.")
    test_per_client: int = option(
        100, "Private test examples per client (same label mix as its training data)."
    )
    global_test_size: int = option(500, "Size of the global test split, kept apart from every client.")
    max_chars: int = option(
        300,
        "Texts are cut to this many characters: long news articles would dominate the SLM and LLM passes "
        "(the catalogue's review and question texts are all shorter).",
    )
    input_column: str = option(
        "input", "Generation datasets: the input column (e.g. an article's lead), for HF ids and local files."
    )
    target_column: str = option(
        "",
        "Generation datasets: the target column (e.g. the headline), for HF ids and local files. Setting it "
        "makes a dataset outside the catalogue a generation task (input -> target); empty = classification.",
    )
    condition_column: str = option(
        "",
        "Generation datasets: optional condition column (e.g. the topic); the clients' Dirichlet skew is over "
        "its values and the LLM is prompted per value. Empty = every example has the one condition 'all'.",
    )
    max_input_chars: int = option(
        300,
        "Generation inputs are cut to this many characters at a word boundary (bbc-headlines: the lead, the "
        "first two paragraphs, ~70 SmolLM2 tokens at 300); 0 = no cut.",
    )
    max_target_chars: int = option(
        150,
        "Generation targets longer than this many characters are refused with a DataError naming the rows "
        "(bbc-headlines' longest headline has 52); raise it for long targets such as summaries.",
    )


@dataclass
class ClientConfig:
    slms: list = option(
        ["minilm-l6", "minilm-l6", "minilm-l3", "minilm-l3"],
        "SLM per client (catalogue name, HF id or path); cycled if shorter than num_clients.",
    )
    speeds: list = option(
        [1.0, 1.5, 2.5, 4.0],
        "Compute-time factor per client (virtual clock); cycled. Larger = slower.",
    )
    network_delays: list = option(
        [1.0, 2.0, 3.0, 5.0], "One-way network delay per client in virtual seconds; cycled."
    )
    epochs: int = option(5, "Local epochs E per local round.")
    lr: float = option(2e-4, "Local learning rate (AdamW).")
    batch_size: int = option(16, "Local batch size.")
    max_length: int = option(128, "SLM max tokens per text.")
    upload_dtype: str = option("float16", "Weight dtype on the wire: float16 or float32.")
    autocast: str = option(
        "auto",
        "Local training compute dtype: float32, bfloat16 (torch autocast, float32 weights and optimizer), "
        "or auto (bfloat16 where it runs faster here).",
    )
    device: str = option(
        "auto", "Where clients train and evaluate: auto (CUDA when available), cpu, cuda or cuda:N."
    )
    logit_adjust: float = option(
        0.0,
        "Logit adjustment t of local training: the loss sees logits + t * log(label prior of the client's "
        "data), so a label-skewed client is not pulled toward its majority labels (0 = plain cross-entropy).",
    )
    extra_local_epochs: int = option(
        0,
        "Extra local epochs on private data after each server reply (the standalone baseline's matched effort).",
    )
    validation_fraction: float = option(
        0.5,
        "Share of the client's own texts (from clients.validation_source, stratified, never trained on) held "
        "out to decide whether an enhanced SLM from the server is adopted (0 = no hold-out: every reply is "
        "adopted).",
    )
    validation_source: str = option(
        "test",
        "Where the held-out part comes from: 'test' = the client's own evaluation texts (its training data "
        "stays whole; its local test metrics are measured on the rest) or 'train' = its training data.",
    )
    accept_tolerance: float = option(
        0.15,
        "An enhanced SLM is adopted when its macro-F1 on the client's held-out validation part is at least "
        "the client's own model's minus this; otherwise the client keeps its own weights and reports the "
        "refusal.",
    )
    accept_confidence: float = option(
        0.9,
        "A reply is refused only when, in at least this share of bootstrap draws of the held-out texts, its "
        "macro-F1 is below the own model's minus clients.accept_tolerance: sure to be worse, so the dozen "
        "held-out texts of a label-skewed client do not refuse a reply by chance (c in [0.5, 1)). "
        "0 = compare the two macro-F1 values as measured (the point rule).",
    )
    final_round: bool = option(
        False,
        "After the run's last server update, a client whose weights changed since its last local round (an "
        "adopted reply, or the standalone baseline's extra epochs) trains one more local round (clients.epochs "
        "on its private data, not uploaded) and ends the run with it: what the reply taught, adapted to the "
        "client's own data. false = a client ends with the reply as it arrived. It moves global accuracy "
        "by task: up on six-label trec, down on two-label rotten-tomatoes (docs/results.md#levers-tried).",
    )
    keep_weight: float = option(
        0.0,
        "Keeping what a reply gave (learning without forgetting): after a client adopts an enhanced SLM, its "
        "local training adds this weight times the cross-entropy toward the adopted model's predictions on "
        "its own training texts (and the label loss gets 1 minus it); 0 = plain local training.",
    )


@dataclass
class LLMConfig:
    model: str = option("smollm2-135m-instruct", "Server LLM: catalogue name, HF id or local path.")
    lora_r: int = option(8, "LoRA rank.")
    lora_alpha: int = option(16, "LoRA alpha.")
    lora_dropout: float = option(0.0, "LoRA dropout.")
    lora_targets: list = option(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "Module names that get a LoRA adapter.",
    )
    max_text_tokens: int = option(160, "Texts are cut to this many LLM tokens inside classification prompts.")
    device: str = option(
        "auto",
        "Where the server computes (generation, tuning, evaluation, SLM scoring and distillation): auto "
        "(CUDA when available), cpu, cuda or cuda:N.",
    )


@dataclass
class GenerationConfig:
    samples_per_label: int = option(24, "N: samples generated per label per server update.")
    batch_size: int = option(128, "Generation batch size (rows sampled together).")
    max_new_tokens: int = option(64, "Max generated tokens per sample.")
    temperature: float = option(1.0, "Sampling temperature.")
    top_p: float = option(0.95, "Nucleus sampling p.")
    min_words: int = option(5, "Samples with fewer words are dropped.")
    examples_per_prompt: int = option(
        0,
        "In-context feedback (ProGen): this many of the SLMs' best-scored pool texts of the same label go "
        "into each generation prompt, rotated per sample (0 = the plain prompt; nothing without feedback).",
    )
    example_candidates: int = option(
        16, "The best-scored pool texts per label that the in-context examples rotate over."
    )
    attributes: list[str] = option(
        [],
        "Diversity by instruction: each sample's prompt ends with one of these sentences, drawn per sample "
        "(e.g. 'Keep it to one sentence.', 'Write it in a casual tone.', or sub-topics in the task owner's "
        "words). Empty = the plain prompt.",
    )
    dtype: str = option(
        "auto",
        "Weights used for sampling: float32 (the model as trained), bfloat16, or auto (bfloat16 where a "
        "matmul probe on this machine runs it faster than float32).",
    )


@dataclass
class FeedbackConfig:
    gamma: float = option(0.7, "Staleness discount in (0,1]: w_j proportional to n_j * gamma^s_j.")
    prior_correction: str = option(
        "pool",
        "Label-prior correction of each SLM's scores: 'pool' (divide each SLM's probabilities by its mean "
        "over the label-balanced synthetic pool), 'counts' (logit adjustment by the client's declared "
        "label counts) or 'none'.",
    )
    tau: float | str = option(
        "auto",
        "Quality threshold on q for S+ (and for the hard L_QG variant): a number in [0, 1], or auto = "
        "1.2 / number of labels (1.2x chance: 0.6 for two labels, 0.24 for five, 0.2 for six), the "
        "value the validation sweeps in docs/results.md chose on each task.",
    )
    max_per_label: int = option(200, "Cap on S+ examples per label (S+ is class-balanced).")
    min_per_label: int | str = option(
        "auto",
        "Floor on S+ examples per label: when the balanced count m is smaller (few samples qualify), every "
        "label in S+ is topped up to this many with its next-highest-q samples, even below tau (0 = off). "
        "auto = generation.samples_per_label (one update's samples of a label) when the task has more than "
        "two labels, 0 for two: with two labels the floor fills S+ with texts the SLMs read as the other "
        "label (docs/results.md#levers-tried).",
    )
    missing_labels: str = option(
        "fill",
        "When some label has no sample that qualifies for S+: 'empty' (S+ is empty: strict class balance), "
        "'skip' (S+ is balanced over the labels that have one; splus_per_label in metrics.jsonl shows the "
        "labels left out) or 'fill' (as skip, then each label left out gets its highest-q samples, so S+ "
        "keeps every label; chosen on the validation split, docs/results.md).",
    )
    enabled: bool = option(
        True,
        "False = data-free KD without feedback: no SLM scoring, S+ = every generated sample, hard labels.",
    )
    min_separation: float = option(
        0.05,
        "No-signal guard: an update whose SLM ensemble is sure to separate the intended labels of the scored "
        "pool by less than this (mean over labels of p(c) on texts meant as c minus p(c) on the others; 0 = "
        "the scores ignore the label) neither tunes the LLM nor distils; -1 turns the guard off.",
    )
    signal_confidence: float = option(
        0.95,
        "No-signal guard: 'sure' means the separation's one-sided bootstrap upper bound at this confidence "
        "(over the pool's texts) is below feedback.min_separation (docs/configuration.md#guards).",
    )
    per_label_weights: bool = option(
        False,
        "Per-label ensemble weights: an SLM's vote on label c is weighted by (n_jc + 1) gamma^s_j, what its "
        "client declared it holds of c, instead of one weight n_j gamma^s_j for every label.",
    )
    exclude_distilled: bool = option(
        False,
        "No confirmation loop: a text is scored only by SLMs whose weights do not descend from a reply "
        "distilled after the text was written (they may have been trained on it); a text no SLM may score "
        "keeps its last score.",
    )

    def threshold(self, num_labels: int) -> float:
        """tau as a number: 'auto' resolves to TAU_AUTO_FACTOR / num_labels once the task's labels are known."""
        return min(TAU_AUTO_FACTOR / num_labels, 1.0) if self.tau == "auto" else float(self.tau)

    def floor(self, num_labels: int, samples_per_label: int) -> int:
        """min_per_label as a number: 'auto' resolves to one update's samples per label on a task of more
        than two labels and to 0 (no floor) on a two-label task."""
        if self.min_per_label == "auto":
            return samples_per_label if num_labels > 2 else 0
        return int(self.min_per_label)


@dataclass
class TuneConfig:
    steps: int = option(6, "S: adapter optimisation steps per server update.")
    batch_size: int = option(8, "Generated samples per L_QG batch.")
    micro_batch_size: int = option(
        4, "Sequences per forward/backward pass (gradient accumulation; saves memory)."
    )
    task_batch_size: int = option(4, "S+ examples per L_task batch.")
    lr: float = option(3e-4, "Adapter learning rate (AdamW).")
    beta: float = option(0.5, "Weight of the unlikelihood term for poor samples in L_QG.")
    lambda_task: float = option(1.0, "Weight of L_task (LLM as verbalizer classifier on S+).")
    alpha: float = option(1.0, "Weight of L_PR = KL(p_theta0 || p_theta) over token positions.")
    hard: bool = option(False, "Hard L_QG: q thresholded at tau.")
    qg_weight: float = option(1.0, "Weight of L_QG (0 = the 'without L_QG' ablation).")
    qg_form: str = option(
        "q",
        "L_QG's per-text weights: 'q' (likelihood weight q, unlikelihood weight beta * (1 - q)) or 'centred' "
        "(likelihood weight max(q - the label's mean q, 0); unlikelihood, weight beta, only on texts the "
        "SLMs confidently read as another label, so tokens common to every label are not pushed down).",
    )
    collapse_share: float = option(
        0.9,
        "Rollback: an adapter update after which the LLM predicts one label for at least this share of a "
        "label-balanced sample of S+ (and did not before) is undone; 1 turns the rollback off.",
    )
    autocast: str = option(
        "auto",
        "Compute dtype of the tuning passes: float32, bfloat16 (torch autocast; the adapter and optimizer "
        "stay float32), or auto (bfloat16 where it runs faster here).",
    )


@dataclass
class DistillConfig:
    epochs: int = option(10, "Distillation epochs over S+ per enhancement.")
    lr: float = option(2e-4, "Distillation learning rate.")
    batch_size: int = option(16, "Distillation batch size.")
    mu: float = option(
        0.5,
        "Target = (1-mu) onehot(y) + mu softmax(ensemble logits / T). Generation tasks: the loss is (1-mu) "
        "NLL of the S+ target + mu T^2 KL(LLM || SLM) over the vocabulary at each target token.",
    )
    temperature: float = option(
        2.0, "T: temperature of the ensemble's soft labels (generation: of the LLM's and the SLM's tokens)."
    )
    autocast: str = option("auto", "Distillation compute dtype: float32, bfloat16 (mixed precision) or auto.")
    source: str = option(
        "splus",
        "What a reply is distilled on: 'splus' (the class-balanced good set S+, every label cut to the "
        "smallest label's count) or 'pool' (every pool text the labeller agrees with, each label given the "
        "same total weight, each text weighted by the labeller's probability of its intended label).",
    )
    labeller: str = option(
        "slms",
        "Whose posterior over labels filters (distill.source pool) and soft-labels the distilled texts: "
        "'slms' (the SLM ensemble), 'llm' (the LLM's verbalizer), 'generator' (the generator's own posterior "
        "p(y|x) proportional to p(x | P(y)), SuperGen) or several joined by '+' (e.g. 'slms+llm': their "
        "normalised product). The LLM's posteriors are computed once per text, before the LLM is tuned on it, "
        "and calibrated over the update's label-balanced new texts. Without feedback (KD without feedback) "
        "nothing is scored and the intended labels are used.",
    )
    agreement: bool = option(
        True,
        "distill.source pool: keep only the texts whose labeller's most likely label is the intended one.",
    )
    steps: int = option(
        0, "Distillation optimizer steps per reply; 0 = distill.epochs passes over the distilled texts."
    )

    @property
    def labellers(self) -> tuple[str, ...]:
        """The parts of `labeller`, e.g. ('slms', 'llm')."""
        return tuple(self.labeller.split("+"))


@dataclass
class GenerationTaskConfig:
    """Settings only a generation task reads (crosslm.server.generation_update). A generation update also
    reads generation.* (samples_per_label = pairs per condition, min_words = the least words of a pair's
    input), feedback.gamma / max_per_label, tune.*, and distill.* (distill.mu and distill.temperature are the
    weight and temperature of the token-level distillation)."""

    tau: float = option(
        0.5,
        "Quality threshold on q for S+ (and the hard L_QG): q is a weighted mean of the clients' percentile "
        "ranks of a pair's target log-likelihood, so 0.5 keeps the pairs the ensemble ranks above its median.",
    )
    rank_within_condition: bool = option(
        True,
        "Rank each client's scores among the pairs of the same condition (True) or over the whole pool: "
        "within a condition, a client that holds mostly one topic does not rank that topic's pairs first.",
    )
    max_target_tokens: int = option(
        32,
        "Tokens a target may take (its end-of-sequence token included): the causal SLMs' tuning and scoring "
        "budget, and the budget of the targets the LLM and the SLMs write greedily for evaluation.",
    )
    accept_tolerance: float = option(
        0.05,
        "The clients' acceptance rule on a generation task: a reply is refused when its mean ROUGE-L F1 on the "
        "client's held-out pairs is below the own model's minus this (in a share clients.accept_confidence "
        "of bootstrap draws); clients.accept_tolerance is classification's macro-F1 tolerance.",
    )
    kd_top_k: int = option(
        64,
        "Token-level distillation keeps the LLM's k most likely next tokens at each target position, the "
        "rest of its probability as one bucket (a KL over k + 1 outcomes), so the teacher's targets are "
        "computed once per update and stay small.",
    )


@dataclass
class FederationConfig:
    updates: int = option(5, "U: the run ends after this many server updates.")
    buffer_size: int = option(1, "B: uploads per server update (1 = fully asynchronous).")
    time_per_example: float = option(0.05, "Virtual seconds per training example-epoch at speed 1.0.")
    server_update_time: float = option(30.0, "Virtual seconds one server update takes.")
    max_payload_mb: float = option(200.0, "Uploads larger than this are rejected.")
    server_update: str = option(
        "crosslm",
        "What a server update does: 'crosslm' (generate, feedback, tune, distil), 'fedavg' (average the "
        "latest SLMs of the same architecture) or 'none' (return each SLM unchanged: standalone).",
    )


@dataclass
class FlowerConfig:
    """Settings of the Flower runtime (`crosslm flower ...`); the in-process runtime ignores them."""

    straggler_timeout: float = option(
        1800.0, "Seconds the server waits for a node's reply; a later reply is dropped with a logged reason."
    )
    message_ttl: float = option(
        7200.0, "Flower message time-to-live in seconds (above the slowest local round)."
    )
    poll_interval: float = option(0.5, "Seconds between the server's polls for replies.")
    min_nodes: int = option(1, "Online nodes needed before the server sends its first message.")
    node_wait_timeout: float = option(600.0, "Seconds to wait for min_nodes before giving up.")
    port: int = option(0, "SuperLink port of the loopback deployment; 0 = a free port.")
    node_delays: list = option(
        [0.0], "Loopback deployment: extra seconds each node waits per local round (slower hardware); cycled."
    )
    threads_per_node: int = option(1, "Loopback deployment: torch threads per ClientApp process.")
    insecure: bool = option(
        False, "Loopback deployment without TLS and node authentication (for debugging only)."
    )
    audit_outbox: bool = option(
        False,
        "Loopback deployment: each node keeps a copy of every message it sends (nodes/<id>/outbox-audit).",
    )


@dataclass
class EvalConfig:
    llm_eval_size: int = option(200, "Global-test examples used to measure the LLM's task accuracy.")
    general_text_tokens: int = option(8192, "Tokens of held-out general text for the LLM perplexity check.")
    batch_size: int = option(32, "Evaluation batch size.")
    llm_dtype: str = option(
        "auto",
        "Weights the LLM's task accuracy is measured with: float32 (the model as trained), bfloat16, or "
        "auto (bfloat16 where it runs faster here); the adapter is merged in either way.",
    )
    split: str = option(
        "test",
        "Where global metrics are measured: test (the global test split, for reporting) or validation (a "
        "split of the same size drawn from the remaining data, for tuning settings honestly).",
    )


@dataclass
class RunConfig:
    method: str = option(
        "crosslm",
        "Method preset (sets the keys it needs): crosslm, crosslm-no-qg, crosslm-no-pr, kd-no-feedback, "
        "fedavg, standalone, centralized. See crosslm/methods.py.",
    )
    seed: int = option(0, "Seed for partitioning, sampling, training and the virtual clock.")
    output_dir: str = option("runs", "Parent folder of run directories.")
    name: str = option("", "Run directory name; empty = <dataset>-<timestamp>.")
    threads: int = option(0, "torch threads; 0 = torch's default.")
    data: DataConfig = field(default_factory=DataConfig)
    clients: ClientConfig = field(default_factory=ClientConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    generation_task: GenerationTaskConfig = field(default_factory=GenerationTaskConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    flower: FlowerConfig = field(default_factory=FlowerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Coerce a YAML/CLI value to the field's declared type, or raise ConfigError naming the key."""
    origin = typing.get_origin(typ)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"config key '{key}' expects true or false, got {value!r}.")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}.")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}.") from None
    if typ is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}.") from None
    if typ is str:
        if isinstance(value, dict | list):
            raise ConfigError(f"config key '{key}' expects a string, got {value!r}.")
        return "" if value is None else str(value)
    if typ is list or origin is list:
        if isinstance(value, str):
            value = (
                yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
            )
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}.")
        return value
    if typ is dict or origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' expects a mapping, got {value!r}.")
        return value
    if typ in (float | str, int | str):  # a number or a keyword (feedback.tau: auto, min_per_label: auto)
        if isinstance(value, str) and not _is_float(value):
            return value
        return _coerce(value, float if typ == float | str else int, key)
    if isinstance(typ, types.UnionType):
        return value
    return value


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def unknown_key_error(key: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key.split(".")[-1], [k.split(".")[-1] for k in known], n=1, cutoff=0.6)
    hint = ""
    if close:
        full = [k for k in known if k.split(".")[-1] == close[0]]
        hint = f" Did you mean '{full[0]}'?"
    return ConfigError(
        f"unknown config key '{key}' in {where}.{hint} Known keys: {', '.join(sorted(known))}."
    )


def all_keys(cfg: Any = None, prefix: str = "") -> list[str]:
    """Every dotted key of the config (for suggestions and `--help-config`)."""
    cfg = cfg if cfg is not None else RunConfig()
    keys = []
    for f in dataclasses.fields(cfg):
        val = getattr(cfg, f.name)
        if dataclasses.is_dataclass(val):
            keys += all_keys(val, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _apply(cfg: Any, data: dict[str, Any], where: str, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where}: section '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {data!r}."
        )
    hints = _hints(type(cfg))
    names = {f.name for f in dataclasses.fields(cfg)}
    for key, value in data.items():
        full = prefix + str(key)
        if key not in names:
            raise unknown_key_error(full, all_keys(), where)
        cur = getattr(cfg, key)
        if dataclasses.is_dataclass(cur):
            _apply(cur, value, where, full + ".")
        else:
            setattr(cfg, key, _coerce(value, hints[key], full))


def set_override(cfg: RunConfig, assignment: str) -> None:
    """Apply one `key.sub=value` override (value parsed as YAML: numbers, booleans, lists)."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r} (e.g. --set federation.updates=3).")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node: dict[str, Any] = {}
    cur = node
    parts = key.split(".")
    for p in parts[:-1]:
        cur[p] = {}
        cur = cur[p]
    cur[parts[-1]] = value
    _apply(cfg, node, "--set")


def read_yaml(path: str | Path, what: str) -> Any:
    """A YAML file's content ({} when empty); a missing or malformed file is a ConfigError naming it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} '{p}' does not exist.")
    try:
        return yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} '{p}' is not valid YAML: {e}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then the YAML file (if any), then each `--set key=value`; then validate."""
    cfg = RunConfig()
    if path is not None:
        _apply(cfg, read_yaml(path, "config file"), f"config file '{path}'")
    for o in overrides or []:
        set_override(cfg, o)
    if cfg.method in METHOD_NAMES:
        apply_method(cfg)  # the method's defining keys win over the file and --set
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any], where: str) -> RunConfig:
    """A validated RunConfig from a (resolved) config mapping, e.g. one received as JSON."""
    cfg = RunConfig()
    _apply(cfg, data, where)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Range checks that name the field and what was expected."""

    def need(cond: bool, key: str, expected: str) -> None:
        if not cond:
            raise ConfigError(f"config key '{key}' = {get_key(cfg, key)!r}: expected {expected}.")

    d, c, g, fb, t, ds, fed = (
        cfg.data,
        cfg.clients,
        cfg.generation,
        cfg.feedback,
        cfg.tune,
        cfg.distill,
        cfg.federation,
    )
    need(d.num_clients >= 1, "data.num_clients", "at least 1")
    need(d.dirichlet_alpha > 0, "data.dirichlet_alpha", "a positive number")
    need(d.train_per_client >= 2, "data.train_per_client", "at least 2")
    need(d.test_per_client >= 1, "data.test_per_client", "at least 1")
    need(d.global_test_size >= 2, "data.global_test_size", "at least 2")
    need(d.max_input_chars >= 0, "data.max_input_chars", "0 (no cut) or more")
    need(d.max_target_chars >= 1, "data.max_target_chars", "at least 1")
    need(len(c.slms) >= 1, "clients.slms", "a non-empty list of SLM names")
    need(len(c.speeds) >= 1 and all(float(s) > 0 for s in c.speeds), "clients.speeds", "positive numbers")
    need(all(float(s) >= 0 for s in c.network_delays), "clients.network_delays", "non-negative numbers")
    need(c.epochs >= 1, "clients.epochs", "at least 1")
    need(c.upload_dtype in ("float16", "float32"), "clients.upload_dtype", "float16 or float32")
    need(g.samples_per_label >= 1, "generation.samples_per_label", "at least 1")
    need(g.batch_size >= 1, "generation.batch_size", "at least 1")
    need(g.examples_per_prompt >= 0, "generation.examples_per_prompt", "0 or more")
    need(g.example_candidates >= 1, "generation.example_candidates", "at least 1")
    need(
        all(isinstance(a, str) and a.strip() for a in g.attributes),
        "generation.attributes",
        "a list of non-empty sentences",
    )
    need(cfg.eval.split in ("test", "validation"), "eval.split", "test or validation")
    for key in PRECISION_KEYS:
        need(get_key(cfg, key) in COMPUTE_DTYPES, key, "auto, float32 or bfloat16")
    for key, value in (("llm.device", cfg.llm.device), ("clients.device", c.device)):
        need(bool(DEVICE_NAME.fullmatch(str(value))), key, "auto, cpu, cuda or cuda:N")
    need(g.temperature > 0 and 0 < g.top_p <= 1, "generation.top_p", "temperature > 0 and top_p in (0, 1]")
    need(0 < fb.gamma <= 1, "feedback.gamma", "a number in (0, 1]")
    need(
        fb.tau == "auto" or (isinstance(fb.tau, float) and 0 <= fb.tau <= 1),
        "feedback.tau",
        "a number in [0, 1] or auto",
    )
    need(
        fb.missing_labels in MISSING_LABEL_RULES, "feedback.missing_labels", " or ".join(MISSING_LABEL_RULES)
    )
    need(
        fb.min_per_label == "auto" or (isinstance(fb.min_per_label, int) and fb.min_per_label >= 0),
        "feedback.min_per_label",
        "0 or more, or auto",
    )
    need(
        fb.prior_correction in ("pool", "counts", "none"), "feedback.prior_correction", "pool, counts or none"
    )
    need(t.steps >= 0, "tune.steps", "0 or more")
    need(t.alpha >= 0 and t.beta >= 0 and t.lambda_task >= 0, "tune.alpha", "non-negative loss weights")
    need(0 <= ds.mu <= 1, "distill.mu", "a number in [0, 1]")
    need(ds.temperature > 0, "distill.temperature", "a positive number")
    need(ds.source in DISTILL_SOURCES, "distill.source", " or ".join(DISTILL_SOURCES))
    parts = ds.labeller.split("+")
    need(
        all(x in LABELLERS for x in parts) and len(set(parts)) == len(parts),
        "distill.labeller",
        f"one of {', '.join(LABELLERS)}, or several joined by '+' (e.g. slms+llm)",
    )
    need(ds.steps >= 0, "distill.steps", "0 or more (0 = distill.epochs passes)")
    gt = cfg.generation_task
    need(0 <= gt.tau <= 1, "generation_task.tau", "a number in [0, 1] (q is a weighted percentile rank)")
    need(gt.max_target_tokens >= 1, "generation_task.max_target_tokens", "at least 1")
    need(0 <= gt.accept_tolerance <= 1, "generation_task.accept_tolerance", "a ROUGE-L difference in [0, 1]")
    need(gt.kd_top_k >= 1, "generation_task.kd_top_k", "at least 1 (the teacher's most likely tokens kept)")
    need(0 <= c.keep_weight < 1, "clients.keep_weight", "a weight in [0, 1)")
    need(fed.updates >= 1, "federation.updates", "at least 1")
    need(
        fed.server_update in ("crosslm", "fedavg", "none"),
        "federation.server_update",
        "crosslm, fedavg or none",
    )
    need(c.extra_local_epochs >= 0, "clients.extra_local_epochs", "0 or more")
    need(0 <= c.validation_fraction < 1, "clients.validation_fraction", "a share in [0, 1)")
    need(c.validation_source in ("test", "train"), "clients.validation_source", "test or train")
    need(c.accept_tolerance >= 0, "clients.accept_tolerance", "0 or more (a macro-F1 difference)")
    need(
        c.accept_confidence == 0 or 0.5 <= c.accept_confidence < 1,
        "clients.accept_confidence",
        "0 (compare as measured) or a confidence in [0.5, 1)",
    )
    need(c.logit_adjust >= 0, "clients.logit_adjust", "0 or more (0 = plain cross-entropy)")
    need(t.qg_weight >= 0, "tune.qg_weight", "a non-negative weight")
    need(t.qg_form in ("q", "centred"), "tune.qg_form", "q or centred")
    need(0 < t.collapse_share <= 1, "tune.collapse_share", "a share in (0, 1] (1 = no rollback)")
    need(fb.min_separation <= 1, "feedback.min_separation", "at most 1 (-1 = no guard)")
    need(0.5 <= fb.signal_confidence < 1, "feedback.signal_confidence", "a confidence in [0.5, 1)")
    need(
        fb.enabled or (t.steps == 0 and ds.mu == 0),
        "feedback.enabled",
        "true unless tune.steps=0 and distill.mu=0 (without SLM scores there is no q to tune on and no "
        "ensemble to distil)",
    )
    need(cfg.method in METHOD_NAMES, "method", f"one of {', '.join(METHOD_NAMES)}")
    need(1 <= fed.buffer_size <= d.num_clients, "federation.buffer_size", f"between 1 and {d.num_clients}")
    fl = cfg.flower
    need(fl.straggler_timeout > 0, "flower.straggler_timeout", "a positive number of seconds")
    need(fl.message_ttl > 0, "flower.message_ttl", "a positive number of seconds")
    need(fl.poll_interval > 0, "flower.poll_interval", "a positive number of seconds")
    need(fl.min_nodes >= 1, "flower.min_nodes", "at least 1")
    need(0 <= fl.port < 65536, "flower.port", "0 (any free port) or a port number below 65536")
    need(all(float(x) >= 0 for x in fl.node_delays), "flower.node_delays", "non-negative numbers")


def get_key(cfg: Any, key: str) -> Any:
    """The value of a dotted key ("distill.epochs") of a config."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def apply_method(cfg: RunConfig) -> RunConfig:
    """Set the keys of `cfg.method`'s preset (crosslm.methods) on `cfg`, in place, and return it. A value
    naming another key ("distill.epochs") copies that key's value, so matched budgets follow the config."""
    for key, value in METHODS[cfg.method].items():
        if isinstance(value, str) and "." in value:
            value = get_key(cfg, value)
        set_override(cfg, f"{key}={value}")
    return cfg


def config_help() -> str:
    """One line per key: name, default, help."""
    lines = []

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            val = getattr(obj, f.name)
            if dataclasses.is_dataclass(val):
                walk(val, prefix + f.name + ".")
            else:
                lines.append(f"{prefix + f.name:32s} {val!r:>20}  {f.metadata.get('help', '')}")

    walk(RunConfig(), "")
    return "\n".join(lines)


def save_config(cfg: RunConfig, path: Path) -> None:
    from crosslm.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
