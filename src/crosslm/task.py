"""What a task is: its labels, how the LLM is asked to write each label, and how it is asked to classify.

Two kinds of task share one TaskSpec, so the partition, the prompts per label and the run records need no
second code path:

- classification: examples are (text, label) (`LabelledTexts`); the SLMs are sequence classifiers.
- generation: examples are (input, target, condition) (`GenerationPairs`), e.g. (a news story's lead, its
  headline, its topic); the SLMs are causal LMs that write the target from the input. `labels` then holds
  the condition names (the topics): the Dirichlet skew of the partition is over conditions, and the LLM is
  prompted per condition with `generation_prompt`, as it is per label for classification. The condition is
  never an SLM input.

Messages carry the label list and the model config, not task-specific fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

TASK_KINDS = ("classification", "generation")


def marker(noun: str) -> str:
    """'headline' -> 'Headline': a noun as the word before a colon that marks a part of a text."""
    noun = noun.strip() or "target"
    return noun[:1].upper() + noun[1:]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    labels: tuple[str, ...]
    """Label names as they appear in the data (e.g. 'negative', 'positive'); index = class id. For a
    generation task: the condition names (e.g. the topics), index = condition id; one is enough."""
    descriptions: tuple[str, ...]
    """d(y): what the LLM is asked to write for each label, e.g. 'negative'."""
    verbalizer: tuple[str, ...]
    """The label strings the LLM answers with when it classifies (capitalised, against label-word bias)."""
    generation_prompt: str
    """P(y): user message with {description}, e.g. 'Write a short {description} movie review.' For a
    generation task it asks for one (input, target) pair, and `prompt_for` appends the format the answer is
    parsed by (`pair_format`)."""
    classification_prompt: str
    """User message with {text} and {options}, answered by one of the verbalizer strings."""
    text_noun: str = "text"
    """What one text is called. Generation: what an input is called, e.g. 'story' (the target prompt reads
    'Write the headline for this story:'; a leading 'Story:' in the LLM's answer is removed)."""
    kind: str = "classification"
    description: str = ""
    """What the texts are, in the task owner's words (`data.task_description`), e.g. 'movie reviews'."""
    target_noun: str = ""
    """Generation only: what a target is, e.g. 'headline'. The causal SLMs read "{input}\nHeadline:" and
    write the target after it (crosslm.modeling.causal_slm), so the word is part of their prompt."""

    def __post_init__(self) -> None:
        n = len(self.labels)
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task {self.name!r}: kind {self.kind!r} is not one of {', '.join(TASK_KINDS)}")
        if self.kind == "generation":
            if n < 1:
                raise ValueError(f"generation task {self.name!r} needs at least 1 condition, got none")
            if not self.target_noun.strip():
                raise ValueError(f"generation task {self.name!r} needs a target_noun (e.g. 'headline')")
        elif n < 2:
            raise ValueError(f"task {self.name!r} needs at least 2 labels, got {self.labels}")
        if len(self.descriptions) != n or len(self.verbalizer) != n:
            raise ValueError(f"task {self.name!r}: labels, descriptions and verbalizer differ in length")
        if len(set(self.verbalizer)) != n:
            raise ValueError(f"task {self.name!r}: verbalizer strings must be distinct")

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def conditions(self) -> tuple[str, ...]:
        """A generation task's condition names (the same tuple as `labels`)."""
        return self.labels

    def prompt_for(self, label: int) -> str:
        """P(y) for label (or condition) `label`: for a generation task, the prompt of a pair's input (the
        LLM writes its target separately, as the answer to `target_prompt`)."""
        return self.generation_prompt.format(description=self.descriptions[label])

    @property
    def input_marker(self) -> str:
        """Generation: the word before the input in a pair the LLM writes, e.g. 'Story'."""
        return marker(self.text_noun)

    @property
    def target_marker(self) -> str:
        """Generation: the word before the target, e.g. 'Headline' (also the causal SLMs' prompt marker)."""
        return marker(self.target_noun)

    def target_prompt(self, text: str) -> str:
        """The user message that asks the LLM for the target of `text` (its L_task prompt, and the prompt
        the LLM's own targets are written and evaluated with), e.g. 'Write the headline for this story:'."""
        return f"Write the {self.target_noun.strip()} for this {self.text_noun.strip()}:\n{text}"

    def classify_prompt(self, text: str) -> str:
        if self.kind != "classification":
            raise ValueError(f"task {self.name!r} is a {self.kind} task: it has no classification prompt")
        return self.classification_prompt.format(text=text, options=", ".join(self.verbalizer))

    def wording(self) -> dict[str, str | list[str]]:
        """Everything the LLM is told about the task, as JSON. A run records it in its run_start, so a
        catalogue prompt edited later shows as drift when the run is reused (crosslm.experiment)."""
        wording: dict[str, str | list[str]] = {
            "descriptions": list(self.descriptions),
            "verbalizer": list(self.verbalizer),
            "generation_prompt": self.generation_prompt,
            "classification_prompt": self.classification_prompt,
        }
        if self.kind != "classification":  # a classification task's record stays as before
            wording |= {"kind": self.kind, "target_noun": self.target_noun, "text_noun": self.text_noun}
        return wording


@dataclass
class LabelledTexts:
    """Parallel lists of texts and integer labels (indices into TaskSpec.labels)."""

    texts: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError("texts and labels differ in length")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: list[int]) -> LabelledTexts:
        return LabelledTexts([self.texts[i] for i in idx], [self.labels[i] for i in idx])

    @classmethod
    def concat(cls, parts: Sequence[LabelledTexts]) -> LabelledTexts:
        return cls([t for p in parts for t in p.texts], [y for p in parts for y in p.labels])

    def label_counts(self, num_labels: int) -> list[int]:
        counts = [0] * num_labels
        for y in self.labels:
            counts[y] += 1
        return counts


@dataclass
class GenerationPairs:
    """Parallel lists of inputs, targets and integer conditions (indices into TaskSpec.conditions).

    `labels` is the conditions under the name the partition reads (crosslm.partition), so a generation
    dataset is split with the same Dirichlet skew over conditions as a classification one over labels."""

    inputs: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    conditions: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not len(self.inputs) == len(self.targets) == len(self.conditions):
            raise ValueError(
                f"inputs, targets and conditions differ in length "
                f"({len(self.inputs)}, {len(self.targets)}, {len(self.conditions)})"
            )

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def labels(self) -> list[int]:
        """The conditions (for the partition and its label histograms)."""
        return self.conditions

    def subset(self, idx: list[int]) -> GenerationPairs:
        return GenerationPairs(
            [self.inputs[i] for i in idx], [self.targets[i] for i in idx], [self.conditions[i] for i in idx]
        )

    @classmethod
    def concat(cls, parts: Sequence[GenerationPairs]) -> GenerationPairs:
        return cls([x for p in parts for x in p.inputs], [y for p in parts for y in p.targets],
                   [c for p in parts for c in p.conditions])  # fmt: skip

    def label_counts(self, num_labels: int) -> list[int]:
        """Examples per condition."""
        counts = [0] * num_labels
        for c in self.conditions:
            counts[c] += 1
        return counts
